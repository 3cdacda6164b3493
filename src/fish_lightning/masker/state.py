"""The callback's checkpoint state: keys (unchanged since 0.1.0), the settings check on resume, and unpacking.

A checkpoint holds whole tensors (sharded candidates gathered), bit-packed masks, the warmup Fisher averaged
over ranks, the counters, and the frozen-entry hashes (by rank when candidates are sharded).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fish_lightning.core.masking import pack_mask, unpack_mask
from fish_lightning.core.sharding import local_rows
from fish_lightning.masker import collectives as distributed
from fish_lightning.masker.frozen import FrozenMask

#: settings a resumed run must share with the checkpoint: they decide the candidates and which entries are kept
CHECKED_SETTINGS = ("sparsity", "selection", "scope", "seed", "include", "exclude", "kept")
#: checkpoint key -> setting: the warmup's estimator as configured (``fisher_estimator`` holds the one in use)
RENAMED = {"fisher_estimator_setting": "fisher_estimator"}


def settings_state(settings: Any) -> dict[str, Any]:
    """The settings a checkpoint records for :func:`check_settings`."""
    state = {k: _plain(k, getattr(settings, k)) for k in CHECKED_SETTINGS}
    state.update({key: getattr(settings, name) for key, name in RENAMED.items()})
    state["sparse_optimizer_state"] = settings.sparse_optimizer_state
    return state


def check_settings(state: dict[str, Any], settings: Any) -> None:
    """Refuse a checkpoint written with other settings than ``settings`` where they matter: the candidates
    (``include``/``exclude``), the selection, the warmup estimator, and, after the freeze, the optimizer state's
    layout (``sparse_optimizer_state``: compact vs dense). Keys a checkpoint lacks (older versions) are not
    checked."""
    checked = {k: k for k in CHECKED_SETTINGS} | RENAMED
    if state.get("masks") is not None:
        checked["sparse_optimizer_state"] = "sparse_optimizer_state"
    for key, name in checked.items():
        if key in state and _plain(name, state[key]) != _plain(name, getattr(settings, name)):
            why = ""
            if name == "sparse_optimizer_state":
                layout = "compact" if state[key] else "dense"
                why = f" (the checkpoint's optimizer state is {layout}; it cannot be loaded into the other layout)"
            raise ValueError(
                f"checkpoint was written with FisherMaskCallback({name}={state[key]!r}), this callback has "
                f"{name}={getattr(settings, name)!r}{why}: resume with the same settings (or start a new run)"
            )


def _plain(name: str, value: Any) -> Any:
    """``include``/``exclude`` as a list of patterns (a string is one pattern); other values unchanged."""
    if name in ("include", "exclude") and value is not None:
        return [value] if isinstance(value, str) else list(value)
    return value


def pack_masks(masks: dict[str, Tensor], params: dict[str, Any], sharded: set[str]) -> dict[str, Tensor]:
    """Whole masks, bit-packed (sharded ones gathered: a collective)."""
    return {n: pack_mask(distributed.gather_whole(m, params[n]) if n in sharded else m) for n, m in masks.items()}


def unpack_masks(packed: dict[str, Tensor], shapes: dict[str, Any]) -> dict[str, Tensor]:
    """Whole bool masks (CPU) from :func:`pack_masks`' output and the candidates' whole shapes."""
    return {n: unpack_mask(p, tuple(shapes[n])) for n, p in packed.items()}


def counts(masks: dict[str, Tensor]) -> dict[str, int]:
    """name -> kept entries of whole masks."""
    return {n: int(m.sum()) for n, m in masks.items()}


def restore_mask(state: dict[str, Any], params: dict[str, Any], sharded: set[str]) -> FrozenMask | None:
    """The checkpoint's mask on this fit's candidates (this rank's rows, on the parameters' devices), with its
    counters and re-selection Fisher; ``None`` when the checkpoint was written before the freeze."""
    if state.get("masks") is None:
        return None
    whole = unpack_masks(state["masks"], {n: p.shape for n, p in params.items()})
    masks = {n: (local_rows(m, params[n]) if n in sharded else m).to(params[n].device) for n, m in whole.items()}
    mask = FrozenMask(masks, counts(whole), own_digests(state.get("digests")),
                      state.get("frozen_at_step"))  # fmt: skip
    mask.steps_since_select = int(state.get("steps_since_select", 0))
    mask.reselections = int(state.get("reselections", 0))
    if state.get("refisher") is not None:
        mask.refisher = {n: t.to(params[n].device) for n, t in state["refisher"].items()}
    return mask


def preview_mask(state: dict[str, Any] | None, shapes: dict[str, Any] | None) -> FrozenMask | None:
    """The checkpoint's mask as whole CPU tensors given the candidates' shapes, bound to no model (a checkpoint
    loaded outside fit: ``cb.masks`` and ``cb.verify(module)``)."""
    if state is None or state.get("masks") is None or shapes is None:
        return None
    masks = unpack_masks(state["masks"], shapes)
    return FrozenMask(masks, counts(masks), own_digests(state.get("digests")),
                      state.get("frozen_at_step"))  # fmt: skip


def mask_state(trainer: Any, mask: FrozenMask | None, params: dict[str, Any], sharded: set[str]) -> dict[str, Any]:
    """The checkpoint keys of the frozen phase (collectives when candidates are sharded)."""
    if mask is None:
        return {"masks": None, "digests": None, "refisher": None, "steps_since_select": 0}
    return {
        "masks": pack_masks(mask.masks, params, sharded),
        "digests": digests_for_checkpoint(trainer, mask.digests, sharded),
        "refisher": {n: f.detach().cpu() for n, f in mask.refisher.items()} if mask.refisher is not None else None,
        "steps_since_select": mask.steps_since_select,
    }


def whole_copies(tensors: dict[str, Tensor] | None, params: dict[str, Any], sharded: set[str]) -> dict | None:
    """Whole CPU copies of per-candidate tensors (sharded ones gathered: a collective)."""
    if tensors is None:
        return None
    return {n: (distributed.gather_whole(t, params[n]) if n in sharded else t).detach().cpu()
            for n, t in tensors.items()}  # fmt: skip


def local_copies(tensors: dict[str, Tensor], params: dict[str, Any], sharded: set[str]) -> dict[str, Tensor]:
    """This rank's part of whole checkpointed tensors, copied onto the parameters' devices."""
    return {n: (local_rows(tensors[n], p) if n in sharded else tensors[n]).to(p.device, copy=True)
            for n, p in params.items()}  # fmt: skip


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
