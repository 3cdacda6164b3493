"""What :class:`~fish_lightning.integrations.transformers.FishTrainerCallback` reads off a ``transformers.Trainer``:
the masker's host over it, the Trainer whose ``train()`` runs, the ``num_items_in_batch`` it hands
``compute_loss``, the FISH state of a checkpoint folder, and the refusals of what cannot be guarded."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer

from fish_lightning.masker.host import LoopHost
from fish_lightning.masker.settings import FishSettings

#: The file, in each checkpoint folder the Trainer saves, that holds the FISH state (``torch.load``-able with
#: ``weights_only=True``).
STATE_FILE = "fish_state.pt"


class TrainerHost:
    """The masker's :class:`~fish_lightning.masker.host.Host` over a ``transformers.Trainer``: its step and epoch
    counters, the torch optimizer inside accelerate's wrapper, accelerate's ``GradScaler`` (fp16), and
    ``torch.distributed`` collectives (DDP)."""

    def __init__(self, trainer: Trainer, optimizer: Optimizer) -> None:
        self.trainer = trainer
        self.optimizers: list[Optimizer] = [optimizer]
        self.loggers: list[Any] = []
        self.accumulate_grad_batches = max(1, int(trainer.args.gradient_accumulation_steps))
        self.scaler = getattr(trainer.accelerator, "scaler", None)
        self._dist = LoopHost()

    @property
    def global_step(self) -> int:
        return int(self.trainer.state.global_step)

    @property
    def current_epoch(self) -> int:
        """Completed epochs (``state.epoch`` is fractional within an epoch and whole at its end)."""
        return int(math.floor((self.trainer.state.epoch or 0.0) + 1e-9))

    @property
    def world_size(self) -> int:
        return self._dist.world_size

    @property
    def global_rank(self) -> int:
        return self._dist.global_rank

    @property
    def precision_plugin(self) -> TrainerHost:
        return self  # (``.scaler``)

    @property
    def strategy(self) -> TrainerHost:
        return self  # (``reduce``, ``broadcast``, ``root_device``)

    @property
    def root_device(self) -> torch.device:
        return torch.device(self.trainer.args.device)

    def reduce(self, tensor: Tensor, reduce_op: str = "mean") -> Tensor:
        return self._dist.reduce(tensor, reduce_op)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self._dist.broadcast(obj, src)


class ItemsSeen:
    """Records the ``num_items_in_batch`` the Trainer hands ``compute_loss`` for the current micro-batch and hands
    the loss it returns to ``after``, by an instance attribute over the Trainer's method (``remove()`` takes it
    away again)."""

    def __init__(self, trainer: Trainer, after: Callable[[Any], None]) -> None:
        self.trainer, self.items = trainer, None
        original = trainer.compute_loss

        def compute_loss(model: nn.Module, inputs: Any, *args: Any, num_items_in_batch: Any = None,
                         **kwargs: Any) -> Any:  # fmt: skip
            self.items = num_items_in_batch
            loss = original(model, inputs, *args, num_items_in_batch=num_items_in_batch, **kwargs)
            after(loss)
            return loss

        trainer.compute_loss = compute_loss  # type: ignore[method-assign]

    def remove(self) -> None:
        self.trainer.__dict__.pop("compute_loss", None)
        self.items = None


def find_trainer() -> tuple[Trainer | None, str | None]:
    """The ``Trainer`` whose ``train()`` is running (the callback events do not pass it), and the checkpoint folder
    it resumes from (``train(resume_from_checkpoint=...)``, resolved; ``None`` for a fresh run)."""
    frame = sys._getframe(1)
    found = None
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            if frame.f_code.co_name in ("_inner_training_loop", "train"):
                folder = frame.f_locals.get("resume_from_checkpoint")
                return owner, os.fspath(folder) if isinstance(folder, (str, os.PathLike)) else None
            found = found or owner
        frame = frame.f_back
    return found, None


def load_checkpoint_state(folder: str) -> dict[str, Any]:
    """The FISH state of a checkpoint folder the Trainer saved with ``FishTrainerCallback``."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"resume_from_checkpoint={folder!r} has no {STATE_FILE}: it was not saved by a run with "
                         "FishTrainerCallback, so the FISH mask/Fisher cannot be restored; resume from a checkpoint "
                         "of a FISH run, or start a new run")  # fmt: skip
    return torch.load(path, map_location="cpu", weights_only=True)


def check_trainer(settings: FishSettings, trainer: Trainer, optimizer: Any) -> None:
    """Refuse, by name, what the callback cannot guard, with what to use instead."""
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(args, "deepspeed", None):
        raise ValueError("FishTrainerCallback does not support DeepSpeed (TrainingArguments.deepspeed): ZeRO "
                         "partitions and steps the parameters itself, so frozen entries cannot be guarded. Train "
                         "without deepspeed (one process, or DDP with torchrun), or use FSDP2 through Lightning's "
                         "FisherMaskCallback")  # fmt: skip
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(args, "fsdp", None):
        raise ValueError(f"FishTrainerCallback does not support FSDP (TrainingArguments.fsdp={args.fsdp!r}): "
                         "train without fsdp (one process, or DDP with torchrun), or use FSDP2 through Lightning's "
                         "FisherMaskCallback")  # fmt: skip
    if args.n_gpu > 1:
        raise ValueError(f"FishTrainerCallback does not support DataParallel over {args.n_gpu} GPUs in one process: "
                         "launch one process per GPU with torchrun (DDP), or expose one GPU (CUDA_VISIBLE_DEVICES)")
    optim = str(getattr(args.optim, "value", args.optim))
    if "lomo" in optim:
        raise ValueError(f"FishTrainerCallback does not support optim={optim!r}: LOMO updates the parameters "
                         "inside the backward, before anything can mask them; use optim='adamw_torch' (or any "
                         "torch optimizer)")  # fmt: skip
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"FishTrainerCallback needs a torch.optim.Optimizer; the Trainer's is "
                         f"{type(optimizer).__name__}: pass optimizers=(torch.optim.AdamW(...), None) or a torch "
                         "optim name")  # fmt: skip
    if args.label_smoothing_factor:
        raise ValueError(f"FishTrainerCallback does not support label_smoothing_factor={args.label_smoothing_factor}"
                         ": the Trainer's label smoother reduces over all tokens of the batch, so the per-example "
                         "Fisher cannot be recovered; use label_smoothing_factor=0")  # fmt: skip
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError("FishTrainerCallback does not support compute_loss_func: its reduction over examples is "
                         "unknown to the per-example Fisher; override Trainer.compute_loss to return the mean "
                         "(loss_reduction='mean') or sum ('sum') of one loss per example, without labels in the "
                         "model's inputs")  # fmt: skip
    refused = {"calibration_samples": (settings.calibration_samples, "the warmup Fisher (warmup_steps=N) or "
                                       "mask_path"),
               "reselect_every_n_steps": (settings.reselect_every_n_steps, "a fixed mask (None)"),
               "sparse_optimizer_state": (settings.sparse_optimizer_state or None, "sparse_optimizer_state=False "
                                          "(frozen entries are written back after each step)")}  # fmt: skip
    for name, (value, instead) in refused.items():
        if value is not None:
            raise ValueError(f"FishTrainerCallback does not support {name}={value!r} (Lightning's FisherMaskCallback "
                             f"does): use {instead}")  # fmt: skip
    epochs = trainer.state.num_train_epochs
    if settings.mask_epoch is not None and epochs and settings.mask_epoch >= epochs:
        raise ValueError(f"mask_epoch={settings.mask_epoch} is past the run: the Trainer trains {epochs} epochs "
                         f"(0..{epochs - 1}); use mask_epoch < {epochs} or mask_epoch=None")  # fmt: skip
