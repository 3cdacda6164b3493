"""The FISH lifecycle without a framework: :class:`FishMasker` owns the Fisher, the phases, the masks, the enforcer
and the checkpoint state; the Lightning and Hugging Face callbacks are thin adapters over it."""

from fish_lightning.masker.masker import FishMasker
from fish_lightning.masker.settings import FishSettings

__all__ = ["FishMasker", "FishSettings"]
