"""The plain-loop driver of :meth:`FishMasker.wrap <fish_lightning.masker.masker.FishMasker.wrap>`: hooks that tell
the masker where an unchanged ``backward(); clip; step(); zero_grad()`` loop is."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook

from fish_lightning.core.fisher import batch_size
from fish_lightning.masker.backward_end import AtBackwardEnd
from fish_lightning.masker.enforcer import CompactState
from fish_lightning.masker.host import LoopHost

if TYPE_CHECKING:
    from fish_lightning.masker.masker import FishMasker


class PlainLoop:
    """What :meth:`FishMasker.wrap` installs for a plain loop: the host (counters, loss scale, collectives), a
    forward pre-hook on the model (a batch starts), a hook at the end of each backward (gradients masked before
    the caller clips them) and the optimizer's step hooks (warmup steps, enforcement, the freeze)."""

    def __init__(self, masker: FishMasker, model: nn.Module, grad_accumulation: int) -> None:
        if isinstance(grad_accumulation, bool) or not isinstance(grad_accumulation, int) or grad_accumulation < 1:
            raise ValueError(f"grad_accumulation={grad_accumulation!r} must be an integer >= 1")
        self.masker, self.model = masker, model
        self.host = LoopHost(grad_accumulation)
        masker.calibration_source = self.calibration_source
        masker.probe_runner = self._probe_forward
        self._probing = False
        self.calibration: tuple[Iterable[Any], Callable[[Any], Tensor]] | None = None
        self.optimizer: Optimizer | None = None
        self._handles: list[Any] = []
        self._in_step = False  # a forward inside the optimizer's step (a closure) is the same batch
        self._end = AtBackwardEnd(self._backward_done)
        masker.bind(model, self.host)
        masker.start(set(), self._given_masks(), None)

    def _given_masks(self) -> dict[str, Tensor] | None:
        from fish_lightning.masker.checks import load_given_masks

        s = self.masker.settings
        if s.mask_path is not None:
            return load_given_masks(s.mask_path, self.masker.params)
        from fish_lightning.masker.checks import check_budget

        check_budget(s, self.masker.params)
        return None

    def wrap(self, optimizer: Optimizer, scaler: Any) -> Optimizer:
        m = self.masker
        if self.optimizer is not None:
            raise RuntimeError("FishMasker.wrap was called twice: one masker enforces one optimizer")
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"FishMasker.wrap: {type(optimizer).__name__} is not a torch.optim.Optimizer")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p in m.params.values()):
            raise ValueError(f"FishMasker.wrap: {type(optimizer).__name__} holds none of the {len(m.params)} FISH "
                             f"candidates (e.g. {next(iter(m.params), None)!r}): build it from model.parameters()")
        if m.settings.reselect_every_n_steps is not None:
            raise ValueError("FishMasker.wrap: reselect_every_n_steps is supported by the Lightning callback only; "
                             "use a fixed mask (reselect_every_n_steps=None) in a plain loop")  # fmt: skip
        if m.settings.sparse_optimizer_state:
            from fish_lightning.core.sparse_state import refuse_compact

            refuse_compact(optimizer)
            if scaler is not None:
                raise ValueError("sparse_optimizer_state=True does not support fp16 AMP with a GradScaler: use "
                                 "bf16 or sparse_optimizer_state=False")  # fmt: skip
        self.optimizer, self.host.scaler = optimizer, scaler
        self.host.optimizers = [optimizer]
        self._handles = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            optimizer.register_step_pre_hook(self._before_step),
            # global: it runs after the optimizer's own post-hooks, so the freeze may register new ones
            register_optimizer_step_post_hook(self._after_step),
        ]
        self._handles += self._end.attach(m.params.values())
        if scaler is not None:
            self._handles.append(SkippedSteps(scaler, optimizer, self._step_skipped))
        m.begin_training(self.model)
        return optimizer

    def _step_skipped(self, optimizer: Optimizer) -> None:
        """``scaler.step`` found inf/NaN gradients and did not call ``optimizer.step()``: the masker still sees the
        step (a warmup step with non-finite gradients is left out of the Fisher, its squares dropped)."""
        self.masker.before_step(optimizer, automatic=True, inv_scale=1.0)
        self._in_step = False
        self.masker.gate.reopen()

    def unwrap(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.optimizer = [], None
        self.masker.end()

    def restore(self) -> None:
        m = self.masker
        restored, m.restored = m.restored, None
        m.bind(self.model, self.host)
        m.start(set(), None, restored)
        self.host.global_step = int(restored.get("global_step", self.host.global_step)) if restored else 0

    def _probe_forward(self, batch: tuple[tuple, dict]) -> Any:
        args, kwargs = batch
        self._probing = True
        try:
            return self.model(*args, **kwargs)
        finally:
            self._probing = False

    # hooks
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        m = self.masker
        if self._in_step or self._probing or not torch.is_grad_enabled():
            return
        if m.mask is None:
            batch = (args, kwargs)
            try:
                batch_size(batch)
            except (TypeError, IndexError):
                batch = None
            if batch is not None:
                m.start_batch(module, batch)
            else:
                m.freeze_if_due(module)

    def _backward_done(self) -> None:
        m = self.masker
        if m.mask is not None:
            from fish_lightning.core.masking import mask_gradients

            mask_gradients(m.params, m.mask.masks)  # frozen entries drop out of the caller's clipping
        else:
            m.after_backward(manual=False)

    def _before_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        m, scaler = self.masker, self.host.scaler
        inv = 1.0
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            inv = 1.0 / float(scaler.get_scale())
        if m.mask is not None and isinstance(m.enforcer, CompactState):
            m.enforcer.gather_grads()
        m.before_step(optimizer, automatic=True, inv_scale=inv)
        self._in_step = True

    def _after_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        if optimizer is not self.optimizer:
            return
        self._in_step = False
        self.host.global_step += 1
        self.masker.gate.reopen()
        self.masker.freeze_if_due(self.model)

    def calibration_source(self, model: nn.Module, reduction: str) -> tuple[Any, Any, Any]:
        if self.calibration is None:
            raise RuntimeError("FISH: calibration_samples is set: call masker.calibrate(loader, loss_fn) before "
                               "masker.wrap(optimizer); loss_fn(batch) -> Tensor[b], one loss per example")
        loader, loss_fn = self.calibration

        def checked(batch: Any) -> Tensor:
            losses = loss_fn(batch)
            n = batch_size(batch)
            if not isinstance(losses, Tensor) or tuple(losses.shape) != (n,):
                shape = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise ValueError(f"calibrate: loss_fn(batch) returned shape {shape} for a batch of {n} examples: "
                                 f"it must return one loss per example, shape [{n}]")  # fmt: skip
            return losses

        return loader, checked, lambda b: b


class SkippedSteps:
    """Tells ``on_skip(optimizer)`` when ``scaler.step(optimizer)`` skips the step (fp16 overflow), by an instance
    attribute over the ``GradScaler``'s method (``remove()`` takes it away again)."""

    def __init__(self, scaler: Any, optimizer: Optimizer, on_skip: Callable[[Optimizer], None]) -> None:
        self.scaler, self.stepped = scaler, False
        original = scaler.step

        def step(opt: Optimizer, *args: Any, **kwargs: Any) -> Any:
            mark = optimizer.register_step_pre_hook(self._mark)
            self.stepped = False
            try:
                result = original(opt, *args, **kwargs)
            finally:
                mark.remove()
            if opt is optimizer and not self.stepped:
                on_skip(opt)
            return result

        scaler.step = step

    def _mark(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        self.stepped = True

    def remove(self) -> None:
        self.scaler.__dict__.pop("step", None)
