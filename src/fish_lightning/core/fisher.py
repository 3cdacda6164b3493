"""Diagonal empirical Fisher estimates.

Pure torch; no Lightning import. The empirical Fisher of a parameter entry is the sum over
examples of the squared gradient of that example's log-likelihood. Two estimators:

* :func:`accumulate_squared_grads` -- the cheap one used during dense warmup: the squared
  *mini-batch* gradient, added once per optimizer step (a biased but rank-preserving proxy).
* :func:`per_example_fisher` -- the exact one (the original FISH procedure): true per-example
  squared gradients, here by a batch-size-1 loop (the reference every faster path is tested
  against), and :func:`per_example_fisher_hooks` -- the same from one forward + backward, by
  the per-module rules of :mod:`fish_lightning.core.per_example`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from fish_lightning.core.per_example import PerExampleSquaredGrads, Rule, register_rule
from fish_lightning.core.sharding import local

__all__ = [
    "PerExampleSquaredGrads",
    "Rule",
    "accumulate_squared_grads",
    "batch_size",
    "nonfinite_grads",
    "per_example_fisher",
    "per_example_fisher_hooks",
    "register_rule",
    "slice_batch",
    "zeros_like_params",
]

LossFn = Callable[[Any], Tensor]


def zeros_like_params(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """fp32 zero accumulators shaped like ``params`` (on their devices; a sharded parameter's local shard)."""
    return {n: torch.zeros(local(p).shape, dtype=torch.float32, device=p.device) for n, p in params.items()}


def nonfinite_grads(params: Mapping[str, Tensor]) -> dict[str, float]:
    """name -> first non-finite gradient value, for the parameters whose ``.grad`` has one."""
    bad: dict[str, float] = {}
    for n, p in params.items():
        g = None if p.grad is None else local(p.grad)
        if g is not None and not bool(torch.isfinite(g).all()):
            bad[n] = float(g[~torch.isfinite(g)].reshape(-1)[0])
    return bad


def accumulate_squared_grads(
    fisher: MutableMapping[str, Tensor], params: Mapping[str, Tensor], inv_scale: float = 1.0
) -> None:
    """``fisher[n] += (inv_scale * p.grad) ** 2`` in fp32 for every parameter that has a grad.

    ``inv_scale`` undoes a loss scale still applied to the gradients (e.g. fused optimizers
    under fp16 AMP unscale inside ``step``).
    """
    for n, p in params.items():
        g = p.grad
        if g is None:
            continue
        g = local(g).detach().float()
        if inv_scale != 1.0:
            g = g * inv_scale
        fisher[n].addcmul_(g, g)


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the leading dim of its first tensor (dict/list/tuple aware)."""
    t = _first_tensor(batch)
    if t is None:
        raise TypeError(f"cannot find a tensor in the batch (type {type(batch).__name__}) to size it")
    return int(t.shape[0])


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """The examples ``[start:stop]`` of a batch; tensors sliced on dim 0, the rest kept as is."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        sliced = {k: slice_batch(v, start, stop) for k, v in batch.items()}
        try:
            return type(batch)(sliced)  # dict, OrderedDict, transformers' BatchEncoding
        except TypeError:
            return sliced
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        return None
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def per_example_fisher(
    loss_fn: LossFn,
    batch: Any,
    params: Mapping[str, Tensor],
    out: MutableMapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Sum over the batch's examples of squared per-example gradients (batch-size-1 loop).

    Args:
        loss_fn: maps a batch of ``b`` examples to their losses, shape ``[b]`` or a scalar when
            ``b == 1`` (negative log-likelihood of each example, e.g. summed over its tokens).
        batch: the examples; sliced on dim 0 with :func:`slice_batch`.
        params: name -> parameter (``requires_grad=True``) to score.
        out: accumulators to add into (created as fp32 zeros when ``None``).

    Returns:
        ``(fisher, n_examples)``. No ``.grad`` is touched and no parameter changes.
    """
    fisher = dict(out) if out is not None else zeros_like_params(params)
    names = list(params)
    tensors = [params[n] for n in names]
    n = batch_size(batch)
    for i in range(n):
        loss = loss_fn(slice_batch(batch, i, i + 1)).sum()
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                g = g.detach().float()
                fisher[name].addcmul_(g, g)
    return fisher, n


# --------------------------------------------------------------------------- per-example, by hooks
# The engine and its per-module rules: fish_lightning.core.per_example (re-exported here).


def per_example_fisher_hooks(
    loss_fn: LossFn,
    batch: Any,
    model: nn.Module,
    params: Mapping[str, Tensor],
    out: MutableMapping[str, Tensor] | None = None,
    loop: Collection[str] = (),
) -> tuple[dict[str, Tensor], int]:
    """Same result as :func:`per_example_fisher` (the loop), from one forward + backward.

    Parameters no rule covers, those whose per-example values were lost at run time, and those named in
    ``loop`` (e.g. :func:`probe_batch_dim`'s) fall back to the exact batch-size-1 loop.
    """
    fisher = dict(out) if out is not None else zeros_like_params(params)
    n = batch_size(batch)
    hooks = PerExampleSquaredGrads(model, {k: p for k, p in params.items() if k not in loop}).attach()
    try:
        if hooks.covered:
            hooks.start_batch(n)
            loss = loss_fn(batch).sum()
            grads = torch.autograd.grad(loss, [params[k] for k in hooks.covered], allow_unused=True)
            hooks.finish_batch()
            hooks.missed.update(hooks.unseen(dict(zip(hooks.covered, grads))))
    finally:
        hooks.detach()
    for name, s in hooks.sums.items():
        if name not in hooks.missed:
            fisher[name].add_(s)
    redo = [k for k in params if k in hooks.missed or k in hooks.uncovered or k in loop]
    if redo:
        per_example_fisher(loss_fn, batch, {k: params[k] for k in redo}, fisher)
    return fisher, n


def probe_batch_dim(
    run: Callable[[Any], Any], batch: Any, model: nn.Module, params: Mapping[str, Tensor]
) -> dict[str, list[str]]:
    """Parameters of modules whose outputs do not carry the examples on dim 0 (sequence-first layouts), found by
    running ``run`` on the batch and on all but its last example (no gradient, RNG forked); ``{}`` for a batch of
    one example. See :meth:`PerExampleSquaredGrads.probe_batch_dim`."""
    n = batch_size(batch)
    if n < 2:
        return {}
    return PerExampleSquaredGrads(model, params).probe_batch_dim(run, batch, slice_batch(batch, 0, n - 1), n)
