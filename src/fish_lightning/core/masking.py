"""Masked optimizer steps: frozen entries stay bit-identical through any torch optimizer.

Pure torch; no Lightning import. Zeroing gradients is not enough: AdamW's decoupled weight
decay and momentum accumulated during dense warmup move entries whose gradient is zero. So
:class:`FrozenEntryGuard` snapshots the guarded parameters in the optimizer's step pre-hook and
writes the frozen entries back in its post-hook. Kept entries get exactly the optimizer's update.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fish_lightning.core.sharding import local

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """Bool mask (any shape) -> uint8 tensor of ``ceil(numel / 8)`` bytes, MSB first (on CPU)."""
    flat = mask.detach().reshape(-1).to("cpu", torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`: a CPU bool tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    bits = packed.to("cpu", torch.uint8).unsqueeze(1).bitwise_and(_BIT_WEIGHTS).ne(0)
    return bits.reshape(-1)[:numel].reshape(tuple(shape)).clone()


@torch.no_grad()
def mask_gradients(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero the gradients of frozen entries in place (they then drop out of gradient clipping)."""
    for n, m in masks.items():
        g = params[n].grad
        if g is not None:
            local(g).masked_fill_(~m, 0.0)  # (not mul_: inf * 0 would be NaN)


class FrozenEntryGuard:
    """Keeps the frozen entries of some parameters bit-identical across ``optimizer.step()``.

    Args:
        optimizer: any ``torch.optim.Optimizer``; only its parameters that have a mask with at
            least one frozen entry are guarded.
        masks: parameter -> bool mask (True = trainable entry), same shape and device.

    Args:
        snapshot_in_pre_hook: copy the guarded tensors in the step pre-hook; ``False`` when the caller
            calls :meth:`snapshot` itself before every step.

    Memory: a copy of each guarded tensor from the snapshot until the step ends; nothing kept
    between steps. Under Lightning the closure (forward
    and backward) runs inside ``optimizer.step()``, after the pre-hook, so the callback calls
    :meth:`snapshot` from ``on_before_optimizer_step`` to avoid holding the copy through them.
    """

    def __init__(
        self, optimizer: Optimizer, masks: Mapping[nn.Parameter, Tensor], snapshot_in_pre_hook: bool = True
    ) -> None:
        self.snapshot_in_pre_hook = snapshot_in_pre_hook
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._guarded = [(p, m) for p, m in masks.items() if id(p) in in_opt and not bool(m.all())]
        self._saved: list[Tensor] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    @property
    def num_guarded(self) -> int:
        return len(self._guarded)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the guarded tensors now (parameters must not change before the step). Once per step: a closure
        optimizer (LBFGS) evaluates the loss, and so reaches this point, several times inside one ``step()``
        after moving the parameters; the copy taken first is kept until the step's post-hook."""
        if not self._saved:
            self._saved = [local(p).detach().clone() for p, _ in self._guarded]

    def _pre(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        if self.snapshot_in_pre_hook and not self._saved:
            self.snapshot()

    @torch.no_grad()
    def _post(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._guarded:
            return
        if not self._saved:
            raise RuntimeError(
                "FrozenEntryGuard: the optimizer stepped without a snapshot of the guarded tensors, so frozen "
                "entries may have moved: call snapshot() before optimizer.step() or use snapshot_in_pre_hook=True"
            )
        for (p, m), old in zip(self._guarded, self._saved):
            t = local(p).detach()
            t.copy_(torch.where(m, t, old))
        self._saved = []

    def remove(self) -> None:
        """Detach the hooks from the optimizer."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._saved = []
