"""Run by tests/callback/test_fsdp.py: 2-rank CPU (gloo) training of a LoRA tiny BERT under FSDP2
(Lightning's ModelParallelStrategy + ``fully_shard``) or DDP; rank 0 saves the gathered masks,
Fisher and parameters.

Usage: python fsdp_script.py OUT_DIR {fsdp,ddp,full,resume} {per_example,batch_grad} {fisher,random} [EPOCH]
("full": FSDP2 over 4 epochs with the mask at epoch 2, checkpointing every epoch; "resume": the same from
the checkpoint of EPOCH that "full" wrote: 0 is mid-warmup, 2 is after the freeze.)
Environment: FISH_ACCELERATOR (default cpu; scripts/check_sharded_gpu.py sets gpu), FISH_PRECISION
(default 32-true).
"""

import os
import sys

import lightning.pytorch as pl
import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.join(TESTS, "adapters")]  # conftest, and the LoRA module of the adapter tests
from test_peft_e2e import lora_module, token_batches  # noqa: E402

from fish_lightning import FisherMaskCallback  # noqa: E402
from fish_lightning.app.classifier import SequenceClassifier  # noqa: E402
from fish_lightning.masker.collectives import gather_whole  # noqa: E402


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class ShardedClassifier(SequenceClassifier):
    """FSDP2: every transformer layer and the root sharded over the data-parallel mesh."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.base_model.model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class Record(pl.Callback):
    """Whole parameters at the freeze (start of epoch 1) and at the end, gathered on every rank."""

    def __init__(self, fish: FisherMaskCallback, out: str, tag: str) -> None:
        self.fish, self.out, self.tag, self.at_freeze = fish, out, tag, None
        self.hook_sum_shapes: dict[str, tuple[int, ...]] = {}  # what the per-example hooks accumulate into

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        hooks = getattr(self.fish.warmup, "hooks", None)
        if hooks is not None and not self.hook_sum_shapes:
            self.hook_sum_shapes = {n: tuple(t.shape) for n, t in hooks.sums.items()}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.fish.mask_epoch:
            self.at_freeze = {n: full(p).detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        fish, params = self.fish, dict(pl_module.named_parameters())

        def whole(t, n):
            return gather_whole(t, params[n]) if n in fish.sharded else t

        record = {
            "masks": {n: whole(m, n) for n, m in fish.masks.items()},
            "fisher": {n: whole(f, n) for n, f in (fish.fisher or {}).items()},
            "local_shapes": {n: tuple(m.shape) for n, m in fish.masks.items()},
            "hook_sum_shapes": self.hook_sum_shapes,
            "sharded": sorted(fish.sharded),
            "kept": fish.num_kept,
            "verify": fish.verify(pl_module),
            "at_freeze": self.at_freeze,
            "final": {n: full(p).detach().clone() for n, p in pl_module.named_parameters()},
        }
        torch.save(record, os.path.join(self.out, f"{self.tag}_rank{trainer.global_rank}.pt"))


def main(out: str, mode: str, estimator: str, selection: str, epoch: str = "0") -> None:
    torch.set_num_threads(1)
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = lora_module()
    if mode != "ddp":
        module = ShardedClassifier(module.model, num_labels=2, lr=1e-2, warmup_ratio=None)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    resumable = mode in ("full", "resume")  # 4 steps an epoch: the checkpoint of epoch 0 is mid-warmup
    cb = FisherMaskCallback(sparsity=0.8, warmup_steps=6 if resumable else 4, mask_epoch=2 if resumable else 1,
                            keep_fisher=True, fisher_estimator=estimator, selection=selection)  # fmt: skip
    tag = f"{mode}{epoch if mode == 'resume' else ''}_{estimator}_{selection}"
    callbacks = [cb, Record(cb, out, tag)]
    if resumable:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_top_k=-1, every_n_epochs=1,
                                         filename="{epoch}"))  # fmt: skip
    accelerator, precision = os.environ.get("FISH_ACCELERATOR", "cpu"), os.environ.get("FISH_PRECISION", "32-true")
    trainer = pl.Trainer(accelerator=accelerator, devices=2, strategy=strategy, precision=precision,
                         max_epochs=4 if resumable else 2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=resumable, limit_val_batches=0,
                         callbacks=callbacks)  # fmt: skip
    ckpt = os.path.join(out, "ckpt", f"epoch={epoch}.ckpt") if mode == "resume" else None
    trainer.fit(module, token_batches(n=64, batch=8), ckpt_path=ckpt)


if __name__ == "__main__":
    main(*sys.argv[1:6])
