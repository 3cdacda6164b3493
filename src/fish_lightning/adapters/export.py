"""Sparse adapter export: store only what FISH training changed, load it back or merge it.

One ``.safetensors`` file holds, for each masked tensor, the kept entries' values and their
positions (a packed bitmask or gap-encoded flat indices, whichever is smaller for that tensor),
every other trainable tensor (e.g. the classifier head) dense, and JSON metadata (the peft config,
the :func:`~fish_lightning.adapters.seeded_init.seeded_init_` seed, shapes and encodings).

Frozen entries are *not* stored: the loader rebuilds them. That is exact only when they still hold
their fit-start values and those values can be rebuilt: LoRA/DoRA tensors initialised with
``seeded_init_`` (or tensors peft initialises without randomness: ``B = 0``, DoRA magnitudes) and
masks chosen before any update (``FisherMaskCallback(warmup_steps=0, mask_epoch=None,
calibration_samples=N)``) or frozen entries rewound to their fit-start values. :func:`save_sparse`
checks every frozen entry bit for bit against that reference and stores a tensor dense (with a
:class:`DenseFallbackWarning`) when they differ, so a file never loads to a different model.

Layout (``NAME`` is the canonical parameter name, see :mod:`fish_lightning.adapters.seeded_init`):
``NAME`` (dense tensor), ``NAME:values`` (kept values, flat order), ``NAME:bitmask`` (uint8,
:func:`~fish_lightning.core.masking.pack_mask`) or ``NAME:gaps`` (``idx[i] - idx[i-1] - 1`` with
``idx[-1] = -1``, in the smallest of uint8/uint16/uint32/int64 that holds the largest gap);
metadata key ``"fish_sparse"`` (JSON). Pure torch + peft + safetensors; no Lightning import.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fish_lightning.adapters.seeded_init import (
    adapter_tensors,
    canonical_names,
    find_tuner,
    init_values,
    recorded_seed,
    seeded_init_,
)
from fish_lightning.core.mask_file import (  # noqa: F401 - the mask file's names, re-exported
    MASK_FORMAT,
    MASK_META_KEY,
    VERSION,
    check_mask,
    load_mask,
    read_safetensors,
    save_mask,
    write_safetensors,
)
from fish_lightning.core.masking import pack_mask, unpack_mask

FORMAT = "fish-sparse"
META_KEY = "fish_sparse"
ENCODINGS = ("bitmask", "gaps", "dense", "frozen")

# safetensors names and its on-disk tensor order (dtype descending, then name)
_ST_NAME = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_ST_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
# (largest gap, dtype): unsigned types need torch >= 2.3 (and safetensors >= 0.4.3)
_GAP_DTYPES: list[tuple[int, torch.dtype]] = [(2**8 - 1, torch.uint8)]
if hasattr(torch, "uint16"):
    _ST_NAME.update({torch.uint16: "U16", torch.uint32: "U32"})
    _GAP_DTYPES += [(2**16 - 1, torch.uint16), (2**32 - 1, torch.uint32)]
else:  # pragma: no cover
    _GAP_DTYPES += [(2**15 - 1, torch.int16), (2**31 - 1, torch.int32)]
_GAP_DTYPES.append((2**63 - 1, torch.int64))


class DenseFallbackWarning(UserWarning):
    """Some masked tensors were stored dense because their frozen entries cannot be rebuilt at load."""


# ------------------------------------------------------------------------------------------ encoding
def encode_indices(mask: Tensor) -> tuple[str, Tensor]:
    """The smaller index encoding of a bool ``mask`` (any shape): ``("bitmask", uint8[ceil(n/8)])``
    or ``("gaps", uint*[k])`` (see the module doc); ties go to the bitmask."""
    flat = mask.detach().reshape(-1).to("cpu", torch.bool)
    bitmask_bytes = (flat.numel() + 7) // 8
    idx = flat.nonzero().reshape(-1)
    if idx.numel() == 0:
        return "bitmask", pack_mask(flat)
    gaps = torch.diff(idx, prepend=idx.new_tensor([-1])) - 1
    largest = int(gaps.max())
    dtype = next(dt for limit, dt in _GAP_DTYPES if largest <= limit)
    if idx.numel() * _itemsize(dtype) < bitmask_bytes:
        return "gaps", gaps.to(dtype)
    return "bitmask", pack_mask(flat)


def decode_indices(encoding: str, index: Tensor, numel: int) -> Tensor:
    """Sorted flat int64 indices of the kept entries, from :func:`encode_indices`' output."""
    if encoding == "bitmask":
        return unpack_mask(index, (numel,)).nonzero().reshape(-1)
    if encoding == "gaps":
        return torch.cumsum(index.to(torch.int64) + 1, 0) - 1
    raise ValueError(f"index encoding {encoding!r} is not valid: expected 'bitmask' or 'gaps'")


def safetensors_nbytes(tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict | None = None) -> int:
    """Exact size in bytes of the safetensors file holding tensors ``name -> (dtype, shape)``."""
    order = sorted(tensors, key=lambda n: (-_ST_ORDER.index(_ST_NAME[tensors[n][0]]), n))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for n in order:
        dtype, shape = tensors[n]
        size = math.prod(shape) * _itemsize(dtype)
        header[n] = {"dtype": _ST_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(text) + (-len(text)) % 8 + offset


# ------------------------------------------------------------------------------------------ save
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


# ------------------------------------------------------------------------------------------ load
def read_sparse(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a file written by :func:`save_sparse` (CPU tensors)."""
    return read_safetensors(path, META_KEY, FORMAT, "a fish sparse export")


@torch.no_grad()
def load_sparse(path: str | os.PathLike, model: nn.Module, *, verify: bool = True, strict: bool = True) -> nn.Module:
    """Write the state saved by :func:`save_sparse` into ``model`` and return it.

    ``model``: the same base weights wrapped with the same peft config, freshly (e.g.
    ``get_peft_model(fresh_base, config)``, or let :func:`load_sparse_into_base` build it); names
    are matched canonically, so a module holding the peft model works too. Every stored tensor is
    written whole: dense ones as stored, sparse ones as their reference with the kept entries
    replaced. The reference is the seeded LoRA/DoRA init (``"init"``: rebuilt here, so ``model``'s
    adapter values do not matter) or the value in ``model`` (``"model"``: peft's deterministic init
    of other tensor kinds, base weights under full fine-tuning: ``model`` must be fresh).

    Args:
        verify: raise ``ValueError`` when ``model``'s frozen base weights or a rebuilt reference
            differ from the exporter's (sha256 stored in the file), i.e. when the loaded model would
            not be the trained one.
        strict: raise ``ValueError`` when ``model`` has trainable parameters the file does not hold.

    Raises ``ValueError`` naming any stored tensor ``model`` lacks or whose shape differs, and
    when a reference cannot be rebuilt.
    """
    meta, tensors = read_sparse(path)
    info: dict[str, dict[str, Any]] = meta["tensors"]
    named = dict(model.named_parameters())
    canon = canonical_names(model)
    by_canon = {c: named[n] for n, c in canon.items()}
    where = _resolve(list(info), by_canon, path)
    target = {key: by_canon[where[key]] for key in info}
    for key, spec in info.items():
        shape = tuple(tensors[key].shape) if spec["encoding"] == "dense" else tuple(spec["shape"])
        if tuple(target[key].shape) != shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {list(shape)} but the model's parameter {where[key]!r} "
                f"has shape {list(target[key].shape)}: is the model built with the same config and peft config?"
            )
    if strict:
        extra = [c for c, p in by_canon.items() if p.requires_grad and c not in where.values()]
        if extra:
            raise ValueError(
                f"{path} holds no value for the model's trainable parameters {extra[:4]}"
                f"{' ...' if len(extra) > 4 else ''}: was it saved from a differently configured model? "
                "(strict=False loads anyway)"
            )
    if verify and meta.get("base_sha256") is not None:
        found = _base_fingerprint(model, canon, set(where.values()))
        if found != meta["base_sha256"]:
            raise ValueError(
                f"{path}: the model's frozen base weights differ from those the adapter was trained on "
                f"(fingerprint {found} != {meta['base_sha256']}); build the base the same way (same "
                "checkpoint / seed / dtype), or pass verify=False"
            )

    refs = _load_references(path, meta, model, target, where, verify)
    absent = [k for k, s in info.items() for t in _stored_keys(k, s) if t not in tensors]
    if absent:
        raise ValueError(f"{path} is corrupt: its metadata lists tensors {absent[:4]} the file does not hold")
    for key, spec in info.items():
        param = target[key]
        full = tensors[key] if spec["encoding"] == "dense" else _rebuild(path, key, spec, refs[key], tensors)
        param.copy_(full.reshape(param.shape).to(device=param.device, dtype=param.dtype))
    return model


def _load_references(
    path: str | os.PathLike,
    meta: Mapping[str, Any],
    model: nn.Module,
    target: Mapping[str, Tensor],
    where: Mapping[str, str],
    verify: bool,
) -> dict[str, Tensor]:
    """File key -> the value the frozen entries of each sparse tensor are rebuilt from (see :func:`load_sparse`)."""
    sparse = {k: s for k, s in meta["tensors"].items() if s["encoding"] != "dense"}
    init_keys = [where[k] for k, s in sparse.items() if s["ref"] == "init"]
    inits = init_values(model, meta.get("init_seed"), init_keys) if init_keys else {}
    refs: dict[str, Tensor] = {}
    for key, spec in sparse.items():
        ref = inits.get(where[key]) if spec["ref"] == "init" else target[key].detach().to("cpu").clone()
        if ref is None:
            raise ValueError(
                f"{path}: cannot rebuild the initial value of {key!r} (init_seed={meta.get('init_seed')!r}, "
                "peft config of the model): it must be a LoRA/DoRA tensor with a supported init_lora_weights"
            )
        if verify and _digest(ref) != spec["ref_sha256"]:
            raise ValueError(
                f"{path}: the rebuilt initial value of {key!r} ({spec['ref']!r} reference) differs from the "
                "exporter's, so its frozen entries would not match the trained model's. "
                + (
                    "Is the model freshly built from the same base (as load_sparse_into_base builds it)? "
                    if spec["ref"] == "model"
                    else "Different torch/peft version or platform? "
                )
                + "verify=False loads anyway"
            )
        refs[key] = ref
    return refs


def _rebuild(
    path: str | os.PathLike, key: str, spec: Mapping[str, Any], ref: Tensor, tensors: Mapping[str, Tensor]
) -> Tensor:
    """The flat full value of a sparse tensor: ``ref`` with the stored kept entries written in."""
    full = ref.reshape(-1).clone()
    if spec["encoding"] == "frozen":
        return full
    idx = decode_indices(spec["encoding"], tensors[f"{key}:{spec['encoding']}"], full.numel())
    values = tensors[f"{key}:values"]
    if idx.numel() != spec["kept"] or values.numel() != spec["kept"] or (spec["kept"] and int(idx[-1]) >= full.numel()):
        raise ValueError(
            f"{path}: tensor {key!r} is corrupt: {idx.numel()} indices and {values.numel()} values "
            f"for kept={spec['kept']} entries of {full.numel()}"
        )
    full[idx] = values.to(full.dtype)
    return full


def load_sparse_into_base(path: str | os.PathLike, base_model: nn.Module, *, verify: bool = True) -> nn.Module:
    """Wrap ``base_model`` (a fresh, unwrapped copy of the base the adapter was trained on; modified
    in place) with the stored peft config via ``peft.get_peft_model``, apply ``seeded_init_`` with
    the stored seed, and :func:`load_sparse` the file into it. Returns the peft model; the global
    RNG state is left as it was. ``verify``: see :func:`load_sparse`."""
    meta, _ = read_sparse(path)
    if meta.get("peft_config") is None:
        raise ValueError(
            f"{path} holds no peft config (it was saved from a model without peft): build the model "
            "yourself and call load_sparse(path, model)"
        )
    model = _fresh_model(base_model, meta["peft_config"], meta.get("adapter_name"), meta.get("init_seed"), copy=False)
    return load_sparse(path, model, verify=verify)


def merge_sparse(
    path: str | os.PathLike, base_model: nn.Module, *, verify: bool = True, safe_merge: bool = False
) -> nn.Module:
    """:func:`load_sparse_into_base`, then peft's ``merge_and_unload``: ``base_model`` with the adapter
    folded into its weights (and trained ``modules_to_save`` copies in place of the originals)."""
    return load_sparse_into_base(path, base_model, verify=verify).merge_and_unload(safe_merge=safe_merge)


# ------------------------------------------------------------------------------------------ masks
# ------------------------------------------------------------------------------------------ helpers
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _stored_keys(key: str, spec: Mapping[str, Any]) -> list[str]:
    """File tensors of one saved parameter."""
    enc = spec["encoding"]
    return [key] if enc == "dense" else [] if enc == "frozen" else [f"{key}:values", f"{key}:{enc}"]


def _bits(t: Tensor) -> Tensor:
    """Same-size integer view, so comparisons are bitwise (``-0.0 != 0.0``, NaN == same NaN)."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _digest(t: Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, t)
    return h.hexdigest()[:16]


def _hash_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(f"{t.dtype}:{t.numel()};".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().data)


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


def _fresh_model(
    base_model: nn.Module,
    config_dict: dict[str, Any] | None,
    adapter_name: str | None,
    init_seed: int | None,
    copy: bool,
) -> nn.Module:
    """``base_model`` wrapped with the peft config (if any) and seeded: what the loader starts from.
    ``copy``: wrap a deep copy (``base_model`` itself is left untouched). The global RNG is restored."""
    if config_dict is None:
        return base_model
    import copy as copy_module

    from peft import PeftConfig, get_peft_model

    config = PeftConfig.from_peft_type(**config_dict)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        model = get_peft_model(
            copy_module.deepcopy(base_model) if copy else base_model, config, adapter_name=adapter_name or "default"
        )
    if init_seed is not None:
        seeded_init_(model, int(init_seed))
    return model


def _resolve(names: Iterable[str], available: Mapping[str, Any], where: object) -> dict[str, str]:
    """Map stored names onto ``available`` ones: exactly, or with one leading prefix added/removed
    consistently (a LightningModule's ``model.`` vs the bare model)."""
    names = list(names)
    if all(n in available for n in names):
        return {n: n for n in names}
    probe = next(n for n in names if n not in available)
    for a in available:
        for strip, add in ((probe[: -len(a)], ""), ("", a[: -len(probe)])):
            if not (probe.endswith("." + a) if strip else a.endswith("." + probe)):
                continue
            mapped = {n: add + n.removeprefix(strip) for n in names if n.startswith(strip)}
            if len(mapped) == len(names) and all(v in available for v in mapped.values()):
                return mapped
    missing = [n for n in names if n not in available]
    raise ValueError(
        f"{where}: stored tensors {missing[:4]}{' ...' if len(missing) > 4 else ''} are not parameters of the model "
        f"(its names look like {list(available)[:3]}); build it with the same architecture and peft config"
    )


def _base_fingerprint(model: nn.Module, canon: Mapping[str, str], stored: set[str]) -> str | None:
    """sha256 (32 hex) of the base weights: parameters under the peft-wrapped model that are neither
    stored, adapter tensors, nor peft's unused ``original_module`` copies (``None`` if there are none).
    Hashes shapes, dtypes and bytes in name order, not the names (a consistent prefix may differ)."""
    skip = stored | {t.name for t in adapter_tensors(model)}
    params = dict(model.named_parameters())
    names = sorted(
        (c, n)
        for n, c in canon.items()
        if c not in skip and ".original_module." not in f".{c}" and ".modules_to_save." not in f".{c}"
    )
    if not names:
        return None
    h = hashlib.sha256()
    for _, n in names:
        h.update(f"{list(params[n].shape)}:".encode())
        _hash_tensor(h, params[n])
    return h.hexdigest()[:32]
