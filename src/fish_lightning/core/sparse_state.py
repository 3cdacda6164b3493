"""Optimizer state for kept entries only, and a cheap proof that frozen entries did not move.

Pure torch; no Lightning import.

:class:`CompactOptimizer` rewires any ``torch.optim.Optimizer`` after the freeze: every partly
masked parameter ``p`` is replaced in its param group by a 1-D parameter ``c`` holding ``p``'s kept
entries (``c = p.flatten()[idx]``), and the optimizer state those entries accumulated (Adam's
moments, SGD's momentum, ...) moves along, gathered the same way. Fully frozen parameters leave the
optimizer. Each step, :meth:`CompactOptimizer.gather_grads` moves the kept gradients into ``c.grad``
(call it before gradient clipping) and a step post-hook writes ``c`` back into ``p``. Frozen entries
are then never seen by the optimizer, so they stay bit-identical and cost no optimizer state.

Gather and scatter are batched (:mod:`fish_lightning.core.flat`): a few aten ops per group of
tensors (one device and dtype, at most ``GROUP_ENTRIES`` entries), with one int32 index of the kept
entries per group; no bool mask is kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fish_lightning.core import flat
from fish_lightning.core.sharding import local


class CompactOptimizer:
    """Swap partly masked parameters of ``optimizer`` for compact parameters of their kept entries.

    Args:
        optimizer: the optimizer to rewire (in place; the same object keeps being stepped).
        masks: parameter -> bool mask (True = trained) of the same shape; read once, here.

    Memory: optimizer state and ``c`` scale with the kept entries; plus int32 indices (4 bytes per kept
    entry; int64 only for a group of 2**31 entries or more). Transient, per step: one group's flat copy of
    the dense gradients (gather) and of the parameters (scatter), ``GROUP_ENTRIES`` entries at most.
    """

    def __init__(self, optimizer: Optimizer, masks: Mapping[nn.Parameter, Tensor]) -> None:
        refuse_compact(optimizer)
        self.optimizer = optimizer
        self.dropped: list[nn.Parameter] = []  # fully frozen: out of the optimizer
        self.whole: list[nn.Parameter] = []  # masked but fully kept: stay dense in the optimizer
        self._layout = [list(g["params"]) for g in optimizer.param_groups]  # to expand() back
        self._p: list[nn.Parameter] = []  # partly masked parameters ...
        self._c: list[nn.Parameter] = []  # ... and their compact parameters
        compact_masks: list[Tensor] = []
        by_id = {id(p): m for p, m in masks.items()}
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                m = by_id.get(id(p))
                if m is None or bool(m.all()):
                    params.append(p)
                    if m is not None:
                        self.whole.append(p)
                    continue
                state = optimizer.state.pop(p, None)
                p.grad = None  # out of this optimizer, zero_grad() no longer clears it: start clean
                if not bool(m.any()):
                    self.dropped.append(p)
                    continue
                idx = m.reshape(-1).nonzero().squeeze(1).to(p.device)
                c = nn.Parameter(p.detach().reshape(-1)[idx].clone())
                if state:
                    odd = [k for k, v in state.items() if isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape]
                    if odd:
                        raise ValueError(
                            f"sparse_optimizer_state=True cannot compact {type(optimizer).__name__}: its state "
                            f"{odd} of a {tuple(p.shape)} parameter is not per entry; use sparse_optimizer_state=False"
                        )
                    optimizer.state[c] = {k: _gather_like(v, p, idx) for k, v in state.items()}
                del idx
                params.append(c)
                self._p.append(p)
                self._c.append(c)
                compact_masks.append(m)
            group["params"] = params
        self._groups = flat.plan([local(p) for p in self._p], compact_masks, side="kept")
        self._where = {}  # position in _p -> (group, member)
        for group in self._groups:
            for j, i in enumerate(group.members):
                self._where[i] = (group, j)
        self._handle = optimizer.register_step_post_hook(self._scatter)

    @property
    def pairs(self) -> list[tuple[nn.Parameter, Tensor, nn.Parameter]]:
        """``(p, kept flat indices of p, compact c)`` per compacted parameter (the indices are made now, from the
        grouped int32 index)."""
        return [(p, self.index_of(i), c) for i, (p, c) in enumerate(zip(self._p, self._c))]

    @property
    def compacted(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """``(p, c)``: each compacted parameter and the compact parameter the optimizer trains in its place."""
        return list(zip(self._p, self._c))

    def index_of(self, i: int) -> Tensor:
        group, j = self._where[i]
        return group.member_index(j)

    @property
    def index_bytes(self) -> int:
        """Bytes of the resident kept-entry indices."""
        return sum(g.idx.numel() * g.idx.element_size() for g in self._groups)

    def mask_builders(self) -> dict[int, Callable[[], Tensor]]:
        """``id(p)`` -> a function rebuilding ``p``'s bool mask (a new tensor) from this optimizer's int32
        indices, for every parameter it enforces a mask on. The functions hold the index groups (4 B per kept
        entry, shared with this optimizer), not the optimizer or the parameters."""
        out: dict[int, Callable[[], Tensor]] = {}
        for i, p in enumerate(self._p):
            group, j = self._where[i]
            out[id(p)] = partial(_mask_from_index, group, j, tuple(local(p).shape), local(p).device)
        for p in self.dropped:
            out[id(p)] = partial(torch.zeros, tuple(local(p).shape), dtype=torch.bool, device=local(p).device)
        for p in self.whole:
            out[id(p)] = partial(torch.ones, tuple(local(p).shape), dtype=torch.bool, device=local(p).device)
        return out

    @torch.no_grad()
    def masks(self) -> dict[nn.Parameter, Tensor]:
        """The bool masks (True = kept) this optimizer enforces, rebuilt from its indices: compacted, fully frozen
        (dropped) and fully kept parameters (new tensors; nothing here keeps them)."""
        out = {}
        for i, p in enumerate(self._p):
            m = torch.zeros(local(p).numel(), dtype=torch.bool, device=local(p).device)
            m[self.index_of(i)] = True
            out[p] = m.view(local(p).shape)
        out.update({p: torch.zeros_like(local(p), dtype=torch.bool) for p in self.dropped})
        out.update({p: torch.ones_like(local(p), dtype=torch.bool) for p in self.whole})
        return out

    @torch.no_grad()
    def gather_grads(self) -> None:
        """``c.grad += p.grad[kept]`` (``c.grad`` is created when ``None``: the optimizer's ``zero_grad`` clears
        it); the dense ``p.grad`` is released (also of dropped parameters). Call after every backward, so that
        gradient clipping and accumulation see the compact gradients."""
        for group in self._groups:
            ps = [self._p[i] for i in group.members]
            grads = [p.grad for p in ps]
            if any(g is None for g in grads):
                self._gather_one_by_one(group)
            else:
                buf, _ = flat.flat([local(g) for g in grads])
                vals = buf.index_select(0, group.idx)
                del buf
                cs = [self._c[i] for i in group.members]
                cgrads = [c.grad for c in cs]
                if all(g is None for g in cgrads):
                    for c, piece in zip(cs, flat.split_like(vals, cs)):
                        c.grad = piece
                elif all(g is not None for g in cgrads):
                    torch._foreach_add_(cgrads, flat.split_like(vals, cs))
                else:
                    for c, piece in zip(cs, flat.split_like(vals, cs)):
                        c.grad = piece.clone() if c.grad is None else c.grad.add_(piece)
            for p in ps:
                p.grad = None
        for p in self.dropped:
            p.grad = None

    def _gather_one_by_one(self, group: flat.Group) -> None:
        for j, i in enumerate(group.members):
            p, c = self._p[i], self._c[i]
            if p.grad is not None:
                g = local(p.grad).reshape(-1)[group.member_index(j)]
                c.grad = g if c.grad is None else c.grad.add_(g)

    @torch.no_grad()
    def _scatter(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        for group in self._groups:
            ts = [local(self._p[i]) for i in group.members]
            vals, _ = flat.flat([self._c[i] for i in group.members])  # (no_grad: no detach needed)
            buf, in_place = flat.flat(ts)
            buf.index_put_((group.idx,), vals.to(buf.dtype))
            if not in_place:
                flat.write_back(buf, ts)

    def state_bytes(self) -> int:
        """Bytes of tensor state the optimizer holds (all its parameters, compact ones included)."""
        return optimizer_state_bytes(self.optimizer)

    def remove(self) -> None:
        self._handle.remove()

    @torch.no_grad()
    def expand(self) -> None:
        """Undo the rewiring: the original parameters return to their groups, with their kept
        entries' state scattered back (zeros elsewhere; fully frozen ones start fresh)."""
        compact = {id(c): (p, i) for i, (p, c) in enumerate(zip(self._p, self._c))}
        for group in self.optimizer.param_groups:
            for c in group["params"]:
                if id(c) in compact:
                    p, i = compact[id(c)]
                    state = self.optimizer.state.pop(c, None)
                    if state:
                        idx = self.index_of(i).long()
                        self.optimizer.state[p] = {k: _scatter_like(v, p, idx, c) for k, v in state.items()}
        for group, params in zip(self.optimizer.param_groups, self._layout):
            group["params"] = params
        self.remove()
        self._p, self._c, self._groups, self._where, self.dropped, self.whole = [], [], [], {}, [], []


#: optimizers whose state or bookkeeping is not per entry: a compact 1-D copy of the kept entries breaks them
NOT_COMPACTABLE = {
    "LBFGS": "it caches its parameter list at construction, so the compact tensors would never be stepped",
    "Adafactor": "its second moment of a matrix is factored into row and column statistics, not kept per entry",
}


def refuse_compact(optimizer: Optimizer) -> None:
    """Raise ``ValueError`` naming the optimizer when :class:`CompactOptimizer` cannot rewire it."""
    name = type(optimizer).__name__
    if name in NOT_COMPACTABLE:
        raise ValueError(
            f"sparse_optimizer_state=True does not support {name}: {NOT_COMPACTABLE[name]}; use the dense masked "
            "step (sparse_optimizer_state=False), which keeps frozen entries bit-identical with it"
        )


@torch.no_grad()
def _mask_from_index(group: flat.Group, j: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
    idx = group.member_index(j).long()
    numel = 1
    for s in shape:
        numel *= s
    m = torch.full((numel,), not group.kept, dtype=torch.bool, device=device)
    m[idx] = group.kept
    return m.view(shape)


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (moments, momentum buffers, step counters)."""
    return sum(
        v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values() if isinstance(v, Tensor)
    )


def _gather_like(value: object, p: Tensor, idx: Tensor) -> object:
    """Per-entry state (shaped like ``p``) gathered at ``idx``; scalars (e.g. Adam's step) kept."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape == p.shape:
        return value.reshape(-1)[idx].clone()
    return value


def _scatter_like(value: object, p: Tensor, idx: Tensor, c: Tensor) -> object:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape == c.shape:
        dense = torch.zeros(p.numel(), dtype=value.dtype, device=value.device)
        return dense.index_copy_(0, idx, value).view(p.shape)
    return value


@torch.no_grad()
def zero_state_entries(optimizer: Optimizer, p: Tensor, entries: Tensor) -> None:
    """Zero ``p``'s per-entry optimizer state (moments, momentum) where ``entries`` (bool, p's shape)."""
    for v in optimizer.state.get(p, {}).values():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape == p.shape:
            v.masked_fill_(entries, 0)


def frozen_digest(p: Tensor, mask: Tensor) -> str:
    """SHA-256 of the bytes of ``p``'s frozen entries (``~mask``), in flat index order."""
    frozen = local(p).detach()[~mask].contiguous().cpu()
    return hashlib.sha256(frozen.view(torch.uint8).numpy().tobytes()).hexdigest()
