"""Run by tests/callback/test_ddp.py: 2-rank CPU DDP (gloo); each rank saves its masks and Fisher.

Usage: python ddp_script.py OUT_DIR {warmup,calibration,sparse,full,resume}
"""

import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # conftest
from conftest import TinyClassifier, make_loader  # noqa: E402
from fish_lightning import FisherMaskCallback  # noqa: E402


class Dump(pl.Callback):
    def __init__(self, fish, out, prefix="rank"):
        self.fish, self.out, self.prefix = fish, out, prefix

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"masks": self.fish.masks, "fisher": self.fish.fisher, "params": dict(pl_module.named_parameters())},
            os.path.join(self.out, f"{self.prefix}{trainer.global_rank}.pt"),
        )


def ddp_trainer(max_epochs: int, callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=max_epochs, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)  # fmt: skip


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    if mode in ("full", "resume"):  # per-example Fisher, checkpoint/resume during warmup (mask at epoch 2)
        from lightning.pytorch.callbacks import ModelCheckpoint

        cb = FisherMaskCallback(sparsity=0.8, warmup_steps=6, mask_epoch=2, keep_fisher=True)
        extra = [ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
        trainer = ddp_trainer(3, [cb, Dump(cb, out, prefix=mode), *extra])
        ckpt = os.path.join(out, "epoch=0.ckpt") if mode == "resume" else None
        trainer.fit(TinyClassifier(), make_loader(n=64, batch=8), ckpt_path=ckpt)
        return
    if mode == "calibration":
        cb = FisherMaskCallback(sparsity=0.8, warmup_steps=0, mask_epoch=None, calibration_samples=16, keep_fisher=True)
    else:  # "warmup", or "sparse": the same with optimizer state for kept entries only
        cb = FisherMaskCallback(sparsity=0.8, warmup_steps=4, mask_epoch=1, keep_fisher=True,
                                sparse_optimizer_state=mode == "sparse")  # fmt: skip
    trainer = ddp_trainer(2, [cb, Dump(cb, out)], enable_checkpointing=False)
    trainer.fit(TinyClassifier(), make_loader(n=64, batch=8))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
