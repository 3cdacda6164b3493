"""Which parameters FISH masks: the candidates.

Pure torch (peft is imported lazily, only to recognise its wrappers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

# peft wraps `modules_to_save` (e.g. a classifier head) and trains the copy whole.
_MODULES_TO_SAVE = re.compile(r"(^|\.)modules_to_save\.")


def _compile(patterns: Sequence[str] | str | None, arg: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{arg} pattern {p!r} is not a valid regular expression: {err}") from err
    return out


def validate_patterns(include: Sequence[str] | str | None, exclude: Sequence[str] | str | None) -> None:
    """Raise ``ValueError`` naming any pattern that is not a valid regular expression."""
    _compile(include, "include")
    _compile(exclude, "exclude")


def find_candidates(
    model: nn.Module,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters FISH scores and masks.

    Default: every parameter with ``requires_grad=True`` except those inside peft's
    ``modules_to_save`` copies, which stay fully trainable. ``include`` (regexes, ``re.search``)
    replaces that default with the trainable parameters matching any pattern; ``exclude`` then
    removes matches. A pattern that matches no trainable parameter is an error, as is an empty
    result.
    """
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to mask")
    for arg, pats in (("include", inc), ("exclude", exc)):
        for pat in pats:
            if not any(pat.search(n) for n in trainable):
                raise ValueError(
                    f"{arg} pattern {pat.pattern!r} matches no trainable parameter; "
                    f"trainable names look like: {_examples(trainable)}"
                )
    if inc:
        names = [n for n in trainable if any(p.search(n) for p in inc)]
    else:
        names = [n for n in trainable if not _MODULES_TO_SAVE.search(n)]
    names = [n for n in names if not any(p.search(n) for p in exc)]
    if not names:
        raise ValueError(
            f"no candidate parameters (include={include!r}, exclude={exclude!r}); "
            f"trainable names look like: {_examples(trainable)}"
        )
    return names


def _examples(names: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")
