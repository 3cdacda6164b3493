"""Rules for torch's own layers: ``nn.Linear`` (incl. peft's LoRA A/B and our bottleneck adapters),
``nn.LayerNorm`` and ``nn.Embedding`` (also fed a batch-shared ``[1, T]`` input)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fish_lightning.core.per_example.registry import (
    Rule,
    batch_chunks,
    batched_input,
    first_input,
    flat_tokens,
    matmul_weight_grads,
    register_rule,
)


def _own(module: nn.Module, allowed: set[str]) -> dict[str, Tensor] | None:
    own = dict(module.named_parameters(recurse=False))
    return own if own and set(own) <= allowed else None


@register_rule(nn.Linear)
class LinearRule(Rule):
    """``G_b = sum_t g[b,t]^T x[b,t]`` (out x in), bias ``sum_t g[b,t]``; squared in bounded batch chunks."""

    def claim(self, module):
        return _own(module, {"weight", "bias"})

    def save(self, module, args, kwargs, output, batch):
        x = batched_input(args, kwargs, batch)
        if x is not None and (getattr(first_input(args, kwargs), "_fish_probe", False) or _is_identity_probe(x)):
            output._fish_probe = True  # and lora_B(lora_A(eye)) downstream
            return None  # peft DoRA's probe of lora_A/B when batch == in_features: gets no gradient, not a call
        return x

    def grads(self, module, x, g, attrs, dense):
        b = g.shape[0]
        g, x = flat_tokens(g, b), flat_tokens(x, b)
        out: dict = {}
        if "bias" in attrs:
            out["bias"] = g.sum(1)
        if "weight" in attrs:
            out["weight"] = matmul_weight_grads(g, x) if dense else _linear_square_into(g, x)
        yield out


def _is_identity_probe(x: Tensor) -> bool:
    """``torch.eye(in)`` fed to a layer (peft's DoRA reads ``lora_B(lora_A(eye))`` and detaches it)."""
    if x.dim() != 2 or x.shape[0] != x.shape[1] or x.requires_grad:
        return False
    return bool(torch.equal(x, torch.eye(x.shape[0], dtype=x.dtype, device=x.device)))


def _linear_square_into(g: Tensor, x: Tensor):
    """``acc += factor * sum_b (g_b^T x_b)^2`` in batch chunks of bounded size."""

    def add(acc: Tensor, factor: float) -> None:
        for s in batch_chunks(g.shape[0], acc.numel()):
            acc.add_(matmul_weight_grads(g[s], x[s]).square_().sum(0), alpha=factor)

    return add


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    """``sum_t g[b,t] * xhat[b,t]`` and ``sum_t g[b,t]`` (normalised over the last dim only)."""

    def claim(self, module):
        return _own(module, {"weight", "bias"}) if len(module.normalized_shape) == 1 else None

    def save(self, module, args, kwargs, output, batch):
        return batched_input(args, kwargs, batch)

    def grads(self, module, x, g, attrs, dense):
        b = g.shape[0]
        g = flat_tokens(g, b)
        out: dict = {}
        if "bias" in attrs:
            out["bias"] = g.sum(1)
        if "weight" in attrs:
            xhat = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
            out["weight"] = (g * xhat.reshape(g.shape)).sum(1)
        yield out


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Rows of ``g`` scattered by token id, per example. A batch-shared id row (``[1, T]``, e.g. BERT's
    position ids) is exact too: the engine expands the output to the batch, whose gradient is
    per-example (the values the model sees are the same as broadcasting would give)."""

    broadcast = True

    def claim(self, module):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return None
        return _own(module, {"weight"})

    def save(self, module, args, kwargs, output, batch):
        ids = first_input(args, kwargs)
        if ids is not None and ids.dim() >= 1 and ids.shape[0] == 1 and batch > 1:
            ids = ids.expand(batch, *ids.shape[1:])
        return ids if ids is not None and ids.dim() >= 1 and ids.shape[0] == batch else None

    def grads(self, module, ids, g, attrs, dense):
        b = g.shape[0]
        g = flat_tokens(g, b)
        ids = ids.reshape(b, -1)
        if module.padding_idx is not None:  # autograd gives the padding row no gradient
            g = g.masked_fill(ids.unsqueeze(-1) == module.padding_idx, 0.0)
        yield {
            "weight": _embedding_per_example(ids, g, module.num_embeddings) if dense else _embedding_square_into(ids, g)
        }


def _embedding_square_into(ids: Tensor, g: Tensor):
    """``acc[row] += factor * sum_b (sum of g[b, t] over the tokens t of example b with id row)^2``: one ``unique``
    over (example, id) keys for the whole batch (no Python loop over examples)."""

    def add(acc: Tensor, factor: float) -> None:
        rows_total = acc.shape[0]
        b = ids.shape[0]
        keys = (torch.arange(b, device=ids.device).unsqueeze(1) * rows_total + ids.long()).reshape(-1)
        uniq, inv = keys.unique(return_inverse=True)  # sorted: example-major, like a loop over examples
        per = torch.zeros(uniq.numel(), g.shape[-1], dtype=g.dtype, device=g.device)
        per.index_add_(0, inv, g.reshape(-1, g.shape[-1]))
        acc.index_add_(0, uniq % rows_total, per.square_(), alpha=factor)

    return add


def _embedding_per_example(ids: Tensor, g: Tensor, num_embeddings: int) -> Tensor:
    out = torch.zeros(ids.shape[0], num_embeddings, g.shape[-1], dtype=g.dtype, device=g.device)
    for b in range(ids.shape[0]):
        out[b].index_add_(0, ids[b], g[b])
    return out
