"""A quiet start for ``fish-train``: filter third-party notices that say nothing about the run.

Only the exact known messages are dropped (deprecations inside transformers/Lightning that a user cannot act
on, Lightning's hardware lines and tips); every other warning and log line stays.
"""

from __future__ import annotations

import logging
import re
import warnings

#: (category, message regex) of warnings raised inside third-party code about itself.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (DeprecationWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (Warning, r".*`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (Warning, r"The '(train|val)_dataloader' does not have many workers"),
    (Warning, r"GPU available but not used"),
    (Warning, r"Checkpoint directory .* exists and is not empty"),
)

#: messages Lightning logs at INFO on every start.
KNOWN_LOG_LINES = re.compile(
    r"^(GPU available: |TPU available: |HPU available: |💡 Tip: |Loading `train_dataloader` to estimate|"
    r"You are using a CUDA device .* that has Tensor Cores|LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES|"
    r"Failed to load CPU gemm_4bit_forward from kernels-community)"  # bitsandbytes (imported by peft) on CPU
)
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch",
            "bitsandbytes.backends.cpu.ops")  # fmt: skip


class _DropKnown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not KNOWN_LOG_LINES.match(record.getMessage())


_FILTER = _DropKnown()


def quiet_start() -> None:
    """Install the filters (idempotent)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
