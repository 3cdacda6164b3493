"""sparse_optimizer_state: optimizer state for kept entries only, same result as the dense masked run;
verify(): frozen entries proven unchanged (and caught when they are not)."""

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from test_peft_e2e import lora_module, token_batches

from conftest import SnapshotAtFreeze, TinyClassifier, make_loader, make_trainer
from fish_lightning import FisherMaskCallback, num_kept
from fish_lightning.core.sparse_state import CompactOptimizer, optimizer_state_bytes


def make_cb(sparse, **kw):
    opts = dict(sparsity=0.9, warmup_steps=4, mask_epoch=1, sparse_optimizer_state=sparse)
    opts.update(kw)
    return FisherMaskCallback(**opts)


class StateProbe(Callback):
    """Records the optimizer's per-entry state size at the end of training."""

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.entries = sum(v.numel() for st in opt.state.values() for v in st.values() if v.dim() > 0)
        self.bytes = optimizer_state_bytes(opt)


def fit(cb, model=None, loader=None, extra=(), max_epochs=3, **kw):
    model = model or TinyClassifier()
    snap, probe = SnapshotAtFreeze(cb), StateProbe()
    make_trainer([cb, snap, probe, *extra], max_epochs=max_epochs, **kw).fit(model, loader or make_loader())
    return model, snap, probe


@pytest.mark.parametrize("optimizer, clip", [("adamw", None), ("sgd", 0.05)])
def test_full_finetuning_sparse_state_matches_dense_masked(optimizer, clip):
    dense_cb, sparse_cb = make_cb(False), make_cb(True)
    dense, _, dense_probe = fit(dense_cb, TinyClassifier(optimizer=optimizer), gradient_clip_val=clip)
    sparse, snap, probe = fit(sparse_cb, TinyClassifier(optimizer=optimizer), gradient_clip_val=clip)
    kept = sparse_cb.num_kept
    per_entry = 2 if optimizer == "adamw" else 1  # Adam: exp_avg + exp_avg_sq; SGD: momentum buffer
    assert probe.entries == per_entry * kept  # state for no more than the kept entries (plus scalars)
    assert dense_probe.entries == per_entry * dense_cb.num_candidates
    for (n, p), q in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        m = sparse_cb.masks[n]
        assert torch.equal(p[~m], snap.at_freeze[n][~m]), n  # frozen entries bit-identical
    # cb.masks is rebuilt from the compact optimizer's int32 indices: no bool mask (1 B/candidate) is kept
    assert type(sparse_cb.masks).__name__ == "CompactMasks" and not sparse_cb.masks._rest
    assert list(sparse_cb.masks) == list(dense_cb.masks)
    for n, m in dense_cb.masks.items():
        assert sparse_cb.masks[n].dtype == torch.bool and torch.equal(sparse_cb.masks[n], m), n


def test_lora_sparse_state_matches_dense_masked():
    results = []
    for sparse in (False, True):
        module = lora_module("lora")
        cb = make_cb(sparse, warmup_steps=3)
        make_trainer([cb], max_epochs=2, limit_val_batches=0).fit(module, token_batches())
        results.append((module, cb))
    (dense, _), (sparse, cb) = results
    for (n, p), q in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    assert cb.verify(sparse)["frozen_unchanged"]


@pytest.mark.parametrize("reselect", [None, 5])
@pytest.mark.parametrize("ckpt_epoch", [0, 2])  # during warmup / after the freeze
def test_sparse_state_resume_equals_uninterrupted(tmp_path, ckpt_epoch, reselect):
    def cb():
        return make_cb(True, sparsity=0.7, warmup_steps=12, mask_epoch=2, reselect_every_n_steps=reselect)

    full, _, _ = fit(cb(), max_epochs=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(cb(), max_epochs=4, extra=[ckpt], enable_checkpointing=True)
    path = tmp_path / f"epoch={ckpt_epoch}.ckpt"
    if ckpt_epoch == 2 and reselect is None:  # the checkpoint holds the compact state: kept entries only
        opt_state = torch.load(path, weights_only=False)["optimizer_states"][0]["state"]
        n_entries = sum(v.numel() for st in opt_state.values() for v in st.values() if v.dim() > 0)
        assert n_entries == 2 * num_kept(sum(p.numel() for p in full.parameters()), 0.7)
    resumed = TinyClassifier()
    make_trainer([cb()], max_epochs=4).fit(resumed, make_loader(), ckpt_path=path)
    for (n, p), q in zip(resumed.named_parameters(), full.parameters()):
        assert torch.equal(p, q), n


def test_compact_optimizer_moves_state_and_drops_fully_frozen():
    a, b, c = (torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3))
    opt = torch.optim.Adam([a, b, c], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        sum((t**2).sum() for t in (a, b, c)).backward()
        opt.step()
    m_a = torch.zeros(4, 3, dtype=torch.bool)
    m_a[0, 1] = m_a[3, 2] = True
    exp_avg = opt.state[a]["exp_avg"][m_a].clone()
    comp = CompactOptimizer(
        opt, {a: m_a, b: torch.zeros(4, 3, dtype=torch.bool), c: torch.ones(4, 3, dtype=torch.bool)}
    )
    params = opt.param_groups[0]["params"]
    assert len(params) == 2 and params[1] is c and params[0].shape == (2,)
    assert torch.equal(opt.state[params[0]]["exp_avg"], exp_avg) and b not in opt.state
    before_a, before_b = a.detach().clone(), b.detach().clone()
    opt.zero_grad()
    sum((t**2).sum() for t in (a, b, c)).backward()
    comp.gather_grads()
    opt.step()
    assert torch.equal(a[~m_a], before_a[~m_a]) and not torch.equal(a[m_a], before_a[m_a])
    assert torch.equal(b, before_b) and a.grad is None and b.grad is None
    comp.remove()


class MoveFrozenEntry(Callback):
    def __init__(self, fish):
        self.fish = fish

    def on_train_end(self, trainer, pl_module):
        name, m = next(iter(self.fish.masks.items()))
        with torch.no_grad():
            flat = dict(pl_module.named_parameters())[name].view(-1)
            flat[(~m).reshape(-1).nonzero()[0]] += 1.0


@pytest.mark.parametrize("sparse", [False, True])
def test_verify_reports_exact_kept_and_catches_moved_entries(sparse):
    cb = make_cb(sparse)
    model, _, _ = fit(cb)
    report = cb.verify(model)
    assert report["frozen_unchanged"] and report["kept"] == num_kept(report["candidates"], 0.9) == cb.num_kept
    cb = make_cb(sparse)
    with pytest.warns(UserWarning, match="FISH verify: frozen entries moved in 1 tensors"):
        model, _, _ = fit(cb, extra=[MoveFrozenEntry(cb)])
    assert cb.verify(model)["frozen_unchanged"] is False
    cb = make_cb(sparse, strict=True)
    with pytest.raises(RuntimeError, match="frozen entries moved"):
        fit(cb, extra=[MoveFrozenEntry(cb)])


@pytest.mark.parametrize("sparse", [False, True])
def test_reselection_keeps_exactly_k_and_zeroes_new_state(sparse):
    masks_seen = []

    class Record(Callback):
        def __init__(self, fish):
            self.fish = fish

        def on_train_batch_end(self, trainer, pl_module, *args):
            if self.fish.frozen and (not masks_seen or self.fish.reselections != masks_seen[-1][0]):
                masks_seen.append((self.fish.reselections, {n: m.clone() for n, m in self.fish.masks.items()}))

    cb = make_cb(sparse, warmup_steps=3, mask_epoch=None, reselect_every_n_steps=5)
    model, _, _ = fit(cb, extra=[Record(cb)], max_epochs=3)
    k = num_kept(cb.num_candidates, 0.9)
    assert cb.reselections >= 3 and len(masks_seen) >= 3
    for _, masks in masks_seen:
        assert sum(int(m.sum()) for m in masks.values()) == k  # exactly k after each re-selection
    assert any(not all(torch.equal(a[n], b[n]) for n in a) for (_, a), (_, b) in zip(masks_seen, masks_seen[1:]))
    assert cb.verify(model)["frozen_unchanged"]  # entries frozen since the last re-selection did not move


def test_expand_restores_layout_with_zero_state_for_newly_kept():
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([a, b], lr=0.1)
    opt.zero_grad()
    ((a**2).sum() + (b**2).sum()).backward()
    opt.step()
    m = torch.tensor([True, False, True, False, False, False])
    kept_state = opt.state[a]["exp_avg"][m].clone()
    comp = CompactOptimizer(opt, {a: m, b: torch.zeros(3, dtype=torch.bool)})
    comp.expand()
    assert opt.param_groups[0]["params"] == [a, b] and b not in opt.state
    assert torch.equal(opt.state[a]["exp_avg"][m], kept_state) and not opt.state[a]["exp_avg"][~m].any()


def test_reselect_bad_input():
    with pytest.raises(ValueError, match="reselect_every_n_steps=0"):
        FisherMaskCallback(reselect_every_n_steps=0)
    with pytest.raises(ValueError, match="selection='random' would only reshuffle"):
        FisherMaskCallback(selection="random", reselect_every_n_steps=5)
