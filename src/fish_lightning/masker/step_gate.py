"""Once per ``optimizer.step()``: a closure optimizer (LBFGS) evaluates its closure, and with it Lightning's
``on_before_optimizer_step``, several times inside one step; warmup counting and Fisher accumulation must not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.optim import Optimizer


class StepGate:
    """Open at each batch start and after each optimizer step; :meth:`take` is true once until reopened.

    Args:
        on_step_end: called after every step of a watched optimizer (e.g. to re-arm per-example hooks).
    """

    def __init__(self, on_step_end: Callable[[], None] | None = None) -> None:
        self.is_open = True
        self._on_step_end = on_step_end
        self._handles: list[Any] = []

    def watch(self, optimizers: Sequence[Optimizer]) -> None:
        self.remove()
        self._handles = [opt.register_step_post_hook(self._after_step) for opt in optimizers]

    def take(self) -> bool:
        """Whether this is the first call since the gate opened (then it closes)."""
        was, self.is_open = self.is_open, False
        return was

    def reopen(self) -> None:
        self.is_open = True

    def _after_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        self.is_open = True
        if self._on_step_end is not None:
            self._on_step_end()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
