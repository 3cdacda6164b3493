"""Phase 2, masked training: the frozen mask, its counts and hashes, and the re-selection counters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fish_lightning.core.anatomy import mask_anatomy
from fish_lightning.core.fisher import accumulate_squared_grads, nonfinite_grads, zeros_like_params
from fish_lightning.core.sparse_state import frozen_digest
from fish_lightning.masker.log import info as rank_zero_info
from fish_lightning.masker.log import warn as rank_zero_warn


class FrozenMask:
    """The selected entries (``masks``: name -> bool, this rank's part, on the parameter's device) and what is
    known about them: kept counts over all ranks, SHA-256 hashes of the frozen entries taken at the freeze, the
    global step of the freeze, and the Fisher accumulated since for re-selection.

    Args:
        masks: name -> bool mask (True = trained), shaped like the (local) candidate.
        kept: name -> kept entries summed over ranks.
        digests: name -> hash of the frozen entries (:func:`~fish_lightning.core.sparse_state.frozen_digest`).
        freeze_step: global step at which the mask was (last) selected.
    """

    def __init__(self, masks: dict[str, Tensor], kept: dict[str, int], digests: dict[str, str] | None,
                 freeze_step: int | None) -> None:  # fmt: skip
        self.masks, self.kept, self.digests, self.freeze_step = masks, kept, digests, freeze_step
        self.refisher: dict[str, Tensor] | None = None  # squared gradients since the last selection
        self.steps_since_select = 0
        self.reselections = 0

    @classmethod
    def select(cls, masks: dict[str, Tensor], kept: dict[str, int], params: Mapping[str, nn.Parameter],
               freeze_step: int) -> FrozenMask:  # fmt: skip
        """A new mask; the frozen entries' hashes are taken now."""
        return cls(masks, kept, digests_of(params, masks), freeze_step)

    @property
    def num_kept(self) -> int:
        return sum(self.kept.values())

    def replace(self, masks: dict[str, Tensor], kept: dict[str, int], params: Mapping[str, nn.Parameter]) -> None:
        """A re-selected mask: new hashes, the re-selection Fisher restarts."""
        self.masks, self.kept, self.digests = masks, kept, digests_of(params, masks)
        self.refisher, self.steps_since_select = None, 0
        self.reselections += 1

    def add_squares(self, params: Mapping[str, nn.Parameter], inv_scale: float) -> None:
        """The current squared gradients of all candidates (frozen entries' too) into the re-selection Fisher."""
        if self.refisher is None:
            self.refisher = zeros_like_params(params)
        if not nonfinite_grads(params):
            accumulate_squared_grads(self.refisher, params, inv_scale)

    def moved(self, params: Mapping[str, Tensor]) -> list[str]:
        """Names whose frozen entries no longer hash to the value taken at the freeze."""
        if self.digests is None:
            raise RuntimeError("FISH verify: the mask has no frozen-entry hashes (none were checkpointed)")
        return [n for n, m in self.masks.items() if frozen_digest(params[n], m) != self.digests[n]]

    def density(self, params: Mapping[str, nn.Parameter]) -> dict[str, float]:
        """name -> kept fraction of the whole (unsharded) tensor."""
        return {n: c / max(1, params[n].numel()) for n, c in self.kept.items()}

    #: also log ``fish/density/<parameter name>`` per candidate tensor (hundreds of series for LoRA on every
    #: projection of a decoder); by default only the layer × kind aggregation is logged
    per_tensor_density: bool = False

    def log(self, trainer: Any, params: Mapping[str, nn.Parameter], per_tensor: bool | None = None) -> None:
        """Density overall and per layer × module kind (``fish/density/layer_<i>/<kind>``, layer ``other`` outside
        the numbered layers; :func:`~fish_lightning.core.anatomy.mask_anatomy`) to the trainer's loggers, per tensor
        too with ``per_tensor`` (default :attr:`per_tensor_density`), and one line to the console."""
        candidates = sum(p.numel() for p in params.values())
        total = self.num_kept / max(1, candidates)
        anatomy = mask_anatomy(self.kept, {n: p.numel() for n, p in params.items()})
        metrics = {f"fish/density/layer_{'other' if layer is None else layer}/{kind}": d
                   for layer, row in zip(anatomy["layers"], anatomy["density"])
                   for kind, d in zip(anatomy["kinds"], row) if d is not None}  # fmt: skip
        if self.per_tensor_density if per_tensor is None else per_tensor:
            metrics.update({f"fish/density/{n}": d for n, d in self.density(params).items()})
        metrics.update({"fish/density": total, "fish/kept": float(self.num_kept), "fish/candidates": float(candidates)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"FISH: mask frozen at global step {trainer.global_step}: kept {self.num_kept:,} of "
            f"{candidates:,} candidate entries (density {total:.4g})"
        )


def log_anatomy(trainer: Any, mask: FrozenMask, params: Mapping[str, nn.Parameter],
                fisher: Mapping[str, Tensor] | None) -> None:  # fmt: skip
    """To every TensorBoard logger: the density per layer × module kind as a labelled heatmap (tag
    ``fish/mask_anatomy``, :func:`~fish_lightning.masker.anatomy_image.anatomy_figure`; rows = layers, columns =
    kinds) and a histogram of log10 of the Fisher scores."""
    writers = [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_figure")]
    if not writers or trainer.global_rank != 0:
        return
    from fish_lightning.masker.anatomy_image import anatomy_figure  # matplotlib, only with a TensorBoard logger

    anatomy = mask_anatomy(mask.kept, {n: p.numel() for n, p in params.items()})
    scores = torch.cat([f.detach().reshape(-1).float().cpu() for f in fisher.values()]) if fisher else None
    for w in writers:
        w.add_figure("fish/mask_anatomy", anatomy_figure(anatomy), global_step=trainer.global_step, close=True)
        if scores is not None and scores.numel():
            w.add_histogram("fish/log10_fisher", scores.clamp_min(1e-30).log10(), global_step=trainer.global_step)


def report_verify(trainer: Any, report: dict[str, Any], strict: bool) -> None:
    """:meth:`FisherMaskCallback.verify`'s result at the end of fit: logged, and a warning (an error with
    ``strict``) when a frozen entry moved."""
    for logger in trainer.loggers:
        logger.log_metrics({"fish/frozen_unchanged": float(report["frozen_unchanged"])}, step=trainer.global_step)
    if report.get("untrained"):
        msg = (f"FISH verify: kept entries of {len(report['untrained'])} tensors are trained by no optimizer: "
               f"{report['untrained'][:4]}")  # fmt: skip
        if strict:
            raise RuntimeError(msg)
        rank_zero_warn(msg)
    if report["frozen_unchanged"]:
        rank_zero_info(f"FISH verify: all frozen entries unchanged; kept {report['kept']:,} of "
                       f"{report['candidates']:,}")  # fmt: skip
        return
    msg = f"FISH verify: frozen entries moved in {len(report['moved'])} tensors: {report['moved'][:4]}"
    if strict:
        raise RuntimeError(msg)
    rank_zero_warn(msg)


def digests_of(params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> dict[str, str]:
    return {n: frozen_digest(params[n], m) for n, m in masks.items()}
