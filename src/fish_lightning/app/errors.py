"""Configuration errors of the apps (``fish-train``, ``fish-cli``): a bad value ends the command with one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work (message names it and what would be valid)."""


def config_error(err: BaseException, *, innermost: bool = False) -> ValueError | None:
    """The ``ValueError`` (a refused value) behind ``err``, or ``None``.

    Walks ``err`` and its causes: Hydra's ``InstantiationException`` and jsonargparse wrap the constructor's
    own ``ValueError``. By default the first ``ValueError`` along ``__cause__`` (ours, raised ``from`` a lower
    one, names the config key); ``innermost=True``: the deepest along ``__cause__`` or ``__context__``
    (jsonargparse re-raises its own ``ValueError`` around the constructor's).
    """
    found: ValueError | None = None
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ValueError):
            if not innermost:
                return current
            found = current
        current = (current.__cause__ or current.__context__) if innermost else current.__cause__
    return found
