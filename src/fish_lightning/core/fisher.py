"""Diagonal empirical Fisher estimates.

Pure torch; no Lightning import. The empirical Fisher of a parameter entry is the sum over
examples of the squared gradient of that example's log-likelihood. Two estimators:

* :func:`accumulate_squared_grads` -- the cheap one used during dense warmup: the squared
  *mini-batch* gradient, added once per optimizer step (a biased but rank-preserving proxy).
* :func:`per_example_fisher` -- the exact one (the original FISH procedure): true per-example
  squared gradients, here by a batch-size-1 loop (the reference every faster path is tested
  against).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fish_lightning.core.sharding import local

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
_CHUNK_ENTRIES = 1 << 24  # cap on per-example gradient entries materialised at once (fp32: 64 MiB)


def _is_dora_magnitude(module: nn.Module) -> bool:
    return type(module).__name__ == "DoraLinearLayer" and isinstance(getattr(module, "weight", None), Tensor)


class PerExampleSquaredGrads:
    """Exact sums of squared per-example gradients, captured from an ordinary forward + backward.

    Forward hooks on the modules that own the scored parameters keep each call's input; a tensor
    hook on the call's output turns the output gradient into per-example parameter gradients:

    * ``nn.Linear`` (incl. peft's LoRA A/B, adapters): ``G_b = sum_t g[b,t]^T x[b,t]`` (out x in),
      bias ``sum_t g[b,t]``;
    * ``nn.LayerNorm``: ``sum_t g[b,t] * xhat[b,t]`` and ``sum_t g[b,t]``;
    * ``nn.Embedding``: rows of ``g`` scattered by token id, per example;
    * peft's DoRA magnitude ``m``: ``sum_t g[b,t,o] * (result + base)[b,t,o] / m_o`` (DoRA detaches
      the weight norm, so ``d result / d m_o = (result + base)_o / m_o``).

    Requires the loss to be a sum (or mean) over independent examples. A module called several
    times in one forward (tied weights) buffers per-example gradients until the backward ends, so
    the square is taken of their sum; the same holds for one parameter shared by several modules.
    ``uncovered`` lists parameters no rule applies to; ``missed`` those whose per-example values
    were lost at run time (a batch-shared input, or use without the module's forward: see
    :meth:`unseen`); callers redo both exactly.

    Args:
        model: the module whose forward runs.
        params: name -> parameter to score (names as in ``model.named_parameters()``).
    """

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        by_id = {id(p): n for n, p in params.items()}
        self._rules: list[tuple[nn.Module, dict[str, str]]] = []  # module, {local attr: param name}
        covered: set[str] = set()
        for module in model.modules():
            owned = {a: by_id[id(p)] for a, p in module.named_parameters(recurse=False) if id(p) in by_id}
            if not owned:
                continue
            if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)) or _is_dora_magnitude(module):
                if isinstance(module, nn.Linear) and set(owned) - {"weight", "bias"}:
                    continue
                if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                    continue
                if isinstance(module, nn.Embedding) and (
                    module.max_norm is not None or module.scale_grad_by_freq or module.sparse
                ):
                    continue
                self._rules.append((module, owned))
                covered.update(owned.values())
        self._owned = {id(m): o for m, o in self._rules}
        self.uncovered = [n for n in params if n not in covered]
        self.missed: set[str] = set()  # covered, but a call's gradient was not per-example (see _on_forward)
        self.sums: dict[str, Tensor] = {}
        self.direct = False  # sums are the caller's accumulators (attach(into=...)): reset() keeps them
        self._params = {n: p for n, p in params.items() if n in covered}  # params' order: same on every rank
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}  # per parameter name: module calls in this forward (tied weights)
        self._pending: dict[str, Tensor] = {}  # per-example grads of multi-call parameters, [B, *shape]
        self._seen: set[str] = set()  # names that got a per-example contribution since reset()
        self._batch: int | None = None
        self.factor = 1.0

    @property
    def covered(self) -> list[str]:
        return list(self._params)

    # ------------------------------------------------------------------ lifecycle
    def attach(self, into: Mapping[str, Tensor] | None = None) -> PerExampleSquaredGrads:
        """Register the hooks (idempotent). The squares go into ``into`` (the caller's fp32 accumulators,
        shaped like the parameters: no second buffer) or, without it, into fp32 zero sums made here
        (whole-shaped, also for sharded parameters: the modules run on gathered weights) that
        :meth:`reset` clears."""
        if into is not None:
            self.sums, self.direct = {n: into[n] for n in self._params}, True
        elif not self.sums:
            self.sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self._params.items()}
        if not self._handles:
            for module, _ in self._rules:
                self._handles.append(module.register_forward_pre_hook(self._count, with_kwargs=False))
                self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def start_batch(self, batch_size: int, factor: float = 1.0) -> None:
        """Call before each forward: examples in the batch and a multiplier for its squared grads."""
        self._batch, self.factor, self._calls, self._pending = batch_size, factor, {}, {}

    def finish_batch(self) -> None:
        """Call after the backward: squares the buffered gradients of multi-call modules."""
        for name, g in self._pending.items():
            self.sums[name].add_(g.square().sum(0), alpha=self.factor)
        self._pending = {}

    def unseen(self, grads: Mapping[str, Tensor | None]) -> list[str]:
        """Covered names with a nonzero gradient that no hook saw: the parameter was used without its
        module's forward (e.g. ``F.linear(x, mod.weight)``, ``nn.MultiheadAttention.out_proj``)."""
        return [n for n, g in grads.items() if n in self._params and n not in self._seen and g is not None
                and bool(local(g).detach().ne(0).any())]  # fmt: skip

    def reset(self) -> None:
        """Start a new step: clear own sums (not the caller's accumulators) and the names seen."""
        if not self.direct:
            for s in self.sums.values():
                s.zero_()
        self._seen = set()

    # ------------------------------------------------------------------ hooks
    def _count(self, module: nn.Module, args: tuple) -> None:
        for name in self._owned[id(module)].values():
            self._calls[name] = self._calls.get(name, 0) + 1

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._batch is None or not isinstance(output, Tensor) or not output.requires_grad:
            return
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != self._batch or output.shape[0] != self._batch:
            # not batched: DoRA's identity probe of lora_A/B (gets no gradient), or an input shared by the
            # batch (e.g. BERT's [1, T] position ids): if a gradient arrives, per-example values are lost
            output.register_hook(lambda g, m=module: self._missed_call(m))
            return
        if _is_dora_magnitude(module):
            base_layer = kwargs["base_layer"]
            base = kwargs.get("base_result")
            with torch.no_grad():
                if base is None:  # peft recomputes the bias-free base output when LoRA dropout is active
                    w = base_layer.weight
                    base = F.linear(x, w.T if getattr(module, "fan_in_fan_out", False) else w)
                elif base_layer.bias is not None:
                    base = base - base_layer.bias
                saved = output.detach() + base
        elif isinstance(module, nn.Embedding):
            saved = x
        else:
            saved = x.detach()
        output.register_hook(lambda g, m=module, s=saved: self._on_grad(m, s, g))

    def _missed_call(self, module: nn.Module) -> None:
        self.missed.update(self._owned[id(module)].values())

    def _on_grad(self, module: nn.Module, x: Tensor, g: Tensor) -> None:
        for attr, name in self._owned[id(module)].items():
            multi = self._calls.get(name, 1) > 1
            self._seen.add(name)
            self._add(name, multi, self._per_example(module, attr, x, g, multi))

    def _add(self, name: str, multi: bool, per_example: Any) -> None:
        if multi:  # per_example is a [B, *shape] tensor
            pending = self._pending.get(name)
            self._pending[name] = per_example if pending is None else pending + per_example
        else:  # per_example is a callable accumulating squares into the sum
            per_example(self.sums[name], self.factor)

    # ------------------------------------------------------------------ rules
    def _per_example(self, module: nn.Module, attr: str, x: Tensor, g: Tensor, multi: bool) -> Any:
        b = g.shape[0]
        g = g.detach().float().reshape(b, -1, g.shape[-1])
        if isinstance(module, nn.Linear):
            x = x.float().reshape(b, -1, x.shape[-1])
            if attr == "bias":
                grads = g.sum(1)
                return grads if multi else _square_into(grads)
            if multi:
                return torch.einsum("bto,bti->boi", g, x)
            return _linear_square_into(g, x)
        if isinstance(module, nn.LayerNorm):
            if attr == "bias":
                grads = g.sum(1)
            else:
                xhat = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps).reshape(b, -1, g.shape[-1])
                grads = (g * xhat).sum(1)
            return grads if multi else _square_into(grads)
        if isinstance(module, nn.Embedding):
            if module.padding_idx is not None:  # autograd gives the padding row no gradient
                g = g.masked_fill(x.reshape(b, -1, 1) == module.padding_idx, 0.0)
            return _embedding_per_example(x, g, module.num_embeddings) if multi else _embedding_square_into(x, g)
        # DoRA magnitude: x holds (result + base)
        z = x.float().reshape(b, -1, x.shape[-1])
        m = module.weight.detach().float()
        grads = (g * z).sum(1) / torch.where(m == 0, torch.ones_like(m), m)
        return grads if multi else _square_into(grads)


def _square_into(grads: Tensor):
    def add(acc: Tensor, factor: float) -> None:
        acc.add_(grads.square().sum(0).view_as(acc), alpha=factor)

    return add


def _linear_square_into(g: Tensor, x: Tensor):
    """``acc += factor * sum_b (g_b^T x_b)^2`` in batch chunks of bounded size."""

    def add(acc: Tensor, factor: float) -> None:
        b = g.shape[0]
        step = max(1, _CHUNK_ENTRIES // max(1, acc.numel()))
        for i in range(0, b, step):
            per = torch.einsum("bto,bti->boi", g[i : i + step], x[i : i + step])
            acc.add_(per.square_().sum(0), alpha=factor)

    return add


def _embedding_square_into(ids: Tensor, g: Tensor):
    def add(acc: Tensor, factor: float) -> None:
        flat_ids = ids.reshape(ids.shape[0], -1)
        for b in range(flat_ids.shape[0]):
            rows, inv = flat_ids[b].unique(return_inverse=True)
            per = torch.zeros(rows.numel(), g.shape[-1], dtype=g.dtype, device=g.device).index_add_(0, inv, g[b])
            acc.index_add_(0, rows, per.square_(), alpha=factor)

    return add


def _embedding_per_example(ids: Tensor, g: Tensor, num_embeddings: int) -> Tensor:
    flat_ids = ids.reshape(ids.shape[0], -1)
    out = torch.zeros(flat_ids.shape[0], num_embeddings, g.shape[-1], dtype=g.dtype, device=g.device)
    for b in range(flat_ids.shape[0]):
        out[b].index_add_(0, flat_ids[b], g[b])
    return out


def per_example_fisher_hooks(
    loss_fn: LossFn,
    batch: Any,
    model: nn.Module,
    params: Mapping[str, Tensor],
    out: MutableMapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Same result as :func:`per_example_fisher` (the loop), from one forward + backward.

    Parameters no hook rule covers fall back to the exact batch-size-1 loop.
    """
    fisher = dict(out) if out is not None else zeros_like_params(params)
    n = batch_size(batch)
    hooks = PerExampleSquaredGrads(model, params).attach()
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
    redo = [k for k in params if k in hooks.missed or k in hooks.uncovered]
    if redo:
        per_example_fisher(loss_fn, batch, {k: params[k] for k in redo}, fisher)
    return fisher, n
