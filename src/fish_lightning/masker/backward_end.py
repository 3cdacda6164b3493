"""One call at the end of every backward pass, for hosts without a hook of their own there (plain loops, HF)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle


class AtBackwardEnd:
    """Calls ``fn()`` once when a backward pass that reached any of the attached parameters has finished: the first
    parameter whose gradient is accumulated queues one callback on autograd's engine for that backward."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._queued = False

    def attach(self, params: Iterable[Tensor]) -> list[RemovableHandle]:
        return [p.register_post_accumulate_grad_hook(self._arrived) for p in params]

    def _arrived(self, p: Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._done)

    def _done(self) -> None:
        self._queued = False
        self._fn()
