"""Which parameters FISH masks: the candidates, and which models FISH refuses.

Pure torch: peft's wrappers are recognised by name and attributes, without importing peft.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

# peft wraps `modules_to_save` (e.g. a classifier head) and trains the copy whole.
_MODULES_TO_SAVE = re.compile(r"(^|\.)modules_to_save\.")

#: Module attribute: when ``True``, the module's parameters are never default candidates (they stay
#: fully trainable), like peft's ``modules_to_save`` copies. Set by
#: :func:`fish_lightning.adapters.bottleneck.add_adapters`
#: on the classifier head; set it on any module of your own to the same effect.
ALWAYS_TRAINED_ATTR = "fish_always_trained"


def _compile(patterns: Sequence[str] | str | None, arg: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{arg}={patterns!r} must be None, a regex string or a list of regex strings")
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
    ``modules_to_save`` copies and inside modules with ``fish_always_trained = True``
    (:data:`ALWAYS_TRAINED_ATTR`, e.g. the head of our bottleneck adapters), which stay fully
    trainable. A plain model (full fine-tuning) thus has all its trainable weights, head included,
    as candidates. ``include`` (regexes, ``re.search``)
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
        always = always_trained_ids(model)
        params = dict(model.named_parameters())
        names = [n for n in trainable if not _MODULES_TO_SAVE.search(n) and id(params[n]) not in always]
    names = [n for n in names if not any(p.search(n) for p in exc)]
    if not names:
        raise ValueError(
            f"no candidate parameters (include={include!r}, exclude={exclude!r}); "
            f"trainable names look like: {_examples(trainable)}"
        )
    return names


def always_trained_ids(model: nn.Module) -> set[int]:
    """``id()`` of every parameter inside a module marked ``fish_always_trained = True``."""
    return {id(p) for m in model.modules() if getattr(m, ALWAYS_TRAINED_ATTR, False) is True for p in m.parameters()}


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` when FISH cannot mask ``model``'s PEFT method with a well-defined meaning.

    AdaLoRA is refused: its ``RankAllocator`` (``update_and_allocate``, to be called after every
    optimizer step) zeroes entries of ``lora_E`` in place on its own schedule, from importance scores
    computed from the same gradients FISH zeroes, so the two budgets fight: AdaLoRA would overwrite
    entries that FISH guarantees bit-identical, and FISH would skew AdaLoRA's rank allocation.
    """
    for m in model.modules():
        configs = getattr(m, "peft_config", None)
        kinds = [getattr(c, "peft_type", None) for c in configs.values()] if isinstance(configs, dict) else []
        kinds = [str(getattr(k, "value", k)).upper() for k in kinds]
        if "ADALORA" in kinds or any(c.__name__ == "AdaLoraLayer" for c in type(m).__mro__):
            raise ValueError(
                "FISH does not support AdaLoRA (peft AdaLoraConfig): AdaLoRA prunes lora_E entries in place "
                "with its own rank budget (update_and_allocate), which conflicts with the FISH mask; "
                "use peft method 'lora' or 'dora' (optionally at a matched budget, see fish_lightning.core.budget)"
            )


def _examples(names: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")
