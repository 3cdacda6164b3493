"""Errors of the apps (``fish-train``, ``fish-cli``): a value fish refuses ends the command with one line.

Only fish's own refusals become that line: a :class:`ConfigError`, or a ``ValueError`` raised by a
``fish_lightning`` module (the callback's settings, the data modules, the model builders). A ``ValueError``
from anywhere else (torch, transformers, a user's code) keeps its traceback.
"""

from __future__ import annotations

import importlib.util


class ConfigError(ValueError):
    """A configuration value that cannot work (message names it and what would be valid)."""


#: module that must import -> (what needs it, the pip command that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "jsonargparse": ("fish-cli", 'pip install "fish-lightning[cli]"'),
    "hydra_plugins.hydra_joblib_launcher": ("hydra/launcher=local_parallel", 'pip install "fish-lightning[sweep]"'),
    "hydra_plugins.hydra_submitit_launcher": ("hydra/launcher=slurm", 'pip install "fish-lightning[sweep]"'),
    "hydra_plugins.hydra_optuna_sweeper": ("hydra/sweeper=optuna_lr_sparsity", 'pip install "fish-lightning[sweep]"'),
    "bitsandbytes": ("model.net.quantization", 'pip install "fish-lightning[quant]"'),
}


def missing_extra(module: str) -> str | None:
    """``None`` when ``module`` imports, else one line naming what needs it and the pip command."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        found = False
    if found:
        return None
    needed_by, pip = EXTRAS[module]
    return f"{needed_by} needs {module.split('.')[-1].replace('_', '-')}, which is not installed: {pip}"


def raised_by_fish(err: BaseException) -> bool:
    """Whether ``err`` is a :class:`ConfigError` or was raised in a ``fish_lightning`` module's code."""
    if isinstance(err, ConfigError):
        return True
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("fish_lightning")


def config_error(err: BaseException, *, innermost: bool = False) -> ValueError | None:
    """fish's own refusal (a ``ValueError`` :func:`raised_by_fish`) behind ``err``, or ``None``.

    Walks ``err`` and its causes: Hydra's ``InstantiationException`` and jsonargparse wrap the constructor's
    own ``ValueError``. By default the first along ``__cause__`` (ours, raised ``from`` a lower one, names the
    config key); ``innermost=True``: the deepest along ``__cause__`` or ``__context__`` (jsonargparse re-raises
    its own ``ValueError`` around the constructor's).
    """
    found: ValueError | None = None
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ValueError) and raised_by_fish(current):
            if not innermost:
                return current
            found = current
        current = (current.__cause__ or current.__context__) if innermost else current.__cause__
    return found


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a multi-line message's lines joined by ``"; "``)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
