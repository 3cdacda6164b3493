"""Checkpoints written by fish-lightning 0.1.0 (before the callback split) still resume bit for bit."""

from pathlib import Path

import pytest
import torch

from conftest import TinyClassifier, make_loader, make_trainer
from fish_lightning import FisherMaskCallback

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXTRA = {"dense": {}, "sparse_state": {"sparse_optimizer_state": True}}


@pytest.mark.parametrize("case", list(EXTRA))
@pytest.mark.parametrize("epoch", [0, 2])  # 0: mid-warmup (Fisher in the checkpoint); 2: after the freeze (masks)
def test_legacy_checkpoint_resumes_to_the_uninterrupted_result(case, epoch, one_thread):
    folder = FIXTURES / f"legacy_{case}"
    final = torch.load(folder / "final_params.pt", weights_only=True)
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=12, mask_epoch=2, **EXTRA[case])
    model = TinyClassifier()
    make_trainer([cb], max_epochs=4).fit(model, make_loader(), ckpt_path=folder / f"epoch{epoch}.pt")
    for n, p in model.named_parameters():
        assert torch.equal(p, final[n]), n
    assert cb.num_kept == 59 and cb.verify()["frozen_unchanged"]


def test_legacy_checkpoint_loads_outside_fit():
    state = torch.load(FIXTURES / "legacy_dense" / "epoch2.pt", weights_only=True)["callbacks"]["FisherMaskCallback"]
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=12, mask_epoch=2)
    cb.load_state_dict(state)
    assert cb.freeze_step == 16 and cb.warmup_steps_done == 12
