"""Masked optimizer steps: frozen entries stay bit-identical through any torch optimizer.

Pure torch; no Lightning import. Zeroing gradients is not enough: AdamW's decoupled weight
decay and momentum accumulated during dense warmup move entries whose gradient is zero. So
:class:`FrozenEntryGuard` snapshots the guarded parameters in the optimizer's step pre-hook and
writes the frozen entries back in its post-hook. Kept entries get exactly the optimizer's update.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fish_lightning.core import flat
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
    """Zero the gradients of frozen entries in place (they then drop out of gradient clipping).

    Batched (:mod:`fish_lightning.core.flat`): a few aten ops per group of tensors, not per tensor. The
    int32 index of the frozen (or kept) entries is made once per set of masks and cached by their identity.
    Frozen entries become +0.0 whatever they held (inf and NaN included, as with ``masked_fill_``).
    Gradients masked by the previous call and not modified since (the same tensors, at the same version
    counter) are left alone: the callback masks after the backward and again right before the step
    (a write through ``.data``, which has its own version counter, is not seen as a change).
    """
    global _last_masked
    grads, ms = [], []
    for n, m in masks.items():
        g = params[n].grad
        if g is not None:
            grads.append(local(g))
            ms.append(m)
    if not grads:
        return
    groups = flat.cached_plan(grads, ms)
    if not groups:  # every mask keeps everything
        return
    last = _last_masked
    if (
        last is not None
        and last[0]() is groups[0]
        and len(last[1]) == len(grads)
        and all(r() is g and v == g._version for (r, v), g in zip(last[1], grads))
    ):
        return
    for group in groups:
        ts = [grads[i] for i in group.members]
        buf, in_place = flat.flat(ts)
        if group.kept:  # few kept: keep them, zero everything
            vals = buf.index_select(0, group.idx)
            buf.zero_()
            buf.index_put_((group.idx,), vals)
        else:  # few frozen: zero them
            buf.index_put_((group.idx,), group.zero)
        if not in_place:
            flat.write_back(buf, ts)
    _last_masked = (weakref.ref(groups[0]), [(weakref.ref(g), g._version) for g in grads])


#: (the plan's first group, [(a gradient, its version after masking)]) of the last mask_gradients call, weakly
_last_masked: tuple[weakref.ref, list[tuple[weakref.ref, int]]] | None = None


class FrozenEntryGuard:
    """Keeps the frozen entries of some parameters bit-identical across ``optimizer.step()``.

    Args:
        optimizer: any ``torch.optim.Optimizer``; only its parameters that have a mask with at
            least one frozen entry are guarded.
        masks: parameter -> bool mask (True = trainable entry), same shape and device (the rank's
            shard for an FSDP2 parameter). Read once, here: the guard keeps an int32 index of the
            kept or the frozen entries (whichever are fewer), not the masks.
        snapshot_in_pre_hook: copy the guarded tensors in the step pre-hook; ``False`` when the caller
            calls :meth:`snapshot` itself before every step.

    Memory: the index (``4 * min(kept, frozen)`` bytes); a copy of the guarded tensors from the snapshot
    until the step ends, plus, in the post-hook, one group's flat copy (:data:`~fish_lightning.core.flat.
    GROUP_ENTRIES` entries at most). Under Lightning the closure (forward and backward) runs inside
    ``optimizer.step()``, after the pre-hook, so the callback calls :meth:`snapshot` from
    ``on_before_optimizer_step`` to avoid holding the copy through them.

    Ops per step: a few per group of guarded tensors (one device and dtype, at most ``GROUP_ENTRIES``
    entries), not per tensor.
    """

    def __init__(
        self, optimizer: Optimizer, masks: Mapping[nn.Parameter, Tensor], snapshot_in_pre_hook: bool = True
    ) -> None:
        self.snapshot_in_pre_hook = snapshot_in_pre_hook
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        guarded = [(p, m) for p, m in masks.items() if id(p) in in_opt and not bool(m.all())]
        self._params = [p for p, _ in guarded]
        self._groups = flat.plan([local(p) for p in self._params], [m for _, m in guarded])
        self._saved: list[Tensor] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    @property
    def num_guarded(self) -> int:
        return len(self._params)

    @property
    def index_bytes(self) -> int:
        """Bytes of the guard's resident index."""
        return sum(g.idx.numel() * g.idx.element_size() for g in self._groups)

    def _tensors(self, group: flat.Group) -> list[Tensor]:
        return [local(self._params[i]) for i in group.members]

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the guarded tensors now (parameters must not change before the step). Once per step: a closure
        optimizer (LBFGS) evaluates the loss, and so reaches this point, several times inside one ``step()``
        after moving the parameters; the copy taken first is kept until the step's post-hook."""
        if self._saved is None:
            self._saved = [flat.flat_copy(self._tensors(g)) for g in self._groups]

    def _pre(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        if self.snapshot_in_pre_hook and self._saved is None:
            self.snapshot()

    @torch.no_grad()
    def _post(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._params:
            return
        if self._saved is None:
            raise RuntimeError(
                "FrozenEntryGuard: the optimizer stepped without a snapshot of the guarded tensors, so frozen "
                "entries may have moved: call snapshot() before optimizer.step() or use snapshot_in_pre_hook=True"
            )
        saved, self._saved = self._saved, None
        for group, old in zip(self._groups, saved):
            ts = self._tensors(group)
            cur, in_place = flat.flat(ts)
            if group.kept:  # few kept: their new values into the snapshot, the snapshot back
                old.index_put_((group.idx,), cur.index_select(0, group.idx))
                if in_place:
                    cur.copy_(old)
                else:
                    flat.write_back(old, ts)
            else:  # few frozen: their old values back
                cur.index_put_((group.idx,), old.index_select(0, group.idx))
                if not in_place:
                    flat.write_back(cur, ts)

    def remove(self) -> None:
        """Detach the hooks from the optimizer."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._saved = None
