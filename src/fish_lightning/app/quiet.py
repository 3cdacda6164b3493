"""A quiet start for ``fish-train`` and ``fish-cli``, through each library's own settings.

- transformers: verbosity ``error`` and no progress bars (``transformers.utils.logging``), so loading a model
  prints no ``Loading weights`` bar and no load report; Hugging Face Hub: no progress bars.
- Lightning: its start-up info lines (hardware, tips) go through the ``rank_zero`` loggers, which keep only
  warnings and the info lines that ``fish_lightning``'s own code logs through them (by the record's source file);
  its hints that may not apply (``PossibleUserWarning``: dataloader workers, an unused GPU) are not shown;
  ``TRAINER_DEFAULTS`` turns off the model summary.
- Deprecation notices raised inside torch, Lightning, transformers and peft about their own code are not shown:
  a user of the app cannot act on them.

``fish_lightning``'s own lines, every other warning and every error stay.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

#: Trainer options fish-cli uses unless the user's config sets them (fish-train's trainer configs set them too).
TRAINER_DEFAULTS: dict[str, Any] = {"enable_model_summary": False}

_THIRD_PARTY = r"(torch|lightning|lightning_fabric|pytorch_lightning|transformers|peft|torchmetrics|huggingface_hub)"
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_FISH_DIR = str(Path(__file__).resolve().parents[1])
_done = False


class _OwnInfoOnly(logging.Filter):
    """Warnings and errors from anywhere; info lines only from ``fish_lightning``'s code."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or str(Path(record.pathname).resolve()).startswith(_FISH_DIR)


OWN_INFO_ONLY = _OwnInfoOnly()


def quiet_start() -> None:
    """Apply the settings above (idempotent; the first call also imports transformers' logging module)."""
    global _done
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=_THIRD_PARTY + r"(\.|$)")
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    for name in _RANK_ZERO_LOGGERS:
        if OWN_INFO_ONLY not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(OWN_INFO_ONLY)
    if _done:
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    _done = True


def show_fish_lines() -> None:
    """Print ``fish_lightning``'s INFO lines (the mask summary) when no logging is configured (``fish-cli``;
    ``fish-train``'s Hydra logging already shows them)."""
    fish = logging.getLogger("fish_lightning")
    if fish.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    fish.addHandler(handler)
    fish.setLevel(logging.INFO)
