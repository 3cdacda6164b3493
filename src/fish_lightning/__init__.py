"""fish-lightning: FISH-Tuning (Fisher-masked PEFT) as a PyTorch Lightning callback."""

from fish_lightning.callback import FisherMaskCallback
from fish_lightning.selection import TieWarning, num_kept, select_masks

__all__ = ["FisherMaskCallback", "TieWarning", "num_kept", "select_masks"]
__version__ = "0.1.0"
