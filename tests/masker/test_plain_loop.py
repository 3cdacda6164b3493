"""``FishMasker`` in a plain loop: three lines around an unchanged loop keep exactly k entries, leave every frozen
entry bit-identical, clip only kept gradients, give the exact per-example Fisher and round-trip its state."""

from __future__ import annotations

import io
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fish_lightning import FishMasker
from fish_lightning.core.fisher import per_example_fisher
from fish_lightning.core.selection import num_kept


class Net(nn.Module):
    """A model called as ``model(**batch).loss`` (the shape of a Hugging Face model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x, labels):
        logits = self.body(x)
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


def batches(n=12, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(b, 8, generator=g)
        out.append({"x": x, "labels": (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()})
    return out


def train(model, masker, optimizer, loader, accumulate=1, clip=1.0, record=None):
    for i, batch in enumerate(loader):  # the loop, with accumulation
        (model(**batch).loss / accumulate).backward()
        if (i + 1) % accumulate:
            continue
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        before = [p.detach().clone() for p in model.parameters()] if record is not None else None
        was_frozen = masker.frozen
        optimizer.step()
        optimizer.zero_grad()
        if record is not None and was_frozen:
            record.append(torch.cat([(p.detach() - q).reshape(-1) for p, q in zip(model.parameters(), before)]))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse_state"])
def test_plain_loop_keeps_k_and_freezes_the_rest(accumulate, sparse):
    model = Net()
    masker = FishMasker(model, sparsity=0.9, warmup_steps=3, mask_epoch=None, sparse_optimizer_state=sparse,
                        grad_accumulation=accumulate)
    optimizer = masker.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01))
    loader = batches()
    train(model, masker, optimizer, loader[: 3 * accumulate], accumulate)
    assert masker.frozen and masker.freeze_step == 3 and masker.warmup_steps_done == 3
    at_freeze = snapshot(model)
    train(model, masker, optimizer, loader[3 * accumulate:], accumulate)
    n = sum(p.numel() for p in model.parameters())
    assert masker.num_kept == num_kept(n, 0.9) == sum(int(m.sum()) for m in masker.masks.values())
    moved = 0
    for name, p in model.named_parameters():
        m = masker.masks[name]
        assert torch.equal(p[~m], at_freeze[name][~m]), name
        moved += int((p[m] != at_freeze[name][m]).sum())
    assert moved > 0
    report = masker.verify(model)
    assert report["frozen_unchanged"] and report["untrained"] == []


def test_clipping_after_the_freeze_sees_only_kept_entries():
    model = Net()
    masker = FishMasker(model, sparsity=0.9, warmup_steps=2, mask_epoch=None)
    optimizer = masker.wrap(torch.optim.SGD(model.parameters(), lr=1.0))
    updates = []
    train(model, masker, optimizer, batches(8), clip=0.01, record=updates)
    norms = torch.stack([u.norm() for u in updates])
    assert len(norms) == 6
    torch.testing.assert_close(norms, torch.full_like(norms, 0.01), rtol=1e-4, atol=0)


def test_warmup_fisher_equals_the_batch_size_one_loop():
    model, ref_model = Net(), Net()
    masker = FishMasker(model, sparsity=0.5, warmup_steps=3, mask_epoch=None, keep_fisher=True)
    optimizer = masker.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    params = dict(ref_model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in batches(3):
        per_example_fisher(lambda b: F.cross_entropy(ref_model.body(b["x"]), b["labels"], reduction="none"),
                           batch, params, expected)  # fmt: skip
        ref_model(**batch).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    train(model, masker, optimizer, batches(3), clip=None)
    assert masker.frozen
    for n, f in expected.items():
        err = (masker.fisher[n] - f).norm() / f.norm()
        assert err < 1e-4, (n, float(err))


def test_state_dict_round_trips_into_a_fresh_masker_that_keeps_enforcing():
    model = Net()
    masker = FishMasker(model, sparsity=0.8, warmup_steps=2, mask_epoch=None)
    optimizer = masker.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(model, masker, optimizer, batches(4))
    buf = io.BytesIO()
    torch.save({"fish": masker.state_dict(), "model": model.state_dict(), "opt": optimizer.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only=True: tensors and plain Python values only
    model2 = Net()
    model2.load_state_dict(saved["model"])
    masker2 = FishMasker(model2, sparsity=0.8, warmup_steps=2, mask_epoch=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # restored before wrap: no "not guarded" warning, wrap enforces
        masker2.load_state_dict(saved["fish"])
        optimizer2 = masker2.wrap(torch.optim.AdamW(model2.parameters(), lr=1e-2))
    optimizer2.load_state_dict(saved["opt"])
    assert masker2.frozen and {n: torch.equal(m, masker.masks[n]) for n, m in masker2.masks.items()} == \
        dict.fromkeys(masker.masks, True)  # fmt: skip
    before = snapshot(model2)
    train(model2, masker2, optimizer2, batches(4, seed=1))
    for n, p in model2.named_parameters():
        m = masker2.masks[n]
        assert torch.equal(p[~m], before[n][~m]) and (not m.any() or not torch.equal(p[m], before[n][m])), n


def test_random_mask_without_warmup_freezes_at_wrap():
    model = Net()
    init = snapshot(model)
    masker = FishMasker(model, sparsity=0.9, warmup_steps=0, mask_epoch=None, selection="random")
    optimizer = masker.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01))
    assert masker.frozen and masker.freeze_step == 0  # before any step
    train(model, masker, optimizer, batches(4))
    for n, p in model.named_parameters():
        m = masker.masks[n]
        assert torch.equal(p[~m], init[n][~m]) and (not m.any() or not torch.equal(p[m], init[n][m])), n


def test_bad_use_gets_one_error():
    model = Net()
    masker = FishMasker(model, sparsity=0.5, warmup_steps=2, mask_epoch=None)
    with pytest.raises(ValueError, match=r"holds none of the 4 FISH candidates"):
        masker.wrap(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    masker.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"wrap was called twice"):
        masker.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    other = Net()
    with pytest.raises(ValueError, match=r"does not support LBFGS"):
        FishMasker(other, sparse_optimizer_state=True, mask_epoch=None).wrap(torch.optim.LBFGS(other.parameters()))
    with pytest.raises(ValueError, match=r"sparse_optimizer_state='yes' must be True or False"):
        FishMasker(Net(), sparse_optimizer_state="yes")


def test_the_readme_snippet_runs_as_written():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "FishMasker(model" in b)
    model = Net()
    scope = {"torch": torch, "model": model, "loader": batches(24)}
    exec(code, scope)  # noqa: S102
    masker = scope["masker"]
    assert masker.frozen and masker.freeze_step == 20 and masker.verify(model)["frozen_unchanged"]
    assert masker.num_kept == num_kept(sum(p.numel() for p in model.parameters()), 0.9)


def test_grad_scaler_overflow_skips_one_step_and_the_fisher_stays_exact():
    """``masker.wrap(optimizer, scaler=GradScaler)``: a step ``scaler.step`` skips (inf loss) is left out of the
    warmup Fisher (its squares dropped, not counted); the rest equals the batch-size-1 loop at the same weights."""
    model = Net()
    masker = FishMasker(model, sparsity=0.5, warmup_steps=3, mask_epoch=None, keep_fisher=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = masker.wrap(torch.optim.SGD(model.parameters(), lr=0.0), scaler=scaler)  # lr 0: same weights
    data = batches(n=6)
    for i, batch in enumerate(data):
        loss = model(**batch).loss * (float("inf") if i in (1, 4) else 1.0)  # overflow in the warmup and after
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert masker.skipped_nonfinite_steps == 1 and masker.warmup_steps_done == 3 and masker.freeze_step == 3
    params = dict(model.named_parameters())
    reference = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in (data[0], data[2], data[3]):
        fisher, _ = per_example_fisher(lambda b: F.cross_entropy(model.body(b["x"]), b["labels"], reduction="none"),
                                       batch, params)  # fmt: skip
        for n in reference:
            reference[n] += fisher[n]
    err = sum(float((masker.fisher[n] - reference[n]).abs().sum()) for n in reference)
    assert err / sum(float(r.abs().sum()) for r in reference.values()) < 1e-4
    assert masker.verify(model)["frozen_unchanged"]
    masker.unwrap()  # every hook and wrapper gone: the scaler's own step, no hooks on the model
    assert "step" not in vars(scaler) and not model._forward_pre_hooks
    assert masker.verify(model)["frozen_unchanged"] and masker.num_kept == num_kept(masker.num_candidates, 0.5)
