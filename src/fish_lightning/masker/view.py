"""What every adapter (Lightning callback, Hugging Face callback) exposes of its :class:`FishMasker`: one
definition of the read-only view, so the adapters cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn


class MaskerView:
    """Read-only properties of ``self.masker`` (a :class:`~fish_lightning.masker.masker.FishMasker`)."""

    masker: Any

    @property
    def frozen(self) -> bool:
        """Whether the mask has been selected and is being enforced."""
        return self.masker.frozen

    @property
    def masks(self) -> Mapping[str, Tensor] | None:
        """name -> bool mask (True = trained) after the freeze (this rank's part when sharded), else ``None``."""
        return self.masker.masks

    @property
    def fisher(self) -> dict[str, Tensor] | None:
        """The warmup Fisher before the freeze; after it, the Fisher of the selection on CPU with ``keep_fisher``."""
        return self.masker.fisher

    @property
    def num_candidates(self) -> int:
        """Candidate entries (whole tensors; from the checkpoint's masks when loaded outside training)."""
        return self.masker.num_candidates

    @property
    def num_kept(self) -> int:
        """Kept candidate entries: exact after the freeze, the target ``k`` before it."""
        return self.masker.num_kept

    @property
    def freeze_step(self) -> int | None:
        """Optimizer steps done (the trainer's global step) when the mask was (last) selected; ``None`` before."""
        return self.masker.freeze_step

    @property
    def warmup_steps_done(self) -> int:
        """Optimizer steps in the warmup Fisher (non-finite ones and steps without a backward excluded)."""
        return self.masker.warmup_steps_done

    @property
    def skipped_nonfinite_steps(self) -> int:
        """Warmup steps left out of the Fisher for a non-finite gradient."""
        return self.masker.skipped_nonfinite_steps

    @property
    def reselections(self) -> int:
        """Re-selections since the freeze (``reselect_every_n_steps``)."""
        return self.masker.reselections

    @property
    def estimator_in_use(self) -> str:
        """The warmup estimator in effect: ``fisher_estimator``, or ``"batch_grad"`` after a fallback."""
        return self.masker.estimator_in_use

    def verify(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Check, against hashes taken at the freeze, that no frozen entry moved: ``{"frozen_unchanged": bool,
        "kept": int, "candidates": int, "moved": [names], "untrained": [names]}`` (``untrained``: tensors with kept
        entries that no optimizer trains, while the mask is enforced)."""
        return self.masker.verify(model)
