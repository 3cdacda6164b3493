"""Where the mask puts the budget: kept entries per layer × module kind (pure; no torch needed).

A candidate name such as ``base_model.model.bert.encoder.layer.5.attention.self.value.lora_B.default.weight``
is split into its layer index (the first integer path component, ``5``) and its kind (the meaningful path
components after it, ``attention.value.lora_B``); names without an index (embeddings, a head) form the layer ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: path components that say nothing about what a tensor is (peft's wrappers and adapter name, the attribute)
_NOISE = {"weight", "bias", "default", "base_layer", "base_model", "model", "self", "module", "modules_to_save"}


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """``(layer index or None, kind)`` of a parameter name; see the module docstring."""
    parts = name.split(".")
    layer, rest = None, parts
    for i, part in enumerate(parts):
        if part.isdigit():
            layer, rest = int(part), parts[i + 1 :]
            break
    meaningful = [p for p in rest if p not in _NOISE and not p.isdigit()]
    kind = ".".join(meaningful) if meaningful else (parts[-1] if parts else name)
    if parts and parts[-1] == "bias" and meaningful:
        kind += ".bias"
    return layer, kind


def mask_anatomy(kept: Mapping[str, int], numel: Mapping[str, int]) -> dict[str, Any]:
    """Kept entries and totals per (layer, kind).

    Args:
        kept: name -> kept entries of that candidate.
        numel: name -> entries of that candidate.

    Returns:
        ``{"layers": [...], "kinds": [...], "kept": [[int]], "total": [[int]], "density": [[float | None]]}``,
        rows = layers in ascending order (``None``, i.e. outside the numbered layers, last), columns = kinds in
        first-seen order; ``density`` is ``None`` where a layer has no tensor of that kind.
    """
    cells: dict[tuple[int | None, str], list[int]] = {}
    kinds: list[str] = []
    for name, total in numel.items():
        layer, kind = layer_and_kind(name)
        if kind not in kinds:
            kinds.append(kind)
        cell = cells.setdefault((layer, kind), [0, 0])
        cell[0] += int(kept.get(name, 0))
        cell[1] += int(total)
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (x is None, x if x is not None else 0))
    grid_kept = [[cells.get((layer, k), [0, 0])[0] for k in kinds] for layer in layers]
    grid_total = [[cells.get((layer, k), [0, 0])[1] for k in kinds] for layer in layers]
    density = [[(k / t if t else None) for k, t in zip(rk, rt)] for rk, rt in zip(grid_kept, grid_total)]
    return {"layers": layers, "kinds": kinds, "kept": grid_kept, "total": grid_total, "density": density}


def by_kind(anatomy: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """kind -> ``{"kept", "total", "density"}`` summed over layers."""
    out = {}
    for j, kind in enumerate(anatomy["kinds"]):
        kept = sum(row[j] for row in anatomy["kept"])
        total = sum(row[j] for row in anatomy["total"])
        out[kind] = {"kept": kept, "total": total, "density": kept / total if total else 0.0}
    return out
