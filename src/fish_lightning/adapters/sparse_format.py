"""The sparse export's file format: index encodings, safetensors sizes and tensor digests.

Layout (``NAME`` is the canonical parameter name, see :mod:`fish_lightning.adapters.seeded_init`):
``NAME`` (dense tensor), ``NAME:values`` (kept values, flat order), ``NAME:bitmask`` (uint8,
:func:`~fish_lightning.core.masking.pack_mask`) or ``NAME:gaps`` (``idx[i] - idx[i-1] - 1`` with
``idx[-1] = -1``, in the smallest of uint8/uint16/uint32/int64 that holds the largest gap);
metadata key ``"fish_sparse"`` (JSON). Pure torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

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
