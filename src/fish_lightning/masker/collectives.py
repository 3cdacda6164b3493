"""Every collective the callback issues, one function each.

Each function is called by every rank at the same point, in the same order (names are iterated in the
candidates' order, never from a set), so the ranks' collectives always match. On one process each is a no-op
or a local computation. ``trainer`` needs ``world_size``, ``global_rank`` and ``strategy`` (``reduce``,
``broadcast``, ``root_device``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fish_lightning.core.masking import pack_mask, unpack_mask
from fish_lightning.core.selection import select_masks_sharded
from fish_lightning.core.sharding import gather_full, local, local_rows, reduce_scatter_sum, shard_range

#: entries per Fisher all-reduce at the freeze (16 MiB in fp32): a flat copy of the whole Fisher would double it
REDUCE_BUCKET_ENTRIES = 1 << 22


def reduce_mean_(
    trainer: Any, fisher: dict[str, Tensor], skip: set[str] | frozenset = frozenset(),
    bucket: int = REDUCE_BUCKET_ENTRIES,
) -> dict[str, Tensor]:  # fmt: skip
    """All-reduce (mean) the Fisher over ranks, in place, in buckets of at most ``bucket`` entries of consecutive
    tensors. ``skip``: sharded tensors, whose per-rank parts are different rows (averaged when accumulated)."""
    if trainer.world_size <= 1:
        return fisher
    names = [n for n in fisher if n not in skip]
    batch: list[str] = []
    for i, n in enumerate(names):
        batch.append(n)
        size = sum(fisher[m].numel() for m in batch)
        if i + 1 < len(names) and size + fisher[names[i + 1]].numel() <= bucket:
            continue
        if len(batch) == 1:
            fisher[n].copy_(trainer.strategy.reduce(fisher[n], reduce_op="mean"))
        else:
            flat = trainer.strategy.reduce(torch.cat([fisher[m].reshape(-1) for m in batch]), reduce_op="mean")
            offset = 0
            for m in batch:
                fisher[m].copy_(flat[offset : offset + fisher[m].numel()].view_as(fisher[m]))
                offset += fisher[m].numel()
        batch = []
    return fisher


def reduce_scatter_mean(trainer: Any, whole: Tensor, param: Tensor) -> Tensor:
    """Reduce-scatter: this rank's rows of the rank mean of a whole-shaped per-rank sum of a sharded ``param``."""
    return reduce_scatter_sum(whole, param).div_(trainer.world_size)


def any_rank(trainer: Any, flag: bool) -> bool:
    """All-reduce (sum) of a flag: whether it is set on any rank."""
    if trainer.world_size <= 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=trainer.strategy.root_device)
    return bool(int(trainer.strategy.reduce(t, reduce_op="sum")[0]))


def broadcast_masks(trainer: Any, masks: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """Broadcast rank 0's masks of ``names`` (bit-packed), so they are bit-identical on every rank."""
    if trainer.world_size <= 1 or not names:
        return masks
    packed = trainer.strategy.broadcast({n: pack_mask(masks[n]) for n in names}, src=0)
    return {**masks, **{n: unpack_mask(packed[n], masks[n].shape) for n in names}}


def kept_counts(trainer: Any, masks: Mapping[str, Tensor], sharded: set[str]) -> dict[str, int]:
    """name -> kept entries over all ranks' shards (an all-reduce when any candidate is sharded)."""
    counts = torch.tensor([int(m.sum()) for m in masks.values()], dtype=torch.int64)
    if sharded:
        own = torch.tensor([n in sharded or trainer.global_rank == 0 for n in masks], dtype=torch.int64)
        counts = trainer.strategy.reduce((counts * own).to(trainer.strategy.root_device), reduce_op="sum").cpu()
    return {n: int(c) for n, c in zip(masks, counts)}


def select_sharded(
    trainer: Any, scores: Mapping[str, Tensor], params: Mapping[str, Tensor], sharded: set[str], sparsity: float,
    scope: str, k: int | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """Exactly k entries over every rank's shards (the entries one process would keep; bisection all-reduces).
    Replicated candidates are scored by rank 0 (empty elsewhere) and must be broadcast by the caller."""
    rank, local_scores, offsets = trainer.global_rank, {}, {}
    for n, p in params.items():
        s = local(scores[n])
        if n in sharded:
            local_scores[n] = s if s.shape == local(p).shape else local_rows(s, p)  # random: drawn whole
            offsets[n] = shard_range(p)[0]
        else:
            local_scores[n] = s if rank == 0 else s.reshape(-1)[:0]
            offsets[n] = 0 if rank == 0 else p.numel()
    masks = select_masks_sharded(
        local_scores, {n: p.numel() for n, p in params.items()}, offsets, sparsity,
        lambda t: trainer.strategy.reduce(t, reduce_op="sum"), rank, trainer.world_size, scope, k=k,
    )  # fmt: skip
    return {n: m if n in sharded else m.reshape(-1)[:0] for n, m in masks.items()}


def gather_whole(t: Tensor, param: Tensor) -> Tensor:
    """All-gather: a sharded candidate's per-rank tensor (mask, Fisher, ...) as the whole tensor."""
    if t.dtype == torch.bool:  # gloo has no bool collectives
        return gather_full(t.to(torch.uint8), param).bool()
    return gather_full(t, param)


def gather_objects(trainer: Any, obj: Any) -> list[Any]:
    """All-gather of a picklable object: every rank's value, by rank."""
    import torch.distributed as dist

    every: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(every, obj)
    return every


def process_rank() -> int:
    """This process's rank in the default process group (0 when not distributed). Not a collective."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
