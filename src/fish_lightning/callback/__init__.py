"""Lightning glue: :class:`FisherMaskCallback` dispatches Trainer hooks to its phase objects, which call the
pure core (:mod:`fish_lightning.core`)."""

from fish_lightning.callback.fisher_mask import FisherMaskCallback

__all__ = ["FisherMaskCallback"]
