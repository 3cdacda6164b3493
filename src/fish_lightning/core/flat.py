"""Many tensors, a constant number of aten ops: groups of tensors handled as one flat buffer.

Pure torch; no Lightning import. Masking gradients, the frozen-entry snapshot and restore, and the
compact optimizer's gather and scatter touch every masked tensor each step; done tensor by tensor
that is a few kernel launches per tensor (448 tensors for LLaMA-7B with LoRA on every projection).
Here consecutive tensors of one device and dtype form a :class:`Group` of at most
:data:`GROUP_ENTRIES` entries (a larger tensor is a group of its own), and each step works on the
group's concatenation (``flatten_dense_tensors``, one op; a single contiguous tensor is its own flat
view, no copy) with one index of the group's entries, written back with one ``_foreach_copy_``. The
op count per step is then a few per group, whatever the number of tensors; the transient flat copy
is at most one group (``GROUP_ENTRIES`` entries) beyond what the caller keeps.

The index is int32 (int64 only for a group of 2**31 entries or more) and lists the kept entries or
the frozen ones, whichever are fewer (:func:`plan` with ``side="smaller"``), so it costs
``4 * min(kept, frozen)`` bytes; no bool mask is kept.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: entries of a group's flat copy at most (64 MiB in fp32); a tensor larger than this is a group of its own
GROUP_ENTRIES = 2**24

_flatten = torch._C._nn.flatten_dense_tensors
_unflatten = torch._C._nn.unflatten_dense_tensors


def index_dtype(numel: int) -> torch.dtype:
    """int32 for positions below 2**31, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


@dataclass
class Group:
    """Tensors ``members`` (positions in the caller's list) handled as one flat buffer.

    ``idx`` holds positions in the members' concatenation (row-major, member after member): the kept
    entries when ``kept`` is True, else the frozen ones. ``counts[i]`` is how many of them fall in member
    ``i`` and ``offsets[i]`` where member ``i`` starts.
    """

    members: list[int]
    offsets: list[int]
    numel: int
    idx: Tensor
    kept: bool
    counts: list[int] = field(default_factory=list)
    zero: Tensor | None = None  # a 0-dim zero of the group's dtype and device (for index_put_)

    def member_index(self, i: int) -> Tensor:
        """Positions (into member ``i`` flattened) that ``idx`` lists for member ``i``; a new tensor."""
        start = sum(self.counts[:i])
        return self.idx[start : start + self.counts[i]] - self.offsets[i]


def plan(
    tensors: Sequence[Tensor], masks: Sequence[Tensor], side: str = "smaller", max_entries: int | None = None
) -> list[Group]:
    """Groups over ``tensors`` (with bool ``masks`` of their shapes, True = kept) for the batched ops below.

    Tensors whose mask keeps every entry, and empty ones, are in no group (nothing to do for them).
    ``side``: ``"kept"`` (index the kept entries) or ``"smaller"`` (kept or frozen, whichever are fewer
    in the group). ``max_entries``: a group's size at most (default :data:`GROUP_ENTRIES`). Costs a few ops and
    one host sync per tensor, once.
    """
    max_entries = GROUP_ENTRIES if max_entries is None else max_entries
    if side not in ("kept", "smaller"):
        raise ValueError(f"side={side!r}: expected 'kept' or 'smaller'")
    open_: dict[tuple, list[tuple[int, int]]] = {}  # (device, dtype) -> [(position, kept count)]
    sizes: dict[tuple, int] = {}
    done: list[tuple[tuple, list[tuple[int, int]]]] = []
    with torch.no_grad():
        for i, (t, m) in enumerate(zip(tensors, masks)):
            if tuple(m.shape) != tuple(t.shape):
                raise ValueError(f"mask of shape {tuple(m.shape)} for a tensor of shape {tuple(t.shape)}")
            n = t.numel()
            k = int(m.sum()) if n else 0
            if n == 0 or k == n:
                continue
            key = (t.device, t.dtype)
            if key in open_ and sizes[key] + n > max_entries:
                done.append((key, open_.pop(key)))
            if key not in open_:
                open_[key], sizes[key] = [], 0
            open_[key].append((i, k))
            sizes[key] += n
        done += list(open_.items())
        groups = [_group(key, members, tensors, masks, side) for key, members in done]
    groups.sort(key=lambda g: g.members[0])
    return groups


def _group(key: tuple, members: list[tuple[int, int]], tensors, masks, side: str) -> Group:
    device, dtype = key
    numels = [tensors[i].numel() for i, _ in members]
    total, kept = sum(numels), sum(k for _, k in members)
    use_kept = side == "kept" or kept <= total - kept
    offsets, parts, counts, off = [], [], [], 0
    for (i, k), n in zip(members, numels):
        sel = masks[i].reshape(-1)
        if not use_kept:
            sel = ~sel
        offsets.append(off)
        counts.append(k if use_kept else n - k)
        parts.append(sel.nonzero().squeeze(1).add_(off).to(device=device, dtype=index_dtype(total)))
        off += n
    idx = torch.cat(parts) if len(parts) > 1 else parts[0]
    return Group([i for i, _ in members], offsets, total, idx, use_kept, counts, torch.zeros((), dtype=dtype,
                 device=device))  # fmt: skip


def flat(ts: Sequence[Tensor]) -> tuple[Tensor, bool]:
    """``(buffer, in_place)``: the concatenation of ``ts`` flattened; ``in_place`` when it is ``ts[0]`` itself
    (one contiguous tensor: a view, writes reach it), else a copy that :func:`write_back` copies back."""
    if len(ts) == 1 and ts[0].is_contiguous():
        return ts[0].view(-1), True
    return _flatten(list(ts)), False


def flat_copy(ts: Sequence[Tensor]) -> Tensor:
    """A new flat tensor holding the concatenation of ``ts`` (never a view of them)."""
    if len(ts) == 1:
        return ts[0].reshape(-1).clone()
    return _flatten(list(ts))


def write_back(buffer: Tensor, ts: Sequence[Tensor]) -> None:
    """Copy a flat buffer laid out like ``ts`` (as :func:`flat` makes it) into ``ts``, in one op."""
    torch._foreach_copy_(list(ts), list(_unflatten(buffer, list(ts))))


def split_like(buffer: Tensor, ts: Sequence[Tensor]) -> list[Tensor]:
    """Views of a flat ``buffer`` shaped like ``ts``, one op."""
    if len(ts) == 1:
        return [buffer.view(ts[0].shape)]
    return list(_unflatten(buffer, list(ts)))


# ------------------------------------------------------------------ plans cached by mask identity
_PLANS: dict[tuple, tuple[list[weakref.ref], list[Group]]] = {}
_MAX_PLANS = 8


def cached_plan(tensors: Sequence[Tensor], masks: Sequence[Tensor]) -> list[Group]:
    """:func:`plan` (``side="smaller"``) for these masks, computed once: cached by the masks' identity and
    version counter (an in-place change of a mask makes a new plan) and the tensors' device and dtype; an entry
    goes when one of its masks is freed (at most a few are kept)."""
    key = tuple((id(m), m._version, t.dtype, t.device) for t, m in zip(tensors, masks))
    hit = _PLANS.get(key)
    if hit is not None and all(r() is m for r, m in zip(hit[0], masks)):
        return hit[1]
    groups = plan(tensors, masks)
    while len(_PLANS) >= _MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)))

    def drop(_ref, key=key):
        _PLANS.pop(key, None)

    _PLANS[key] = ([weakref.ref(m, drop) for m in masks], groups)
    return groups


def clear_cache() -> None:
    """Forget every cached plan (their index tensors are freed)."""
    _PLANS.clear()
