"""The run's own lines in Hydra's ``<run dir>/train.log``.

Hydra writes the job's log through file handlers on the root logger, but Lightning's loggers (``lightning.pytorch``,
``lightning.fabric``: Lightning's and the FISH callback's ``rank_zero_info`` lines) do not propagate to it, so the
file stayed empty. :func:`attach` adds the root logger's file handlers to them for the duration of one run;
:func:`to_file` writes a line (e.g. the result line printed to the console) to those files only.
"""

from __future__ import annotations

import logging

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
_attached: list[tuple[logging.Logger, logging.Handler]] = []


def file_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def attach() -> None:
    """Send Lightning's log lines to the root logger's files too (replacing those of an earlier run)."""
    detach()
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if logger.propagate:
            continue
        for handler in file_handlers():
            if handler not in logger.handlers:
                logger.addHandler(handler)
                _attached.append((logger, handler))


def detach() -> None:
    while _attached:
        logger, handler = _attached.pop()
        logger.removeHandler(handler)


def to_file(message: str, name: str = "fish_lightning") -> None:
    """``message`` at INFO to the root logger's file handlers only (the console has it already)."""
    record = logging.LogRecord(name, logging.INFO, __file__, 0, message, None, None)
    for handler in file_handlers():
        if record.levelno >= handler.level:
            handler.handle(record)
