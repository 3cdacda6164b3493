"""The general exact rule for a module no registered rule claims.

Per-example gradients of that one module's own parameters (direct ones, and those in its
``nn.ParameterDict`` / ``nn.ParameterList`` children) from its saved inputs and its output
gradient: ``torch.func.vmap`` over the examples of a ``vjp`` of the module's ``forward`` run by
``functional_call`` on that one example. Exact for any module that treats examples independently;
slower than a dedicated rule (one more forward and backward of the module per batch).

Not applied to modules with running statistics (batch norm: examples are not independent in
training, and a replay would update the statistics) or that renormalise their weight in place
(``nn.Embedding(max_norm=...)``). A call that cannot be replayed (a non-tensor output, random ops
inside the module, an op ``vmap`` does not support) raises inside :meth:`FuncFallbackRule.grads`;
the engine marks its parameters missed.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from fish_lightning.core.per_example.registry import Rule, batch_chunks, replaying

_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.Sequential, nn.ParameterDict, nn.ParameterList)
_NO_REPLAY = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class _Bare(nn.Module):
    """Runs ``module.forward`` itself: no hooks of ``module`` (the engine saw the raw output)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, *args, **kwargs):
        return self.m.forward(*args, **kwargs)


def own_parameters(module: nn.Module) -> dict[str, Tensor]:
    """Direct parameters plus those of parameter-container children (``ia3_l.default``, ...)."""
    own = dict(module.named_parameters(recurse=False))
    for child_name, child in module.named_children():
        if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
            own.update({f"{child_name}.{k}": p for k, p in child.named_parameters()})
    return own


class FuncFallbackRule(Rule):
    def claim(self, module):
        if isinstance(module, (*_CONTAINERS, *_NO_REPLAY)):
            return None
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            return None
        return own_parameters(module) or None

    def save(self, module, args, kwargs, output, batch):
        leaves, spec = tree_flatten((args, kwargs))
        batched = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch]
        if not batched:
            return None
        leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
        return leaves, spec, batched, output.dtype

    def grads(self, module, saved, g, attrs, dense):
        leaves, spec, batched, dtype = saved
        bare = _Bare(module)
        params = {a: _get(module, a).detach() for a in attrs}

        def forward(p, *rows):
            full = list(leaves)
            for i, row in zip(batched, rows):
                full[i] = row.unsqueeze(0)  # one example, batch dim 1
            args, kwargs = tree_unflatten(full, spec)
            return functional_call(bare, {f"m.{k}": v for k, v in p.items()}, args, kwargs)

        def one(g_row, *rows):
            out, pull = vjp(lambda p: forward(p, *rows), params)
            if not isinstance(out, Tensor):
                raise TypeError(f"{type(module).__name__}: output of type {type(out).__name__} is not a tensor")
            return pull(g_row.unsqueeze(0).to(out.dtype))[0]

        per_example = sum(p.numel() for p in params.values())
        g = g.detach().to(dtype)
        with replaying():
            for s in batch_chunks(g.shape[0], per_example):
                rows = [leaves[i][s] for i in batched]
                yield vmap(one, randomness="error")(g[s], *rows)


def _get(module: nn.Module, path: str) -> Tensor:
    for part in path.split("."):
        module = getattr(module, part) if not isinstance(module, nn.ParameterList) else module[int(part)]
    return module


FALLBACK = FuncFallbackRule()
