"""What the callback refuses at fit start, each with the reason and what would work instead."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from fish_lightning.callback.settings import FishSettings
from fish_lightning.core.candidates import check_supported
from fish_lightning.core.mask_file import align_masks, load_mask
from fish_lightning.core.sharding import check_placements, is_sharded
from fish_lightning.core.sparse_state import refuse_compact


def check_fit(settings: FishSettings, trainer: Any, pl_module: nn.Module) -> None:
    """The run's length, the model, precision and optimizers against the settings."""
    max_epochs = trainer.max_epochs
    if settings.mask_epoch is not None and max_epochs is not None and 0 <= max_epochs <= settings.mask_epoch:
        raise ValueError(
            f"mask_epoch={settings.mask_epoch} is past the run: Trainer(max_epochs={max_epochs}) "
            f"trains epochs 0..{max_epochs - 1}; use mask_epoch < max_epochs or mask_epoch=None"
        )
    check_supported(pl_module)
    if settings.sparse_optimizer_state and getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            "sparse_optimizer_state=True does not support fp16 mixed precision with a GradScaler (the scaler "
            "unscales the optimizer's compact tensors before their gradients exist): use precision='bf16-mixed' "
            "or '32-true', or sparse_optimizer_state=False"
        )
    if settings.sparse_optimizer_state:
        for opt in trainer.optimizers:
            refuse_compact(opt)
    if (
        settings.calibration_samples is not None
        and settings.needs_fisher
        and not getattr(pl_module, "automatic_optimization", True)
        and not callable(getattr(pl_module, "fisher_loss", None))
    ):
        raise ValueError(
            "calibration_samples with manual optimization needs `fisher_loss(batch) -> Tensor[batch]` (per-example "
            f"losses) on {type(pl_module).__name__}: calibration must not update anything, and its training_step "
            "steps the optimizer"
        )
    if len(trainer.optimizers) > 1:
        rank_zero_warn(
            f"FISH assumes one optimizer; this run has {len(trainer.optimizers)}: warmup steps and the Fisher "
            "are counted per optimizer.step() call"
        )


def warn_short_warmup(settings: FishSettings, trainer: Any) -> None:
    """Warn when fewer optimizer steps than ``warmup_steps`` run before ``mask_epoch`` (a partial accumulation
    window at an epoch's end is one step)."""
    s = settings
    if s.mask_epoch is None or s.warmup_steps == 0 or not s.accumulates_warmup:
        return
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches)) if math.isfinite(batches) else math.inf
    if per_epoch * s.mask_epoch < s.warmup_steps:
        rank_zero_warn(
            f"warmup_steps={s.warmup_steps} but only {per_epoch * s.mask_epoch} optimizer "
            f"steps run before mask_epoch={s.mask_epoch}: the Fisher will use those steps only"
        )


def bound_to(refs: list, params: dict[str, nn.Parameter]) -> bool:
    """Whether ``refs`` (weak references) are exactly these candidate tensors, in order."""
    return len(refs) == len(params) and all(r() is p for r, p in zip(refs, params.values()))


def warn_new_model() -> None:
    rank_zero_warn(
        "FISH: this fit's model is not the one the callback's state belongs to (a new model, or other "
        "candidate tensors): its mask/Fisher are discarded and a new warmup starts. Use one callback per "
        "model, or a checkpoint (ckpt_path=...) to continue a run"
    )


def load_given_masks(path: str, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """``mask_path``'s masks (whole, CPU), keyed by the candidates' names (a file keyed by another holder of the
    same model, e.g. the bare ``PeftModel``, matches by suffix: :func:`~fish_lightning.core.mask_file.align_masks`),
    refused unless they are exactly the candidates with their shapes."""
    masks = align_masks(load_mask(path), list(params), where=f"mask_path={path!r}")
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


def check_strategy(settings: FishSettings, trainer: Any, params: dict[str, nn.Parameter]) -> set[str]:
    """Refuse strategies FISH cannot hold frozen entries under; return the candidates FSDP2 split across ranks."""
    for n, p in params.items():
        check_placements(p, f"candidate {n!r}")
    sharded = {n for n, p in params.items() if is_sharded(p)}
    strategy = type(trainer.strategy).__name__
    if "deepspeed" in strategy.lower():
        raise ValueError(
            f"FISH does not support {strategy}: DeepSpeed keeps its own fp32 master partitions of the "
            "parameters and steps them itself, so frozen entries cannot be held fixed from a callback; use "
            "strategy='ddp' or FSDP2 (ModelParallelStrategy with fully_shard)"
        )
    if strategy == "FSDPStrategy":
        raise ValueError(
            "FISH does not support FSDPStrategy (FSDP1): its flat parameters expose each rank's piece of a "
            "candidate as a 1-D view, not a placed shard; use FSDP2: ModelParallelStrategy with fully_shard "
            "in configure_model (see docs/distributed.md), or strategy='ddp'"
        )
    if not sharded:
        return sharded
    unsupported = {"sparse_optimizer_state": settings.sparse_optimizer_state,
                   "reselect_every_n_steps": settings.reselect_every_n_steps is not None,
                   "calibration_samples": settings.calibration_samples is not None}  # fmt: skip
    bad = [k for k, on in unsupported.items() if on]
    if bad:
        raise ValueError(
            f"FISH: {', '.join(bad)} is not supported with sharded parameters ({len(sharded)} FSDP2 "
            f"candidates, e.g. {sorted(sharded)[0]!r}): use the warmup Fisher with a fixed mask and "
            "the dense masked step, or a data-parallel strategy"
        )
    return sharded
