"""A shuffled training order that resumes mid-epoch, for the app's data modules.

Lightning restores the loop counters from a checkpoint, but a plain ``DataLoader`` starts its epoch
over: a run resumed from a checkpoint written after batch ``i`` would see the epoch's first batches
again. :class:`ResumableOrder` keeps the state that decides the order, the shuffle generator's state
at the start of the epoch and the batches handed to training since, and the data module puts it in
the checkpoint (``state_dict``/``load_state_dict``, which Lightning calls for a data module). On
resume the loader rebuilds the same epoch order and skips the batches already trained on. Every random
draw of an epoch (the loader's base seed, the sampler's permutation) happens when the epoch's iterator
is made, so the generator state at epoch start fixes the whole epoch.

Batches are counted when Lightning hands them to training (``on_before_batch_transfer``), not when
the loader yields them: Lightning fetches one batch ahead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableOrder:
    """The shuffle generator of a training loader (seeded with ``seed``) and its position in the epoch."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch_start: torch.Tensor | None = None  # generator state when this epoch's iterator was made
        self.batches = 0  # batches in this epoch
        self.consumed = 0  # batches of this epoch handed to training
        self._skip = 0
        self._loaded = False

    def reset(self) -> None:
        """Back to the seed (a new ``train_dataloader``), unless a checkpoint's state was loaded."""
        if not self._loaded:
            self.generator.manual_seed(self.seed)
            self.epoch_start, self.batches, self.consumed, self._skip = None, 0, 0, 0
        self._loaded = False

    def begin_epoch(self, batches: int) -> int:
        """Called as an epoch's iterator is made: returns how many of its batches to skip."""
        self.epoch_start, self.batches = self.generator.get_state(), batches
        skip, self._skip = self._skip, 0
        self.consumed = skip
        return skip

    def count(self) -> None:
        """One more batch handed to training."""
        self.consumed += 1

    def state_dict(self) -> dict[str, Any]:
        mid_epoch = self.epoch_start is not None and 0 < self.consumed < self.batches
        return {
            "seed": self.seed,
            # mid-epoch: replay this epoch's order and skip what was trained; else: the next epoch's order
            "generator": self.epoch_start if mid_epoch else self.generator.get_state(),
            "skip": self.consumed if mid_epoch else 0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._skip = int(state["skip"])
        self._loaded = True

    def loader(self, dataset: Any, **kwargs: Any) -> DataLoader:
        """A :class:`ResumableLoader` over ``dataset`` (``kwargs`` as for ``DataLoader``; ``shuffle=True``
        unless a ``sampler`` is given, which then draws from :attr:`generator` itself)."""
        self.reset()
        if "sampler" not in kwargs:
            kwargs.setdefault("shuffle", True)
            kwargs["generator"] = self.generator
        else:  # the loader's own base seed must not come from the global RNG (it would shift dropout on resume)
            kwargs.setdefault("generator", torch.Generator().manual_seed(self.seed))
        return ResumableLoader(dataset, order=self, **kwargs)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that reports each new epoch to its :class:`ResumableOrder` and skips the batches
    it says were trained on before a resume."""

    def __init__(self, *args: Any, order: ResumableOrder, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order = order

    # Lightning also saves a loader's state (and then knows the loader resumes mid-epoch), but loads it only when the
    # loader is made after the loops are restored, not when configure_optimizers made it first (estimated_stepping_
    # batches): the data module's state is the one that counts; loading the same state twice changes nothing.
    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.order.load_state_dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        skip = self.order.begin_epoch(len(self))
        it = super().__iter__()
        for _ in range(skip):
            next(it)
        return it


class ResumableDataMixin:
    """For a ``LightningDataModule`` with an ``order`` (:class:`ResumableOrder`) used by its ``train_dataloader``:
    counts trained batches and saves/loads the order with the checkpoint."""

    order: ResumableOrder
    trainer: Any

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.order.count()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"data_order": self.order.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "data_order" in state_dict:
            self.order.load_state_dict(state_dict["data_order"])
