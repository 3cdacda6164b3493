"""The callback's checkpoint state: keys (unchanged since 0.1.0), the settings check on resume, and unpacking.

A checkpoint holds whole tensors (sharded candidates gathered), bit-packed masks, the warmup Fisher averaged
over ranks, the counters, and the frozen-entry hashes (by rank when candidates are sharded).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fish_lightning.callback import distributed
from fish_lightning.core.masking import pack_mask, unpack_mask

#: settings a resumed run must share with the checkpoint (they decide which entries are kept)
CHECKED_SETTINGS = ("sparsity", "selection", "scope", "seed")


def check_settings(state: dict[str, Any], settings: Any) -> None:
    """Refuse a checkpoint written with other selection settings than ``settings``."""
    for key in CHECKED_SETTINGS:
        if key in state and state[key] != getattr(settings, key):
            raise ValueError(
                f"checkpoint was written with FisherMaskCallback({key}={state[key]!r}), this callback has "
                f"{key}={getattr(settings, key)!r}: resume with the same settings (or start a new run)"
            )


def pack_masks(masks: dict[str, Tensor], params: dict[str, Any], sharded: set[str]) -> dict[str, Tensor]:
    """Whole masks, bit-packed (sharded ones gathered: a collective)."""
    return {n: pack_mask(distributed.gather_whole(m, params[n]) if n in sharded else m) for n, m in masks.items()}


def unpack_masks(packed: dict[str, Tensor], shapes: dict[str, Any]) -> dict[str, Tensor]:
    """Whole bool masks (CPU) from :func:`pack_masks`' output and the candidates' whole shapes."""
    return {n: unpack_mask(p, tuple(shapes[n])) for n, p in packed.items()}


def kept_of_packed(packed: dict[str, Tensor], numel: dict[str, int]) -> dict[str, int]:
    return {n: int(unpack_mask(p, (numel[n],)).sum()) for n, p in packed.items()}


def digests_for_checkpoint(trainer: Any, digests: dict[str, str] | None, sharded: set[str]) -> Any:
    """Frozen-entry hashes; with sharded candidates each rank hashes its own shard, so all ranks' are kept."""
    if digests is None or not sharded or trainer is None:
        return digests
    return {"by_rank": distributed.gather_objects(trainer, digests)}


def own_digests(digests: Any) -> dict[str, str] | None:
    """This rank's hashes from :func:`digests_for_checkpoint`'s value."""
    if isinstance(digests, dict) and "by_rank" in digests:  # written by a sharded run
        return digests["by_rank"][distributed.process_rank()]
    return digests
