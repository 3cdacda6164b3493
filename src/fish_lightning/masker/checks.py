"""What any adapter refuses before training, framework-free: a budget that keeps nothing, a mask file that is not
one or does not fit the candidates."""

from __future__ import annotations

import torch
from torch import nn

from fish_lightning.core.mask_file import align_masks, load_mask
from fish_lightning.core.selection import num_kept
from fish_lightning.masker.settings import FishSettings


def check_budget(settings: FishSettings, params: dict[str, nn.Parameter]) -> None:
    """Refuse a sparsity that keeps no candidate entry (``k = round((1 - sparsity) * n)`` rounds to 0)."""
    sizes = [p.numel() for p in params.values()]
    n = sum(sizes)
    if settings.kept is not None:
        if settings.kept > n:
            raise ValueError(f"kept={settings.kept:,} is more than the {n:,} candidate entries: use kept <= {n:,}")
        return
    if settings.scope == "per_tensor":
        kept, largest = sum(num_kept(m, settings.sparsity) for m in sizes), max(sizes, default=0)
    else:
        kept, largest = num_kept(n, settings.sparsity), n
    if kept == 0 and n > 0:
        where = " per tensor (scope='per_tensor')" if settings.scope == "per_tensor" else ""
        raise ValueError(
            f"sparsity={settings.sparsity:g} keeps 0 of the {n:,} candidate entries{where}: use sparsity <= "
            f"{1 - 1 / largest:.6g} to keep at least one (k = round((1 - sparsity) * n))"
        )


def load_given_masks(path: str, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """``mask_path``'s masks (whole, CPU), refused unless they are exactly the candidates with their shapes."""
    try:
        raw = load_mask(path)
    except Exception as err:  # safetensors' own errors name neither the option nor what a mask file is
        raise ValueError(
            f"mask_path={path!r} is not a FISH mask file ({type(err).__name__}: {str(err).splitlines()[0][:160]}): "
            "a mask file is the fish_mask.safetensors a run saves (fish_lightning.core.mask_file.save_mask): "
            "bit-packed masks keyed by parameter name, not a Lightning or torch checkpoint"
        ) from err
    # a file keyed by another holder of the same model (e.g. the bare PeftModel) matches by name suffix
    masks = align_masks(raw, list(params), where=f"mask_path={path!r}")
    missing = [n for n in params if n not in masks]
    extra = [n for n in masks if n not in params]
    if missing or extra:
        first = f"no mask for candidate {missing[0]!r}" if missing else f"mask {extra[0]!r} is not a candidate"
        raise ValueError(
            f"mask_path={path!r} does not fit this model: {first} ({len(missing)} candidates without a mask, "
            f"{len(extra)} masks without a candidate; candidates look like {list(params)[:2]}): same model, peft "
            "config and include/exclude as the run that saved it?"
        )
    for n, p in params.items():
        if tuple(masks[n].shape) != tuple(p.shape):
            raise ValueError(f"mask_path={path!r}: mask {n!r} has shape {list(masks[n].shape)} but the candidate "
                             f"has shape {list(p.shape)}: same model and peft config (e.g. rank r)?")  # fmt: skip
    return masks


