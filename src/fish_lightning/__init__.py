"""fish-lightning: FISH-Tuning (Fisher-masked PEFT) as a PyTorch Lightning callback.

Names are imported lazily so that light tools (``fish-report``) do not pay for torch/Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from fish_lightning import _compat

__version__ = "0.2.0"
_EXPORTS = {
    "FisherMaskCallback": "fish_lightning.callback",
    "FishMasker": "fish_lightning.masker",
    "FishSettings": "fish_lightning.masker",
    "RunLoadError": "fish_lightning.app.runs",
    "TieWarning": "fish_lightning.core.selection",
    "load_run": "fish_lightning.app.runs",
    "load_tokenizer": "fish_lightning.app.runs",
    "num_kept": "fish_lightning.core.selection",
    "select_masks": "fish_lightning.core.selection",
    "sparsity_for_kept": "fish_lightning.core.budget",
}
__all__ = [*_EXPORTS, "__version__"]

_compat.install()  # 0.1.0 module paths (fish_lightning.modeling, ...) keep importing, with a warning


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fish_lightning' has no attribute {name!r}")
