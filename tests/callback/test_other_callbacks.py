"""Other callbacks that rebuild the optimizer's param groups (``BaseFinetuning`` on resume) cannot undo the mask:
the enforcer checks every step that the optimizers hold what it installed, and ``verify()`` names kept entries no
optimizer trains."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback, ModelCheckpoint

from conftest import TinyClassifier, make_loader, make_trainer
from fish_lightning import FisherMaskCallback


class KeepGroups(BaseFinetuning):
    """Freezes nothing; like every ``BaseFinetuning``, it restores the param groups by name at fit start."""

    def freeze_before_training(self, pl_module):
        pass

    def finetune_function(self, pl_module, current_epoch, optimizer):
        pass


def fit(sparse, tmp_path=None, ckpt_path=None):
    model = TinyClassifier()
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=4, mask_epoch=1, sparse_optimizer_state=sparse, strict=True)
    extra = [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")] if tmp_path else []
    make_trainer([cb, KeepGroups(), *extra], max_epochs=4, enable_checkpointing=bool(extra)).fit(
        model, make_loader(), ckpt_path=ckpt_path
    )
    return model, cb


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse_state"])
def test_base_finetuning_listed_after_fish_resumed_after_the_freeze_trains_the_kept_entries(sparse, tmp_path):
    full, _ = fit(sparse, tmp_path)
    resumed, cb = fit(sparse, ckpt_path=tmp_path / "epoch=1.ckpt")
    for (n, p), q in zip(resumed.named_parameters(), full.parameters()):
        assert torch.equal(p, q), n
    assert cb.verify(resumed)["frozen_unchanged"]


class RebuildGroupsAt(Callback):
    """Puts the model's own parameters back into the optimizer at global step ``step`` (as a careless callback
    would after the freeze)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            (opt,) = trainer.optimizers
            opt.param_groups[0]["params"] = list(pl_module.parameters())


def test_param_groups_rebuilt_after_the_freeze_are_enforced_again_dense(one_thread):
    model = TinyClassifier()
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=4, mask_epoch=1, strict=True)
    before = {}

    class Snap(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 12:
                before.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    make_trainer([cb, RebuildGroupsAt(12), Snap()], max_epochs=3).fit(model, make_loader())
    for n, p in model.named_parameters():
        m = cb.masks[n]
        assert torch.equal(p[~m], before[n][~m]), n
    assert cb.verify(model) | {"moved": [], "untrained": []} == cb.verify(model)


def test_param_groups_rebuilt_during_training_with_sparse_state_are_refused(one_thread):
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=4, mask_epoch=1, sparse_optimizer_state=True)
    with pytest.raises(RuntimeError, match=r"param groups were rebuilt during training .* sparse_optimizer_state"):
        make_trainer([cb, RebuildGroupsAt(12)], max_epochs=3).fit(TinyClassifier(), make_loader())


def test_verify_names_kept_entries_no_optimizer_trains(one_thread):
    model = TinyClassifier()
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=4, mask_epoch=1, sparse_optimizer_state=True)
    seen = {}

    class Check(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 10 and not seen:
                (opt,) = trainer.optimizers
                group = opt.param_groups[0]
                first = group["params"][0]
                group["params"] = group["params"][1:]  # a compact tensor leaves the optimizer
                seen["report"] = cb.verify(pl_module)
                group["params"] = [first, *group["params"]]

    make_trainer([cb, Check()], max_epochs=2).fit(model, make_loader())
    assert seen["report"]["untrained"] == ["net.0.weight"] and seen["report"]["frozen_unchanged"]
