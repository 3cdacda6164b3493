"""Messages of the FISH lifecycle: printed once (by rank 0) whatever runs the loop.

``info`` goes to the ``fish_lightning`` logger at INFO level: to whatever handlers the application configured (it
propagates: Hydra's console and ``train.log``, pytest's capture), and, while the root logger has no handler at all
(a plain script), to stderr; ``warn`` is a ``UserWarning``.
"""

from __future__ import annotations

import logging
import os
import warnings


class _UnlessConfigured(logging.StreamHandler):
    """stderr, only while the root logger has no handler (logging not configured by the application)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


log = logging.getLogger("fish_lightning")
log.setLevel(logging.INFO)
if not any(isinstance(h, _UnlessConfigured) for h in log.handlers):
    log.addHandler(_UnlessConfigured())


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
