"""What the lifecycle needs from whatever runs the loop: counters, the loss scale, collectives, loggers.

A Lightning ``Trainer`` has every attribute of :class:`Host` already; :class:`LoopHost` provides them for a plain
loop (``torch.distributed`` when a process group is initialised).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.optim import Optimizer


class Host(Protocol):
    """The attributes the phase objects read. ``strategy``: ``reduce(tensor, reduce_op="mean"|"sum")``,
    ``broadcast(obj, src=0)``, ``root_device``; ``precision_plugin.scaler``: the AMP ``GradScaler`` or ``None``."""

    world_size: int
    global_rank: int
    global_step: int
    current_epoch: int
    accumulate_grad_batches: int
    optimizers: list[Optimizer]
    loggers: list[Any]
    strategy: Any
    precision_plugin: Any


class LoopHost:
    """:class:`Host` for a plain loop: the masker counts steps, the caller sets the epoch
    (:meth:`~fish_lightning.masker.masker.FishMasker.set_epoch`)."""

    def __init__(self, grad_accumulation: int = 1) -> None:
        self.global_step, self.current_epoch = 0, 0
        self.accumulate_grad_batches = grad_accumulation
        self.optimizers: list[Optimizer] = []
        self.loggers: list[Any] = []
        self.scaler: torch.amp.GradScaler | None = None

    @property
    def precision_plugin(self) -> LoopHost:
        return self  # (``.scaler``)

    @property
    def strategy(self) -> LoopHost:
        return self  # (``reduce``, ``broadcast``, ``root_device``)

    @staticmethod
    def _dist() -> Any:
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() else None

    @property
    def world_size(self) -> int:
        dist = self._dist()
        return dist.get_world_size() if dist else 1

    @property
    def global_rank(self) -> int:
        dist = self._dist()
        return dist.get_rank() if dist else 0

    @property
    def root_device(self) -> torch.device:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        dist = self._dist()
        if dist is None:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.div_(dist.get_world_size()) if reduce_op == "mean" else out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        dist = self._dist()
        if dist is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
