"""Sparse adapter export: store only what FISH training changed, load it back or merge it.

One ``.safetensors`` file holds, for each masked tensor, the kept entries' values and their
positions (a packed bitmask or gap-encoded flat indices, whichever is smaller for that tensor),
every other trainable tensor (e.g. the classifier head) dense, and JSON metadata (the peft config,
the :func:`~fish_lightning.adapters.seeded_init.seeded_init_` seed, shapes and encodings).

Frozen entries are *not* stored: the loader rebuilds them. That is exact only when they still hold
their fit-start values and those values can be rebuilt: LoRA/DoRA tensors initialised with
``seeded_init_`` (or tensors peft initialises without randomness: ``B = 0``, DoRA magnitudes) and
masks chosen before any update (``FisherMaskCallback(warmup_steps=0, mask_epoch=None,
calibration_samples=N)``) or frozen entries rewound to their fit-start values. :func:`save_sparse`
checks every frozen entry bit for bit against that reference and stores a tensor dense (with a
:class:`DenseFallbackWarning`) when they differ, so a file never loads to a different model.

The parts: :mod:`~fish_lightning.adapters.sparse_save` (writing), :mod:`~fish_lightning.adapters.sparse_load`
(loading, merging) and :mod:`~fish_lightning.adapters.sparse_format` (the layout, encodings, sizes); their public
names, and those of :mod:`fish_lightning.core.mask_file`, are re-exported here. Pure torch + peft + safetensors; no
Lightning import.
"""

from __future__ import annotations

from fish_lightning.adapters.sparse_format import (
    ENCODINGS,
    FORMAT,
    META_KEY,
    decode_indices,
    encode_indices,
    safetensors_nbytes,
)
from fish_lightning.adapters.sparse_load import load_sparse, load_sparse_into_base, merge_sparse, read_sparse
from fish_lightning.adapters.sparse_save import DenseFallbackWarning, save_sparse
from fish_lightning.core.mask_file import (
    MASK_FORMAT,
    MASK_META_KEY,
    VERSION,
    check_mask,
    load_mask,
    read_safetensors,
    save_mask,
    write_safetensors,
)

__all__ = [
    "ENCODINGS",
    "FORMAT",
    "MASK_FORMAT",
    "MASK_META_KEY",
    "META_KEY",
    "VERSION",
    "DenseFallbackWarning",
    "check_mask",
    "decode_indices",
    "encode_indices",
    "load_mask",
    "load_sparse",
    "load_sparse_into_base",
    "merge_sparse",
    "read_safetensors",
    "read_sparse",
    "safetensors_nbytes",
    "save_mask",
    "save_sparse",
    "write_safetensors",
]
