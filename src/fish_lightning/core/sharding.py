"""Parameters sharded across ranks (FSDP2 ``fully_shard`` DTensors): local views and shard geometry.

Pure torch; no Lightning import. FISH keeps its Fisher accumulators, scores and masks per rank for
the rank's own shard only: ``local(t)`` is the tensor every elementwise operation works on, and
:func:`shard_range` places that shard in the whole tensor's row-major flattening, which is what the
global top-k (:func:`fish_lightning.core.selection.select_masks_sharded`) needs. Supported: a 1-D device
mesh with ``Shard(0)`` (FSDP2's layout) or ``Replicate()``; anything else (tensor parallel
``Shard(1)``, HSDP's 2-D mesh) is refused with the placement named.
"""

from __future__ import annotations

from torch import Tensor

try:  # torch.distributed may be built without DTensor (e.g. some macOS wheels)
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor split across ranks (``Shard(0)`` on a 1-D mesh)."""
    if DTensor is None or not isinstance(t, DTensor):
        return False
    check_placements(t)
    return isinstance(t.placements[0], Shard)


def check_placements(t: Tensor, name: str = "parameter") -> None:
    """Raise unless ``t`` is a plain tensor or a DTensor FISH supports (1-D mesh, ``Shard(0)``/``Replicate``)."""
    if DTensor is None or not isinstance(t, DTensor):
        return
    placements = tuple(t.placements)
    ok = len(placements) == 1 and (
        isinstance(placements[0], Replicate) or (isinstance(placements[0], Shard) and placements[0].dim == 0)
    )
    if not ok:
        raise ValueError(
            f"FISH: {name} is a DTensor with placements {placements} on a {t.device_mesh.ndim}-D mesh; supported are "
            "a 1-D mesh with Shard(0) (FSDP2 fully_shard) or Replicate() (use a plain data-parallel mesh for the "
            "adapter parameters)"
        )


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds (a view sharing storage: in-place updates reach ``t``)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def shard_range(p: Tensor) -> tuple[int, int]:
    """``(offset, numel)``: this rank's entries are ``p.reshape(-1)[offset : offset + numel]`` of the whole
    tensor (plain or replicated tensors: ``(0, p.numel())``)."""
    if not is_sharded(p):
        return 0, p.numel()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = 1
    for s in p.shape[1:]:
        row *= int(s)
    numel = 1
    for s in shape:
        numel *= int(s)
    return int(offset[0]) * row if p.dim() else 0, numel


def local_rows(full: Tensor, like: Tensor) -> Tensor:
    """The rows of a whole tensor ``full`` (shaped like ``like``) that this rank holds of ``like``."""
    if not is_sharded(like):
        return full
    offset, numel = shard_range(like)
    return full.reshape(-1)[offset : offset + numel].reshape(local(like).shape)


def reduce_scatter_sum(full: Tensor, like: Tensor) -> Tensor:
    """Sum a whole-shaped tensor (one per rank) over ranks and return this rank's rows of ``like``
    (one reduce-scatter; DTensor handles uneven shards)."""
    dt = DTensor.from_local(full, like.device_mesh, [_partial()], run_check=False)
    return dt.redistribute(like.device_mesh, like.placements).to_local()


def gather_full(local_part: Tensor, like: Tensor) -> Tensor:
    """The whole tensor from every rank's ``local_part`` laid out like ``like`` (an all-gather)."""
    if not is_sharded(like):
        return local_part
    dt = DTensor.from_local(local_part, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                            run_check=False)  # fmt: skip
    return dt.full_tensor()


def _partial():
    from torch.distributed.tensor import Partial

    return Partial("sum")
