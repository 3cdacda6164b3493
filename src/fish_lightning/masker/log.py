"""Messages of the FISH lifecycle: printed once (by rank 0) whatever runs the loop.

``info`` goes to the ``fish_lightning`` logger (a stream handler of its own at INFO level when the root logger has
none, as Lightning does for its logger); ``warn`` is a ``UserWarning``.
"""

from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger("fish_lightning")
log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not log.handlers:
    log.addHandler(logging.StreamHandler())
    log.propagate = False


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def info(message: str) -> None:
    if rank() == 0:
        log.info(message)


def warn(message: str, stacklevel: int = 3) -> None:
    if rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
