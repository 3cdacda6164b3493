"""Optimizer state for kept entries only, and a cheap proof that frozen entries did not move.

Pure torch; no Lightning import.

:class:`CompactOptimizer` rewires any ``torch.optim.Optimizer`` after the freeze: every partly
masked parameter ``p`` is replaced in its param group by a 1-D parameter ``c`` holding ``p``'s kept
entries (``c = p.flatten()[idx]``), and the optimizer state those entries accumulated (Adam's
moments, SGD's momentum, ...) moves along, gathered the same way. Fully frozen parameters leave the
optimizer. Each step, :meth:`CompactOptimizer.gather_grads` moves the kept gradients into ``c.grad``
(call it before gradient clipping) and a step post-hook writes ``c`` back into ``p``. Frozen entries
are then never seen by the optimizer, so they stay bit-identical and cost no optimizer state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fish_lightning.core.sharding import local


class CompactOptimizer:
    """Swap partly masked parameters of ``optimizer`` for compact parameters of their kept entries.

    Args:
        optimizer: the optimizer to rewire (in place; the same object keeps being stepped).
        masks: parameter -> bool mask (True = trained) of the same shape.

    Memory: optimizer state and ``c`` scale with the kept entries; plus int64 indices
    (8 bytes per kept entry).
    """

    def __init__(self, optimizer: Optimizer, masks: Mapping[nn.Parameter, Tensor]) -> None:
        refuse_compact(optimizer)
        self.optimizer = optimizer
        self.pairs: list[tuple[nn.Parameter, Tensor, nn.Parameter]] = []  # (p, flat kept idx, compact c)
        self.dropped: list[nn.Parameter] = []  # fully frozen: out of the optimizer
        self._layout = [list(g["params"]) for g in optimizer.param_groups]  # to expand() back
        by_id = {id(p): m for p, m in masks.items()}
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                m = by_id.get(id(p))
                if m is None or bool(m.all()):
                    params.append(p)
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
                params.append(c)
                self.pairs.append((p, idx, c))
            group["params"] = params
        self._handle = optimizer.register_step_post_hook(self._scatter)

    @torch.no_grad()
    def gather_grads(self) -> None:
        """``c.grad += p.grad[kept]`` (``c.grad`` is created when ``None``: the optimizer's ``zero_grad`` clears
        it); the dense ``p.grad`` is released (also of dropped parameters). Call after every backward, so that
        gradient clipping and accumulation see the compact gradients."""
        for p, idx, c in self.pairs:
            if p.grad is not None:
                g = p.grad.reshape(-1)[idx]
                c.grad = g if c.grad is None else c.grad.add_(g)
            p.grad = None
        for p in self.dropped:
            p.grad = None

    @torch.no_grad()
    def _scatter(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        for p, idx, c in self.pairs:
            p.detach().view(-1).index_copy_(0, idx, c.detach().to(p.dtype))

    def state_bytes(self) -> int:
        """Bytes of tensor state the optimizer holds (all its parameters, compact ones included)."""
        return optimizer_state_bytes(self.optimizer)

    def remove(self) -> None:
        self._handle.remove()

    @torch.no_grad()
    def expand(self) -> None:
        """Undo the rewiring: the original parameters return to their groups, with their kept
        entries' state scattered back (zeros elsewhere; fully frozen ones start fresh)."""
        compact = {id(c): (p, idx) for p, idx, c in self.pairs}
        for group in self.optimizer.param_groups:
            for c in group["params"]:
                if id(c) in compact:
                    p, idx = compact[id(c)]
                    state = self.optimizer.state.pop(c, None)
                    if state:
                        self.optimizer.state[p] = {k: _scatter_like(v, p, idx, c) for k, v in state.items()}
        for group, params in zip(self.optimizer.param_groups, self._layout):
            group["params"] = params
        self.remove()
        self.pairs, self.dropped = [], []


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
