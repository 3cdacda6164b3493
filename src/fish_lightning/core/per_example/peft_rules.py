"""Rules for peft's layer types, recognised by duck typing (core/ imports no peft).

* DoRA magnitude ``m``: ``sum_t g[b,t,o] * (result + base)[b,t,o] / m_o`` (DoRA detaches the weight
  norm, so ``d result / d m_o = (result + base)_o / m_o``);
* IA3 ``ia3_l``: output scaling ``sum_t g * base(x)``; input scaling (feed-forward) ``sum_t x * (g W)``;
* LoHa / LoKr: the per-example gradient of the delta weight ``G_b = sum_t g^T x``, then the chain
  rule into each factor (Hadamard product of low-rank products; Kronecker product);
* VeRA ``vera_lambda_b`` / ``vera_lambda_d``: from ``h = A x`` and ``v = B (lambda_d * h)``.

LoRA's A and B are ``nn.Linear`` (:mod:`.torch_rules`). Calls with random adapter dropout in
training mode (module/rank dropout, VeRA dropout) cannot be reproduced and are marked missed.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fish_lightning.core.per_example.registry import (
    SKIP,
    Rule,
    batch_chunks,
    batched_input,
    flat_tokens,
    matmul_weight_grads,
    register_rule,
)


def _base_linear(module: nn.Module) -> nn.Linear | None:
    base = getattr(module, "base_layer", None)
    while base is not None and not isinstance(base, nn.Linear) and hasattr(base, "base_layer"):
        base = base.base_layer  # nested tuner layers
    return base if isinstance(base, nn.Linear) else None


def _paramdict(module: nn.Module, attr: str) -> nn.ParameterDict | None:
    d = getattr(module, attr, None)
    return d if isinstance(d, nn.ParameterDict) else None


def _active(module: nn.Module, attr: str) -> list[str]:
    d = _paramdict(module, attr)
    return [a for a in getattr(module, "active_adapters", ()) if d is not None and a in d]


def _not_in_use(module: nn.Module) -> bool:
    return bool(getattr(module, "merged", False) or getattr(module, "disable_adapters", False))


def _weight_of(base: nn.Linear, module: nn.Module) -> Tensor:
    """The base weight as ``[out, in]`` (``fan_in_fan_out`` layers store it transposed)."""
    w = base.weight.detach().float()
    return w.T if getattr(module, "fan_in_fan_out", False) else w


# --------------------------------------------------------------------------- DoRA
@register_rule(lambda m: type(m).__name__ == "DoraLinearLayer" and isinstance(getattr(m, "weight", None), Tensor))
class DoraMagnitudeRule(Rule):
    def claim(self, module):
        return {"weight": module.weight}

    def save(self, module, args, kwargs, output, batch):
        x = batched_input(args, kwargs, batch)
        base_layer = kwargs.get("base_layer")
        if x is None or base_layer is None:
            return None  # e.g. a call that is not batched: gets no gradient, else missed
        base = kwargs.get("base_result")
        with torch.no_grad():
            if base is None:  # peft recomputes the bias-free base output when LoRA dropout is active
                w = base_layer.weight
                base = F.linear(x, w.T if getattr(module, "fan_in_fan_out", False) else w)
            elif base_layer.bias is not None:
                base = base - base_layer.bias
            return output.detach() + base

    def grads(self, module, z, g, attrs, dense):
        b = g.shape[0]
        m = module.weight.detach().float()
        yield {"weight": (flat_tokens(g, b) * flat_tokens(z, b)).sum(1) / torch.where(m == 0, torch.ones_like(m), m)}


# --------------------------------------------------------------------------- IA3
def _is_ia3_linear(m: nn.Module) -> bool:
    return _paramdict(m, "ia3_l") is not None and hasattr(m, "is_feedforward") and _base_linear(m) is not None


@register_rule(_is_ia3_linear)
class IA3Rule(Rule):
    """One active ``ia3_l`` vector (several multiply together: left to the general rule)."""

    def claim(self, module):
        if len(module.ia3_l) != 1:
            return None
        return {f"ia3_l.{a}": p for a, p in module.ia3_l.items()}

    def save(self, module, args, kwargs, output, batch):
        if _not_in_use(module) or not _active(module, "ia3_l"):
            return SKIP
        x = batched_input(args, kwargs, batch)
        if x is None or output.shape[0] != batch:
            return None
        if module.is_feedforward:
            return x  # result = base(x * l): d l = sum_t x * (g W)
        (a,) = _active(module, "ia3_l")
        lvec = module.ia3_l[a].detach().float().flatten()
        with torch.no_grad():
            if bool((lvec == 0).any()):  # result = base(x) * l: recompute base(x) rather than divide by 0
                base = _base_linear(module)
                return F.linear(x.float(), _weight_of(base, module), None if base.bias is None else base.bias.float())
            return output.detach().float() / lvec

    def grads(self, module, saved, g, attrs, dense):
        (a,) = _active(module, "ia3_l")
        b = g.shape[0]
        g = flat_tokens(g, b)
        if module.is_feedforward:
            gin = g @ _weight_of(_base_linear(module), module)  # dL/d(x * l), [b, T, in]
            yield {f"ia3_l.{a}": (gin * flat_tokens(saved, b)).sum(1)}
        else:
            yield {f"ia3_l.{a}": (g * flat_tokens(saved, b)).sum(1)}


# --------------------------------------------------------------------------- LoHa, LoKr (delta-weight layers)
class _DeltaWeightRule(Rule):
    """``result = base(x) + x @ dW^T`` with ``dW`` a function of the factors: per-example ``G_b`` of
    ``dW``, then :meth:`factor_grads` (linear in ``G``), in bounded batch chunks."""

    factors: tuple[str, ...] = ()

    @abstractmethod
    def adapters(self, module: nn.Module) -> list[str]:
        """Names of the module's adapters that have this rule's factors."""

    @abstractmethod
    def factor_grads(self, module: nn.Module, adapter: str, G: Tensor) -> dict[str, Tensor]:
        """``{factor: per-example gradient}`` from the per-example gradients ``G`` of the adapter's delta
        weight (``[b, out, in]``; linear in ``G``)."""

    def claim(self, module):
        claim = {}
        for a in self.adapters(module):
            for f in self.factors:
                d = _paramdict(module, f)
                if d is not None and a in d:
                    claim[f"{f}.{a}"] = d[a]
        return claim or None

    def save(self, module, args, kwargs, output, batch):
        active = [a for a in getattr(module, "active_adapters", ()) if a in self.adapters(module)]
        if _not_in_use(module) or not active:
            return SKIP
        if module.training and any(
            float(getattr(module, "module_dropout", {}).get(a, 0.0)) > 0
            or float(getattr(module, "rank_dropout", {}).get(a, 0.0)) > 0
            for a in active
        ):
            return None  # random per-call dropout of the delta: not reproducible here
        x = batched_input(args, kwargs, batch)
        return None if x is None else (x, active)

    def grads(self, module, saved, g, attrs, dense):
        x, active = saved
        b = g.shape[0]
        g, x = flat_tokens(g, b), flat_tokens(x, b)
        for s in batch_chunks(b, g.shape[-1] * x.shape[-1]):
            out: dict[str, Tensor] = {}
            for a in active:
                grads = self.chunk_grads(module, a, g[s], x[s])
                out.update({f"{k}.{a}": v for k, v in grads.items() if f"{k}.{a}" in attrs})
            yield out

    def chunk_grads(self, module: nn.Module, adapter: str, g: Tensor, x: Tensor) -> dict[str, Tensor]:
        """Per-example factor gradients of a batch chunk (``g``: ``[b, T, out]``, ``x``: ``[b, T, in]``)."""
        return self.factor_grads(module, adapter, matmul_weight_grads(g, x))  # G: [b, out, in]


def _is_loha_linear(m: nn.Module) -> bool:
    return _paramdict(m, "hada_w1_a") is not None and _base_linear(m) is not None


@register_rule(_is_loha_linear)
class LoHaRule(_DeltaWeightRule):
    """``dW = (w1a w1b) * (w2a w2b) * s`` (peft's ``HadaWeight``); the CP (``hada_t1``) form: general rule."""

    factors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def adapters(self, module):
        t1 = getattr(module, "hada_t1", {})
        return [a for a in module.hada_w1_a if a not in t1]

    def factor_grads(self, module, a, G):
        w1a, w1b, w2a, w2b = (getattr(module, f)[a].detach().float() for f in self.factors)
        G = G * float(module.scaling[a])
        t1, t2 = G * (w2a @ w2b), G * (w1a @ w1b)
        return {"hada_w1_a": t1 @ w1b.T, "hada_w1_b": w1a.T @ t1, "hada_w2_a": t2 @ w2b.T, "hada_w2_b": w2a.T @ t2}


def _is_lokr_linear(m: nn.Module) -> bool:
    return _paramdict(m, "lokr_w1") is not None and _paramdict(m, "lokr_w2") is not None and _base_linear(m) is not None


@register_rule(_is_lokr_linear)
class LoKrRule(_DeltaWeightRule):
    """``dW = kron(w1, w2) * s``, ``w1`` = ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``, ``w2`` likewise;
    ``G`` viewed ``[b, m, p, n, q]``: ``dw1 = sum G w2``, ``dw2 = sum G w1``. CP (``lokr_t2``): general rule."""

    factors = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def adapters(self, module):
        t2 = getattr(module, "lokr_t2", {})
        return sorted(a for a in {*module.lokr_w1.keys(), *module.lokr_w1_a.keys()} if a not in t2)

    @staticmethod
    def _factor(module, a, name):
        full = getattr(module, f"lokr_{name}")
        if a in full:
            return full[a].detach().float(), None, None
        fa, fb = (
            getattr(module, f"lokr_{name}_a")[a].detach().float(),
            getattr(module, f"lokr_{name}_b")[a].detach().float(),
        )
        return fa @ fb, fa, fb

    def chunk_grads(self, module, a, g, x):
        """Without ``G``: ``dw1 = sum_t g_t[m, p] w2 x_t[n, q]^T``, ``dw2 = sum_t g_t[m, p]^T w1 x_t[n, q]``."""
        (w1, w1a, w1b), (w2, w2a, w2b) = self._factor(module, a, "w1"), self._factor(module, a, "w2")
        (m, n), (p, q) = w1.shape, w2.shape
        b, t = g.shape[:2]
        g, x = g.reshape(b, t, m, p) * float(module.scaling[a]), x.reshape(b, t, n, q)
        d1 = torch.einsum("btiq,btjq->bij", g @ w2, x)
        d2 = torch.einsum("btjp,btjq->bpq", torch.einsum("btip,ij->btjp", g, w1), x)
        return self._chain(d1, d2, w1a, w1b, w2a, w2b)

    def factor_grads(self, module, a, G):  # the same from G (reference; chunk_grads is what runs)
        (w1, w1a, w1b), (w2, w2a, w2b) = self._factor(module, a, "w1"), self._factor(module, a, "w2")
        (m, n), (p, q) = w1.shape, w2.shape
        G = G.reshape(G.shape[0], m, p, n, q) * float(module.scaling[a])
        d1, d2 = torch.einsum("bipjq,pq->bij", G, w2), torch.einsum("bipjq,ij->bpq", G, w1)
        return self._chain(d1, d2, w1a, w1b, w2a, w2b)

    @staticmethod
    def _chain(d1, d2, w1a, w1b, w2a, w2b):
        out: dict[str, Tensor] = {}
        for name, d, fa, fb in (("w1", d1, w1a, w1b), ("w2", d2, w2a, w2b)):
            if fa is None:
                out[f"lokr_{name}"] = d
            else:
                out[f"lokr_{name}_a"], out[f"lokr_{name}_b"] = d @ fb.T, fa.T @ d
        return out


# --------------------------------------------------------------------------- VeRA
def _is_vera_linear(m: nn.Module) -> bool:
    return _paramdict(m, "vera_lambda_b") is not None and hasattr(m, "vera_A") and _base_linear(m) is not None


@register_rule(_is_vera_linear)
class VeraRule(Rule):
    """``result = base(x) + lambda_b * B (lambda_d * A x)``: ``d lambda_b = sum_t g * v``,
    ``d lambda_d = sum_t (B^T (g * lambda_b)) * h`` with ``h = A x``, ``v = B (lambda_d * h)``."""

    def claim(self, module):
        claim = {}
        for a in module.vera_lambda_b:
            claim[f"vera_lambda_b.{a}"] = module.vera_lambda_b[a]
            if a in module.vera_lambda_d:
                claim[f"vera_lambda_d.{a}"] = module.vera_lambda_d[a]
        return claim or None

    def save(self, module, args, kwargs, output, batch):
        active = _active(module, "vera_lambda_d")
        if _not_in_use(module) or not active:
            return SKIP
        if module.training and any(not isinstance(module.vera_dropout[a], nn.Identity) and module.vera_dropout[a].p > 0
                                   for a in active):  # fmt: skip
            return None
        x = batched_input(args, kwargs, batch)
        return None if x is None else (x, active)

    def grads(self, module, saved, g, attrs, dense):
        x, active = saved
        b = g.shape[0]
        g, x = flat_tokens(g, b), flat_tokens(x, b)
        out: dict[str, Tensor] = {}
        for a in active:
            A = module.vera_A[a][:, : module.in_features].detach().float()
            B = module.vera_B[a][: module.out_features, :].detach().float()
            lb, ld = module.vera_lambda_b[a].detach().float(), module.vera_lambda_d[a].detach().float()
            h = x @ A.T  # [b, T, r]
            out[f"vera_lambda_b.{a}"] = (g * ((ld * h) @ B.T)).sum(1)
            out[f"vera_lambda_d.{a}"] = (((g * lb) @ B) * h).sum(1)
        yield {k: v for k, v in out.items() if k in attrs}
