"""FISH calibration (the original FISH procedure): the Fisher from true per-example gradients of
training examples, computed without updating anything, with the model in eval mode.

Framework-free: the loader, the device move and the per-example loss come from the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from fish_lightning.core.fisher import (
    batch_size,
    per_example_fisher_hooks,
    probe_batch_dim,
    slice_batch,
    zeros_like_params,
)
from fish_lightning.masker.log import warn as rank_zero_warn


def calibrate_fisher(
    loader: Iterable[Any] | None, model: nn.Module, params: Mapping[str, Tensor], n_samples: int,
    loss_fn: Callable[[Any], Tensor], to_device: Callable[[Any], Any] = lambda b: b,
) -> tuple[dict[str, Tensor], int]:  # fmt: skip
    """Sum of squared per-example gradients over the first ``n_samples`` examples of ``loader``, with
    ``loss_fn(batch) -> Tensor[b]`` (per-example losses; see :func:`per_example_loss_fn`).

    Returns ``(fisher, examples_seen)``; nothing is updated and no ``.grad`` is touched.
    """
    if loader is None:
        raise RuntimeError("FISH calibration needs the training data loader, but there is none")
    fisher = zeros_like_params(params)
    seen, loop = 0, None
    with eval_mode(model), torch.enable_grad():
        for batch in loader:
            batch = to_device(batch)
            take = min(batch_size(batch), n_samples - seen)
            if loop is None and take >= 2:  # once: modules whose outputs are not batch-first get the exact loop
                flagged = probe_batch_dim(loss_fn, slice_batch(batch, 0, take), model, params)
                loop = set(flagged)
                if flagged:
                    rank_zero_warn(f"FISH calibration: {sorted({v[0] for v in flagged.values()})[:4]} do not carry "
                                   "the examples on dim 0 of their outputs (sequence-first?): their parameters "
                                   "are scored with the exact batch-size-1 loop")  # fmt: skip
            fisher, n = per_example_fisher_hooks(loss_fn, slice_batch(batch, 0, take), model, params, fisher,
                                                 loop or ())  # fmt: skip
            seen += n
            if seen >= n_samples:
                break
    if seen < n_samples:
        rank_zero_warn(f"calibration_samples={n_samples} but the training data yielded {seen} examples")
    return fisher, seen


def per_example_loss_fn(pl_module: nn.Module, loss_reduction: str = "mean"):
    """``batch -> losses``: the module's ``fisher_loss``, else ``training_step`` (logging muted), whose
    loss is a mean over the batch (``loss_reduction="mean"``) or a sum (``"sum"``)."""
    if callable(getattr(pl_module, "fisher_loss", None)):
        return partial(per_example_losses, pl_module)

    def loss_fn(batch: Any) -> Tensor:
        with muted_logging(pl_module):
            out = pl_module.training_step(batch, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        if not isinstance(loss, Tensor):
            raise TypeError(
                "FISH calibration: training_step returned no loss tensor; define "
                "`fisher_loss(batch) -> Tensor[batch]` on the LightningModule"
            )
        return loss * batch_size(batch) if loss_reduction == "mean" else loss  # -> the sum of per-example losses

    return loss_fn


def per_example_losses(pl_module: nn.Module, batch: Any) -> Tensor:
    """``pl_module.fisher_loss(batch)``, checked to be one loss per example (shape ``[b]``)."""
    losses = pl_module.fisher_loss(batch)
    n = batch_size(batch)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (n,):
        shape = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"{type(pl_module).__name__}.fisher_loss(batch) returned shape {shape} for a batch of {n} examples: "
            f"it must return one loss per example, shape [{n}] (no reduction over the batch)"
        )
    return losses


@contextlib.contextmanager
def muted_logging(pl_module: nn.Module) -> Iterator[None]:
    def _noop(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.log, pl_module.log_dict = _noop, _noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)
