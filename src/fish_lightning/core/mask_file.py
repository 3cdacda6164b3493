"""The FISH mask file (``fish_mask.safetensors``): parameter name -> bool mask, bit-packed, shapes in the
metadata; plus the safetensors read/write with JSON metadata that the sparse export shares. Pure torch
(+ safetensors)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fish_lightning.core.masking import pack_mask, unpack_mask

VERSION = 1  # of our safetensors formats (sparse export, mask file)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, Tensor], st_meta: dict[str, str], extra: Mapping[str, str] | None
) -> None:
    """``save_file`` with metadata ``st_meta`` plus the caller's ``extra`` ``str -> str`` entries."""
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or not isinstance(v, str) or k in st_meta:
            raise ValueError(
                f"metadata entry {k!r}: {v!r} is not valid: keys and values must be str, key != {next(iter(st_meta))!r}"
            )
        st_meta = {**st_meta, k: v}
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=st_meta)


def read_safetensors(
    path: str | os.PathLike, key: str, fmt: str, what: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(JSON metadata under key, tensors)`` of one of our safetensors files, checking its format and version."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(key)
        if raw is None:
            raise ValueError(f"{path} is not {what}: its safetensors metadata has no {key!r} entry")
        meta = json.loads(raw)
        if meta.get("format") != fmt or not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
            raise ValueError(
                f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not readable here "
                f"(expected format {fmt!r}, version <= {VERSION})"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return meta, tensors


MASK_FORMAT = "fish-mask"
MASK_META_KEY = "fish_mask"


def save_mask(masks: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write a FISH mask (``FisherMaskCallback.masks``: parameter name -> bool tensor, ``True`` = trained)
    to the safetensors file ``path``, bit-packed (one bit per entry, :func:`~fish_lightning.core.masking.pack_mask`);
    names stay as given (``fish-train`` gives the ``PeftModel``'s own ``named_parameters()``), shapes go in the
    metadata (key ``"fish_mask"``, JSON). :func:`load_mask` reads it back exactly."""
    shapes, packed = {}, {}
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask {name!r} must be a bool tensor, got {got}")
        shapes[name] = list(mask.shape)
        packed[name] = pack_mask(mask.detach().to("cpu").reshape(-1))
    kept = sum(int(m.sum()) for m in masks.values())
    meta = {"format": MASK_FORMAT, "version": VERSION, "shapes": shapes, "kept": kept}
    write_safetensors(path, packed, {MASK_META_KEY: json.dumps(meta, separators=(",", ":"))}, None)


def load_mask(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, Tensor]:
    """The mask saved by :func:`save_mask`: parameter name -> bool tensor (CPU), ``True`` = trained.

    With ``model``, the names become ``model``'s own (:func:`align_masks`: a file saved from a LightningModule
    applies to its bare ``PeftModel`` and back) and are checked against them (:func:`check_mask`, ``ValueError``
    naming the first name or shape that does not fit)."""
    meta, packed = read_safetensors(path, MASK_META_KEY, MASK_FORMAT, "a FISH mask file")
    masks = {n: unpack_mask(packed[n], tuple(shape)) for n, shape in meta["shapes"].items()}
    if model is not None:
        masks = align_masks(masks, [n for n, _ in model.named_parameters()], where=str(path))
        check_mask(masks, model, where=str(path))
    return masks


def check_mask(masks: Mapping[str, Tensor], model: nn.Module, where: str = "mask") -> None:
    """Raise ``ValueError`` naming the first mask entry that is not a parameter of ``model`` or has another shape."""
    params = dict(model.named_parameters())
    if not masks:
        raise ValueError(f"{where} holds no masks")
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"{where}: mask {name!r} names no parameter of the model (its names look like "
                             f"{list(params)[:3]}): was the mask saved from a model built the same way?")  # fmt: skip
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"{where}: mask {name!r} has shape {list(mask.shape)} but the parameter has shape "
                             f"{list(params[name].shape)}: same model and peft config (e.g. rank r)?")  # fmt: skip


def _common_tail(a: list[str], b: list[str]) -> int:
    """How many trailing dot-components ``a`` and ``b`` share."""
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    return k


def _swap_prefix(name: str, old: str, new: str) -> str | None:
    if old and not name.startswith(old + "."):
        return None
    rest = name[len(old) + 1:] if old else name
    return f"{new}.{rest}" if new else rest


def align_names(names: list[str], targets: list[str], where: str = "mask") -> dict[str, str]:
    """Map mask ``names`` onto parameter names ``targets`` that may hold the same tensors under another prefix
    (``model.base_model.model.x`` saved from a LightningModule, ``base_model.model.x`` in the bare ``PeftModel``,
    ``net.base_model.model.x`` in a module that calls its model ``net``): the names themselves when they all are
    targets, else the one prefix swap (``old.`` -> ``new.``, the longest shared suffix) under which every name is a
    target. ``{}`` when none fits (the caller reports what is missing); ``ValueError`` naming both targets when two
    swaps fit equally well."""
    target_set = set(targets)
    if not names or all(n in target_set for n in names):
        return {n: n for n in names}
    first = names[0].split(".")
    fits: dict[int, dict[tuple[str, str], dict[str, str]]] = {}
    for t in targets:
        parts = t.split(".")
        k = _common_tail(first, parts)
        if k == 0:
            continue
        old, new = ".".join(first[: len(first) - k]), ".".join(parts[: len(parts) - k])
        if (old, new) in fits.get(k, {}):
            continue
        mapped = {n: _swap_prefix(n, old, new) for n in names}
        if all(m is not None and m in target_set for m in mapped.values()):
            fits.setdefault(k, {})[(old, new)] = mapped  # type: ignore[assignment]
    if not fits:
        return {}
    best = fits[max(fits)]
    if len(best) > 1:
        a, b = list(best.values())[:2]
        raise ValueError(f"{where}: mask {names[0]!r} matches both {a[names[0]]!r} and {b[names[0]]!r}: the model "
                         "holds these tensors twice; give a mask saved from this model")  # fmt: skip
    return next(iter(best.values()))


def align_masks(masks: Mapping[str, Tensor], targets: list[str], where: str = "mask") -> dict[str, Tensor]:
    """``masks`` keyed by the names of ``targets`` they match (:func:`align_names`), unchanged when none fit."""
    mapping = align_names(list(masks), list(targets), where)
    if not mapping:
        return dict(masks)
    return {mapping[n]: m for n, m in masks.items()}
