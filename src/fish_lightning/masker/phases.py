"""The lifecycle's phases and their transitions (see :class:`~fish_lightning.masker.masker.FishMasker`).

``WARMUP`` (:class:`~fish_lightning.masker.warmup.WarmupFisher`: dense steps feed the Fisher) --freeze-->
``FROZEN`` (:class:`~fish_lightning.masker.frozen.FrozenMask`: exactly k entries trained, enforced on the
optimizers) --reselect--> ``FROZEN`` (a new mask of the same size); a new model starts over in ``WARMUP``. With
``mask_path``, ``calibration_samples`` or a selection that reads no Fisher the warmup may be empty
(``warmup_steps=0``): the freeze then happens before the first step.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    WARMUP = "warmup"
    FROZEN = "frozen"
