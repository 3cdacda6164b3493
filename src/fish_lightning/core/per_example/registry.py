"""The per-module rule registry (Opacus ``grad_sample/`` style).

A :class:`Rule` turns one module call's saved input and its output gradient into per-example
gradients of the module's own parameters. Rules are registered by module type or by a predicate
(duck typing: core/ imports no peft), later registrations first, so a new layer type is one new
rule::

    @register_rule(MyLayer)
    class MyLayerRule(Rule):
        def claim(self, module): return {"scale": module.scale}
        def save(self, module, args, kwargs, output, batch): return args[0].detach()
        def grads(self, module, x, g, attrs, dense): yield {"scale": (g * x).sum(1)}

A module no rule claims falls to the general ``torch.func`` rule (:mod:`.fallback`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

CHUNK_ENTRIES = 1 << 24  # cap on per-example gradient entries materialised at once (fp32: 64 MiB)

#: ``Rule.save`` returns this when the call does not use the claimed parameters (merged or disabled
#: adapter): no hook, no contribution and no "missed" mark.
SKIP = object()

#: What ``Rule.grads`` yields per attribute: per-example gradients ``[b, ...]`` (a batch chunk, b first),
#: or, only when ``dense`` is false, a callable ``add(acc, factor)`` adding their squares into ``acc``.
PerExample = Tensor | Callable[[Tensor, float], None]


class Rule(ABC):
    """Per-example gradients of one module type's own parameters.

    ``broadcast``: the rule accepts a call whose output has leading dim 1 while the batch has more
    examples (a batch-shared input, e.g. BERT's ``[1, T]`` position ids); the engine then hands the
    rule (and the rest of the model) the output expanded to the batch, whose gradient is per-example.
    """

    broadcast = False

    @abstractmethod
    def claim(self, module: nn.Module) -> dict[str, Tensor] | None:
        """``{attribute path: parameter}`` the rule computes for ``module`` (paths as in
        ``module.named_parameters()``), or ``None`` if it does not apply to this instance."""

    @abstractmethod
    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor, batch: int) -> Any:
        """At the forward: what :meth:`grads` needs (detached), ``None`` if this call's per-example
        gradients cannot be had (marked missed if a gradient arrives), or :data:`SKIP`."""

    @abstractmethod
    def grads(
        self, module: nn.Module, saved: Any, g: Tensor, attrs: list[str], dense: bool
    ) -> Iterator[dict[str, PerExample]]:
        """At the backward (``g``: the output gradient, ``[B, ...]``): yields ``{attr: per-example
        gradients}`` for ``attrs``, batch chunk by batch chunk (see :func:`batch_chunks`)."""


_RULES: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def register_rule(match: type | tuple[type, ...] | Callable[[nn.Module], bool]):
    """Decorator registering a :class:`Rule` subclass (or instance) for modules of type ``match``
    (``isinstance``) or for which the predicate ``match(module)`` is true. Later registrations are
    tried first; a rule whose :meth:`Rule.claim` returns ``None`` passes to the next one."""
    pred = (lambda m, t=match: isinstance(m, t)) if isinstance(match, (type, tuple)) else match

    def deco(rule):
        _RULES.insert(0, (pred, rule() if isinstance(rule, type) else rule))
        return rule

    return deco


def find_rule(module: nn.Module) -> tuple[Rule, dict[str, Tensor]] | None:
    """The first registered rule that claims ``module``, with its claim."""
    for pred, rule in _RULES:
        if pred(module):
            claim = rule.claim(module)
            if claim is not None:
                return rule, claim
    return None


def registered_rules() -> list[Rule]:
    return [r for _, r in _RULES]


# --------------------------------------------------------------------------- helpers for rules
_REPLAY = [0]


@contextlib.contextmanager
def replaying():
    """Forwards run inside (a rule recomputing a module) are invisible to the engine's hooks."""
    _REPLAY[0] += 1
    try:
        yield
    finally:
        _REPLAY[0] -= 1


def is_replaying() -> bool:
    return _REPLAY[0] > 0


def batch_chunks(b: int, entries_per_example: int) -> Iterator[slice]:
    """Slices of ``range(b)`` holding at most :data:`CHUNK_ENTRIES` per-example entries (at least one example)."""
    step = max(1, CHUNK_ENTRIES // max(1, entries_per_example))
    for i in range(0, b, step):
        yield slice(i, min(b, i + step))


def flat_tokens(t: Tensor, b: int) -> Tensor:
    """``[B, ..., d]`` -> ``[B, T, d]`` in fp32 (all middle dims folded into one token dim)."""
    return t.detach().float().reshape(b, -1, t.shape[-1])


def first_input(args: tuple, kwargs: dict, *names: str) -> Tensor | None:
    x = args[0] if args else next((kwargs[n] for n in names if n in kwargs), None)
    return x if isinstance(x, Tensor) else None


def batched_input(args: tuple, kwargs: dict, batch: int, *names: str) -> Tensor | None:
    """The call's first input, detached, if it is a tensor with the batch as leading dim."""
    x = first_input(args, kwargs, "input", "x", "hidden_states", *names)
    if x is None or x.dim() < 1 or x.shape[0] != batch:
        return None
    return x.detach()


def square_sum_into(grads: Tensor) -> Callable[[Tensor, float], None]:
    def add(acc: Tensor, factor: float) -> None:
        acc.view(-1).add_(grads.reshape(grads.shape[0], -1).square().sum(0), alpha=factor)

    return add


def matmul_weight_grads(g: Tensor, x: Tensor) -> Tensor:
    """``sum_t g[b,t]^T x[b,t]`` (out x in) per example, ``g``: ``[b, T, out]``, ``x``: ``[b, T, in]``."""
    return torch.einsum("bto,bti->boi", g, x)
