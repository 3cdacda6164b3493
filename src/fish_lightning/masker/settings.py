"""The callback's settings, validated in one place (also used by ``fish-train`` to check a ``fish`` config)."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from fish_lightning.core.candidates import validate_patterns
from fish_lightning.core.selection import SCOPES, SCORERS, get_scorer

ESTIMATORS = ("per_example", "batch_grad")
REDUCTIONS = ("mean", "sum")


def check_int(name: str, value: Any, minimum: int | None = None, *, none_ok: bool = False, hint: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int ``>= minimum`` (or ``None`` if allowed)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        allowed = "None or an integer" if none_ok else "an integer"
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name}={value!r} must be {allowed}{bound}{hint}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is ``True`` or ``False`` (not ``'false'``, not 0)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid: expected one of {tuple(choices)}")


@dataclass(frozen=True)
class FishSettings:
    """Exactly :class:`~fish_lightning.callback.FisherMaskCallback`'s constructor arguments (documented there);
    constructing one validates them and raises the callback's ``ValueError``."""

    sparsity: float = 0.9
    warmup_steps: int = 50
    mask_epoch: int | None = 1
    include: Sequence[str] | str | None = None
    exclude: Sequence[str] | str | None = None
    scope: str = "global"
    selection: str = "fisher"
    seed: int = 0
    calibration_samples: int | None = None
    keep_fisher: bool = False
    fisher_estimator: str = "per_example"
    rewind_frozen: bool = False
    sparse_optimizer_state: bool = False
    strict: bool = False
    reselect_every_n_steps: int | None = None
    loss_reduction: str = "mean"
    mask_path: str | None = None
    kept: int | None = None

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity={s!r} is out of range: expected a number with 0 <= sparsity < 1")
        object.__setattr__(self, "sparsity", float(s))
        for name in ("keep_fisher", "rewind_frozen", "sparse_optimizer_state", "strict"):
            check_bool(name, getattr(self, name))
        check_int("calibration_samples", self.calibration_samples, 1, none_ok=True)
        self._check_mask_path()
        check_choice("selection", self.selection, tuple(SCORERS))
        fisherless = [n for n, scorer in SCORERS.items() if not scorer.needs_fisher]
        # no warmup Fisher needed: one from calibration, a given mask, or a selection that reads no Fisher
        calibrated = self.calibration_samples is not None or self.mask_path is not None or not self.needs_fisher
        hint = f" (0 is allowed only with calibration_samples, mask_path or selection in {fisherless})"
        check_int("warmup_steps", self.warmup_steps, 0 if calibrated else 1, hint="" if calibrated else hint)
        check_int("mask_epoch", self.mask_epoch, 0, none_ok=True)
        if self.mask_epoch == 0 and not calibrated:
            raise ValueError(
                "mask_epoch=0 freezes the mask before any warmup step, so there is no gradient to "
                "estimate the Fisher from: use mask_epoch>=1, mask_epoch=None, or calibration_samples"
            )
        check_choice("scope", self.scope, SCOPES)
        check_choice("fisher_estimator", self.fisher_estimator, ESTIMATORS)
        check_choice("loss_reduction", self.loss_reduction, REDUCTIONS)
        check_int("reselect_every_n_steps", self.reselect_every_n_steps, 1, none_ok=True)
        if self.reselect_every_n_steps is not None and self.selection == "random":
            raise ValueError("reselect_every_n_steps with selection='random' would only reshuffle the mask: "
                             "use selection='fisher', 'reverse' or 'magnitude'")  # fmt: skip
        check_int("seed", self.seed)
        check_int("kept", self.kept, 1, none_ok=True)
        if self.kept is not None:
            if self.sparsity != FishSettings.sparsity:
                raise ValueError(f"kept={self.kept} and sparsity={self.sparsity:g} both set the budget: pass one")
            if self.scope == "per_tensor":
                raise ValueError("kept sets one budget over all candidates: use scope='global' or 'normalized' "
                                 "(or sparsity with scope='per_tensor')")  # fmt: skip
        validate_patterns(self.include, self.exclude)

    def _check_mask_path(self) -> None:
        if self.mask_path is None:
            return
        if isinstance(self.mask_path, bool) or not isinstance(self.mask_path, (str, os.PathLike)) \
                or not os.path.isfile(self.mask_path):  # fmt: skip
            raise ValueError(f"mask_path={self.mask_path!r} is not a file: give a fish_mask.safetensors (save_mask)")
        object.__setattr__(self, "mask_path", os.fspath(self.mask_path))
        clash = {"calibration_samples": self.calibration_samples is not None,
                 "reselect_every_n_steps": self.reselect_every_n_steps is not None}  # fmt: skip
        bad = [k for k, on in clash.items() if on]
        if bad:
            raise ValueError(f"mask_path fixes the mask: it cannot be combined with {', '.join(bad)}")

    @property
    def needs_fisher(self) -> bool:
        """The selection ranks entries by a Fisher (``"fisher"`` or ``"reverse"``; not with ``mask_path``)."""
        return get_scorer(self.selection).needs_fisher and self.mask_path is None

    @property
    def accumulates_warmup(self) -> bool:
        """The Fisher comes from dense warmup steps (not from calibration)."""
        return self.calibration_samples is None and self.needs_fisher

    @property
    def unused_warmup(self) -> bool:
        """Calibration at ``mask_epoch`` makes ``warmup_steps`` meaningless (worth a warning)."""
        return self.calibration_samples is not None and self.mask_epoch is not None and self.warmup_steps > 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
