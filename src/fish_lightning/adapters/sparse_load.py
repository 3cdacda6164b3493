"""Loading a sparse export back: into a freshly built model (:func:`load_sparse`), into a base it wraps with the
stored peft config (:func:`load_sparse_into_base`), or merged into the base weights (:func:`merge_sparse`).

Also how the loader builds and matches that model, which :mod:`fish_lightning.adapters.sparse_save` checks against.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fish_lightning.adapters.seeded_init import adapter_tensors, canonical_names, init_values, seeded_init_
from fish_lightning.adapters.sparse_format import FORMAT, META_KEY, _digest, _hash_tensor, _stored_keys, decode_indices
from fish_lightning.core.mask_file import read_safetensors


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
