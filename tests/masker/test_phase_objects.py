"""The callback's phase objects on their own (no Trainer): settings, step gate, frozen mask, enforcer,
checkpoint round trip, collectives on one process."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fish_lightning import FisherMaskCallback
from fish_lightning.masker import collectives as distributed
from fish_lightning.masker import state as ckpt
from fish_lightning.masker.enforcer import MaskEnforcer
from fish_lightning.masker.frozen import FrozenMask
from fish_lightning.masker.settings import FishSettings
from fish_lightning.masker.step_gate import StepGate


def params_and_masks(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"a": nn.Parameter(torch.randn(4, 3, generator=g)), "b": nn.Parameter(torch.randn(5, generator=g))}
    masks = {"a": torch.rand(4, 3, generator=g) < 0.5, "b": torch.tensor([True, False, False, True, False])}
    return params, masks


def test_settings_are_the_constructor_arguments():
    ctor = {n: p for n, p in inspect.signature(FisherMaskCallback.__init__).parameters.items() if n != "settings"}
    assert [n for n in ctor if n != "self"] == FishSettings.names()
    assert {n: p.default for n, p in ctor.items() if n != "self"} == FishSettings().as_dict()
    cb = FisherMaskCallback(sparsity=0.5, scope="normalized")
    assert cb.sparsity == 0.5 and cb.settings.scope == "normalized"
    with pytest.raises(AttributeError):
        cb.sparsity = 0.1  # read-only: the settings are validated once
    with pytest.raises(ValueError, match=r"reselect_every_n_steps=0 must be None or an integer >= 1"):
        FishSettings(reselect_every_n_steps=0)
    with pytest.raises(ValueError, match=r"seed=1\.5 must be an integer$"):
        FishSettings(seed=1.5)


def test_step_gate_opens_once_per_optimizer_step():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.LBFGS([p], lr=0.1, max_iter=4)
    ends = []
    gate = StepGate(on_step_end=lambda: ends.append(1))
    gate.watch([opt])
    taken = []

    def closure():
        taken.append(gate.take())  # Lightning's on_before_optimizer_step runs per closure evaluation
        opt.zero_grad()
        loss = ((p - 3) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)
    assert taken.count(True) == 2 and len(taken) > 2 and ends == [1, 1]
    gate.remove()
    opt.step(closure)
    assert ends == [1, 1]


def test_frozen_mask_hashes_and_reselection_counters():
    params, masks = params_and_masks()
    mask = FrozenMask.select(masks, {n: int(m.sum()) for n, m in masks.items()}, params, freeze_step=7)
    assert mask.num_kept == sum(int(m.sum()) for m in masks.values()) and mask.freeze_step == 7
    with torch.no_grad():
        params["a"][masks["a"]] += 1.0  # kept entries may move
    assert mask.moved(params) == []
    with torch.no_grad():
        params["b"][1] += 1.0  # a frozen one
    assert mask.moved(params) == ["b"]
    params["a"].grad, params["b"].grad = torch.ones(4, 3), torch.full((5,), 2.0)
    mask.add_squares(params, 0.5)
    assert torch.equal(mask.refisher["b"], torch.ones(5))
    mask.replace(masks, mask.kept, params)
    assert mask.reselections == 1 and mask.refisher is None and mask.moved(params) == []


@pytest.mark.parametrize("sparse", [False, True])
def test_enforcer_keeps_frozen_entries_and_masks_right_after_backward(sparse):
    params, masks = params_and_masks()
    opt = torch.optim.AdamW(params.values(), lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in params.items()}
    enforcer = MaskEnforcer(sparse)
    enforcer.install([opt], params, masks)
    assert enforcer.covers([opt]) and not enforcer.covers([torch.optim.SGD(params.values(), lr=1)])
    for _ in range(3):
        opt.zero_grad()
        sum((p**2).sum() for p in params.values()).backward()
        enforcer.after_backward(params, masks)
        if not sparse:  # what the user's clip_gradients would see: only kept entries
            assert all(bool(p.grad[~masks[n]].eq(0).all()) for n, p in params.items())
        enforcer.before_step(params, masks)
        opt.step()
    for n, p in params.items():
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), n
        assert bool((p.detach()[masks[n]] != before[n][masks[n]]).all()), n
    enforcer.remove()
    assert not enforcer.installed
    assert type(enforcer).__name__ == ("CompactState" if sparse else "DenseGuard")


def test_checkpoint_mask_round_trip_and_preview():
    params, masks = params_and_masks()
    mask = FrozenMask.select(masks, {n: int(m.sum()) for n, m in masks.items()}, params, freeze_step=3)
    mask.reselections = 2
    state = {**ckpt.mask_state(None, mask, params, set()), "frozen_at_step": 3, "reselections": 2}
    restored = ckpt.restore_mask(state, params, set())
    preview = ckpt.preview_mask(state, {n: p.shape for n, p in params.items()})
    for m in (restored, preview):
        assert m.freeze_step == 3 and m.digests == mask.digests and m.kept == mask.kept
        assert all(torch.equal(m.masks[n], masks[n]) for n in masks)
    assert restored.reselections == 2
    assert ckpt.restore_mask({"masks": None}, params, set()) is None
    with pytest.raises(ValueError, match=r"FisherMaskCallback\(sparsity=0\.5\), this callback has sparsity=0\.9"):
        ckpt.check_settings({"sparsity": 0.5}, FishSettings())


def test_collectives_on_one_process_are_local():
    one = SimpleNamespace(world_size=1, global_rank=0, strategy=None)
    fisher = {"a": torch.ones(3)}
    assert distributed.reduce_mean_(one, fisher) is fisher and distributed.any_rank(one, True)
    masks = {"a": torch.tensor([True, False, True])}
    assert distributed.broadcast_masks(one, masks, ["a"]) is masks
    assert distributed.kept_counts(one, masks, set()) == {"a": 2}
