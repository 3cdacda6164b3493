"""The warmup Fisher counts optimizer steps that had a backward, and an fp16 GradScaler overflow leaves out that one
step, not the steps before it."""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, Subset

from conftest import TinyClassifier, make_loader, make_trainer
from fish_lightning import FisherMaskCallback


class SkipOdd(TinyClassifier):
    """``training_step`` returns ``None`` (no backward) on odd batches."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx % 2 else super().training_step(batch, batch_idx)


class OverflowAt(TinyClassifier):
    """Batch ``at``'s loss is infinite (its gradients overflow); ``skip=True``: return ``None`` there instead."""

    def __init__(self, at: int = 2, skip: bool = False) -> None:
        super().__init__()
        self.at, self.skip = at, skip

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx != self.at:
            return loss
        return None if self.skip else loss * float("inf")


def fit(model, loader=None, **kw):
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=4, mask_epoch=None, keep_fisher=True)
    make_trainer([cb], max_epochs=2, **kw).fit(model, loader or make_loader())
    return cb


def test_steps_without_backward_are_not_warmup_steps(one_thread):
    cb = fit(SkipOdd())
    assert cb.warmup_steps_done == 4 and cb.freeze_step == 7  # batches 0, 2, 4, 6 had a backward
    loader = make_loader()
    even = DataLoader(Subset(loader.dataset, [i for i in range(64) if (i // 8) % 2 == 0]), batch_size=8)
    ref = fit(TinyClassifier(), even)  # the same four updates, without the skipped batches
    for n, f in ref.fisher.items():
        torch.testing.assert_close(cb.fisher[n], f, rtol=1e-6, atol=0)


def test_grad_scaler_overflow_skips_one_step_and_keeps_the_rest(one_thread):
    def amp():
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]

    cb = fit(OverflowAt(at=2), plugins=amp())
    assert (cb.warmup_steps_done, cb.skipped_nonfinite_steps) == (4, 1)
    ref = fit(OverflowAt(at=2, skip=True), plugins=amp())  # the same updates, batch 2 never reaching backward
    assert (ref.warmup_steps_done, ref.skipped_nonfinite_steps) == (4, 0)
    for n, f in ref.fisher.items():
        assert torch.isfinite(cb.fisher[n]).all() and f.abs().sum() > 0
        torch.testing.assert_close(cb.fisher[n], f, rtol=1e-5, atol=0)
