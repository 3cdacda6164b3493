"""Writing a sparse export (:func:`save_sparse`): the kept entries of each masked tensor, the other trainable
tensors dense, and the metadata the loader needs; frozen entries are checked bit for bit against what the loader
will rebuild.
"""

from __future__ import annotations

import enum
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fish_lightning.adapters.seeded_init import canonical_names, find_tuner, init_values, recorded_seed
from fish_lightning.adapters.sparse_format import (
    FORMAT,
    META_KEY,
    _bits,
    _digest,
    _nbytes,
    encode_indices,
    safetensors_nbytes,
)
from fish_lightning.adapters.sparse_load import _base_fingerprint, _fresh_model, _resolve
from fish_lightning.core.mask_file import VERSION, write_safetensors


class DenseFallbackWarning(UserWarning):
    """Some masked tensors were stored dense because their frozen entries cannot be rebuilt at load."""


def save_sparse(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    peft_config: Any = None,
    init_seed: int | None = None,
    base_model: nn.Module | None = None,
    reference_state: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write the trained state of ``model`` sparsely to the safetensors file ``path``.

    Args:
        model: the trained model whose ``named_parameters()`` names key ``masks`` (e.g. the
            LightningModule, as for ``FisherMaskCallback.masks``), holding a peft model or not.
        masks: name -> bool tensor of the parameter's shape, True = trained entry.
        peft_config: the ``PeftConfig`` (or its ``to_dict()``) to store; default: the model's own
            (its single / active adapter). Needed by :func:`load_sparse_into_base`.
        init_seed: the :func:`~fish_lightning.adapters.seeded_init.seeded_init_` seed; default: the one
            recorded on ``model`` by that call. Without it, LoRA ``A`` tensors cannot be rebuilt.
        base_model: an untouched copy of the base model the loader will get (not modified: a deep
            copy is wrapped like :func:`load_sparse_into_base` does). It gives the reference of
            masked tensors :func:`~fish_lightning.adapters.seeded_init.init_values` cannot rebuild: other
            peft methods' deterministic inits (IA3, VeRA, PiSSA, ...), base weights under full
            fine-tuning.
        reference_state: name (as in ``model`` or canonical) -> the value the loader's fresh model
            will hold, for such tensors, instead of ``base_model``.
        metadata: extra ``str -> str`` safetensors metadata.

    Every masked tensor whose frozen entries are not bit-identical to their reference (or have
    none) is stored dense, with one :class:`DenseFallbackWarning` naming them.

    Returns ``{"path", "bytes", "dense_bytes", "ratio", "dense_fallback": [names], "encodings":
    {name: encoding}, "kept", "masked_numel", "value_bytes", "index_bytes", "dense_tensor_bytes",
    "header_bytes"}``: ``bytes`` is the file size, ``dense_bytes`` the size of a safetensors file
    holding the same tensors dense (no metadata), ``ratio = bytes / dense_bytes``, and ``bytes = 8 +
    header_bytes + value_bytes + index_bytes + dense_tensor_bytes``. Names are ``masks``' names.
    """
    named = dict(model.named_parameters())
    canon = canonical_names(model)
    _check_masks(masks, named, canon)
    trainable = [n for n, p in named.items() if p.requires_grad]
    outside = [n for n in trainable if n not in canon]
    if outside:
        raise ValueError(
            f"trainable parameters {outside[:4]} are outside the peft-wrapped model, so a loader could not "
            "place them; save from a module whose trainable parameters all live in the peft model"
        )
    saved = [n for n in named if n in masks or n in trainable]
    if init_seed is None:
        init_seed = recorded_seed(model)
    config_dict, adapter_name = _config_dict(model, peft_config)
    refs, ref_kind = _references(model, canon, masks, init_seed, config_dict, adapter_name, base_model, reference_state)
    enc = _SparseEncoding()
    for n in saved:
        enc.add(canon[n], n, named[n].detach().to("cpu"), masks.get(n), refs, ref_kind)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "peft_config": config_dict,
        "adapter_name": adapter_name,
        "init_seed": init_seed,
        "base_sha256": _base_fingerprint(model, canon, set(enc.info)),
        "tensors": enc.info,
    }
    write_safetensors(path, enc.tensors, {META_KEY: json.dumps(meta, separators=(",", ":"))}, metadata)
    if enc.fallback:
        _warn_dense_fallback(enc.fallback, len(masks))
    size = os.path.getsize(path)
    dense = safetensors_nbytes({canon[n]: (named[n].dtype, tuple(named[n].shape)) for n in saved})
    report = enc.report
    report.update(
        path=str(path),
        bytes=size,
        dense_bytes=dense,
        ratio=size / dense if dense else float("nan"),
        dense_fallback=[n for n, _ in enc.fallback],
        encodings=enc.encodings,
        header_bytes=size - 8 - report["value_bytes"] - report["index_bytes"] - report["dense_tensor_bytes"],
    )
    return report


class _SparseEncoding:
    """The file tensors, per-tensor metadata and size report of :func:`save_sparse`, built tensor by tensor."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.fallback: list[tuple[str, str]] = []
        self.encodings: dict[str, str] = {}
        self.report: dict[str, Any] = dict.fromkeys(
            ("value_bytes", "index_bytes", "dense_tensor_bytes", "kept", "masked_numel"), 0
        )

    def add(
        self,
        key: str,
        name: str,
        value: Tensor,
        mask: Tensor | None,
        refs: Mapping[str, Tensor],
        ref_kind: Mapping[str, str],
    ) -> None:
        """Store parameter ``name`` (file key ``key``): dense, or its kept entries when ``mask`` freezes some
        whose values ``refs[key]`` rebuilds bit for bit."""
        if mask is None:
            self._dense(key, name, value)
            return
        mask = mask.detach().to("cpu", torch.bool)
        kept = int(mask.sum())
        self.report["kept"] += kept
        self.report["masked_numel"] += mask.numel()
        encoding, index = ("frozen", None) if kept == 0 else encode_indices(mask)
        sparse_bytes = kept * value.element_size() + (0 if index is None else _nbytes(index))
        if kept == mask.numel() or sparse_bytes >= _nbytes(value):
            self._dense(key, name, value)  # nothing frozen, or dense is no larger: no reference needed
            return
        reason = _frozen_mismatch(value, mask, refs.get(key))
        if reason is not None:
            self.fallback.append((name, reason))
            self._dense(key, name, value)
            return
        self.encodings[name] = encoding
        self.info[key] = {
            "encoding": encoding,
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "kept": kept,
            "ref": ref_kind[key],
            "ref_sha256": _digest(refs[key]),
        }
        if index is not None:
            self.tensors[f"{key}:values"] = value.reshape(-1)[mask.reshape(-1)].contiguous()
            self.tensors[f"{key}:{encoding}"] = index
            self.report["value_bytes"] += kept * value.element_size()
            self.report["index_bytes"] += _nbytes(index)

    def _dense(self, key: str, name: str, value: Tensor) -> None:
        self.tensors[key], self.info[key], self.encodings[name] = value.contiguous(), {"encoding": "dense"}, "dense"
        self.report["dense_tensor_bytes"] += _nbytes(value)


def _warn_dense_fallback(fallback: list[tuple[str, str]], masked: int) -> None:
    shown = "; ".join(f"{n}: {why}" for n, why in fallback[:3])
    warnings.warn(
        f"save_sparse: {len(fallback)} of {masked} masked tensors stored dense because their frozen entries "
        f"cannot be rebuilt at load ({shown}{'; ...' if len(fallback) > 3 else ''}). To store them sparsely, "
        "initialise the adapter with seeded_init_ and keep frozen entries at their fit-start values "
        "(FisherMaskCallback(warmup_steps=0, mask_epoch=None, calibration_samples=N) or rewind_frozen=True)",
        DenseFallbackWarning,
        stacklevel=3,
    )


def _frozen_mismatch(value: Tensor, mask: Tensor, ref: Tensor | None) -> str | None:
    """Why the frozen entries of ``value`` cannot be rebuilt from ``ref`` (``None``: they can)."""
    if ref is None:
        return "no reference to rebuild the frozen entries from (init_seed unknown or not a seeded LoRA tensor)"
    if ref.shape != value.shape or ref.dtype != value.dtype:
        return f"reference has shape {list(ref.shape)} / {ref.dtype}, the tensor {list(value.shape)} / {value.dtype}"
    frozen = ~mask
    differ = _bits(value)[frozen] != _bits(ref)[frozen]
    count = int(differ.sum())
    if count:
        diff = float((value[frozen][differ].double() - ref[frozen][differ].double()).abs().max())
        return f"{count} frozen entries differ from their initial value (max abs diff {diff:.3g})"
    return None


def _check_masks(masks: Mapping[str, Tensor], named: Mapping[str, Tensor], canon: Mapping[str, str]) -> None:
    if not masks:
        raise ValueError("masks is empty: nothing to save sparsely (use safetensors.torch.save_file for dense)")
    for n, m in masks.items():
        if n not in named:
            raise ValueError(
                f"mask {n!r} names no parameter of the model (its names look like {list(named)[:3]}): pass the "
                "module whose named_parameters() keyed the masks"
            )
        if n not in canon:
            raise ValueError(
                f"masked parameter {n!r} is outside the peft-wrapped model, so a loader could not place it"
            )
        if not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != tuple(named[n].shape):
            got = f"{m.dtype} {list(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"mask {n!r} must be a bool tensor of shape {list(named[n].shape)}, got {got}")


def _config_dict(model: nn.Module, peft_config: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON-ready peft config to store and the adapter's name."""
    _, tuner = find_tuner(model)
    adapter = None
    if tuner is not None:
        active = tuner.active_adapter
        adapter = active if isinstance(active, str) else (active[0] if len(active) == 1 else None)
        if peft_config is None:
            if adapter is None or adapter not in tuner.peft_config:
                raise ValueError(
                    f"the model has adapters {list(tuner.peft_config)} (active: {active!r}); pass peft_config="
                )
            peft_config = tuner.peft_config[adapter]
    if peft_config is None:
        return None, adapter
    raw = peft_config if isinstance(peft_config, Mapping) else peft_config.to_dict()
    return json.loads(json.dumps(dict(raw), default=_jsonable)), adapter


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, Path)):
        return list(obj) if isinstance(obj, tuple) else str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"peft config value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def _references(
    model: nn.Module,
    canon: Mapping[str, str],
    masks: Mapping[str, Tensor],
    init_seed: int | None,
    config_dict: dict[str, Any] | None,
    adapter_name: str | None,
    base_model: nn.Module | None,
    reference_state: Mapping[str, Tensor] | None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Canonical name -> (the value the loader will rebuild for each masked tensor, its kind):
    ``"init"``: the LoRA/DoRA init from ``init_seed`` (:func:`init_values`); ``"model"``: the value the
    freshly built model handed to the loader holds (from ``reference_state``, else rebuilt from a copy
    of ``base_model`` the way :func:`load_sparse_into_base` builds it)."""
    masked = [canon[n] for n in masks]
    refs: dict[str, Tensor] = dict(init_values(model, init_seed, masked))
    kind = dict.fromkeys(refs, "init")
    inv = {c: n for n, c in canon.items()}
    for c in masked:
        value = None if reference_state is None or c in refs else reference_state.get(c, reference_state.get(inv[c]))
        if value is not None:
            refs[c], kind[c] = value.detach().to("cpu"), "model"
    missing = [c for c in masked if c not in refs]
    if missing and base_model is not None:
        fresh = _fresh_model(base_model, config_dict, adapter_name, init_seed, copy=True)
        fresh_canon = canonical_names(fresh)
        fresh_named = {fresh_canon[n]: p for n, p in fresh.named_parameters() if n in fresh_canon}
        try:
            where = _resolve(missing, fresh_named, "base_model")
        except ValueError:
            where = {c: c for c in missing if c in fresh_named}
        for c, f in where.items():
            refs[c], kind[c] = fresh_named[f].detach().to("cpu").clone(), "model"
    return refs, kind
