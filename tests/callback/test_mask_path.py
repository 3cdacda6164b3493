"""mask_path: a saved mask applied instead of a selection (the warmup replayed, or skipped)."""

from __future__ import annotations

import pytest
import torch

from conftest import SnapshotAtFreeze, TinyClassifier, make_loader, make_trainer, params_of
from fish_lightning import FisherMaskCallback
from fish_lightning.core.mask_file import load_mask, save_mask


def run(cb):
    model = TinyClassifier()
    snap = SnapshotAtFreeze(cb)
    make_trainer([cb, snap], max_epochs=3).fit(model, make_loader())
    return model, snap


def test_saved_mask_reproduces_the_run_that_made_it(tmp_path, one_thread):
    ref_cb = FisherMaskCallback(sparsity=0.8, warmup_steps=4, mask_epoch=1)
    ref, _ = run(ref_cb)
    path = tmp_path / "fish_mask.safetensors"
    save_mask(ref_cb.masks, path)
    assert all(torch.equal(load_mask(path)[n], m) for n, m in ref_cb.masks.items())
    cb = FisherMaskCallback(sparsity=0.8, warmup_steps=4, mask_epoch=1, mask_path=str(path), strict=True)
    model, snap = run(cb)
    assert cb.fisher is None and cb.num_kept == ref_cb.num_kept and cb.freeze_step == ref_cb.freeze_step
    for n, m in ref_cb.masks.items():
        assert torch.equal(cb.masks[n], m), n
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):  # same dense warmup, same mask: same run
        assert torch.equal(p, q), n


def test_saved_mask_at_fit_start_trains_only_its_entries(tmp_path, one_thread):
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.3
             for n, p in TinyClassifier().named_parameters()}  # fmt: skip
    path = tmp_path / "m.safetensors"
    save_mask(masks, path)
    init = params_of(TinyClassifier())
    cb = FisherMaskCallback(warmup_steps=0, mask_epoch=None, mask_path=path, strict=True)
    model, _ = run(cb)
    assert cb.freeze_step == 0 and cb.num_kept == sum(int(m.sum()) for m in masks.values())
    final = params_of(model)
    for n, m in masks.items():
        assert torch.equal(final[n][~m], init[n][~m]) and bool((final[n][m] != init[n][m]).any()), n


def test_a_mask_that_does_not_fit_names_the_first_mismatch(tmp_path):
    good = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in TinyClassifier().named_parameters()}
    path = tmp_path / "m.safetensors"
    save_mask({**good, "net.0.weight": torch.ones(3, 3, dtype=torch.bool)}, path)
    with pytest.raises(ValueError, match=r"mask .net.0.weight. has shape \[3, 3\] but the candidate has shape"):
        run(FisherMaskCallback(warmup_steps=0, mask_epoch=None, mask_path=path))
    save_mask({n: m for n, m in good.items() if n != "net.2.bias"}, path)
    with pytest.raises(ValueError, match=r"no mask for candidate 'net.2.bias'"):
        run(FisherMaskCallback(warmup_steps=0, mask_epoch=None, mask_path=path))
    with pytest.raises(ValueError, match=r"mask_path='nope.safetensors' is not a file"):
        FisherMaskCallback(mask_path="nope.safetensors")
    with pytest.raises(ValueError, match="cannot be combined with calibration_samples"):
        FisherMaskCallback(mask_path=path, calibration_samples=4)


def test_mask_path_resumed_before_the_freeze_still_applies_the_file(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    g = torch.Generator().manual_seed(3)
    given = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in TinyClassifier().named_parameters()}
    save_mask(given, tmp_path / "mask.safetensors")
    kw = dict(mask_path=str(tmp_path / "mask.safetensors"), warmup_steps=2, mask_epoch=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer([FisherMaskCallback(**kw), ckpt], max_epochs=3, enable_checkpointing=True).fit(
        TinyClassifier(), make_loader()
    )
    cb = FisherMaskCallback(**kw)
    make_trainer([cb], max_epochs=3).fit(TinyClassifier(), make_loader(), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert all(torch.equal(cb.masks[n], m) for n, m in given.items()) and cb.verify()["frozen_unchanged"]
