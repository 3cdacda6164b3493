"""The engine: hooks, multi-call buffering, missed/unseen detection, gradient checkpointing.

Forward hooks on the modules that own the scored parameters hand each call's input to the
module's rule (:mod:`.registry`); a tensor hook on the call's output turns the output gradient
into per-example parameter gradients, which are squared in place. A module called several times
in one forward (tied weights) buffers ``[B, *shape]`` per-example gradients until
:meth:`~PerExampleSquaredGrads.finish_batch`, so the square is taken of their sum.

Gradient checkpointing recomputes forwards during the backward. Calls made while a backward runs
(``torch._C._current_graph_task_id() != -1``) are never counted as calls: with non-reentrant
checkpointing the recomputation of a module already hooked in the forward is ignored (its first
output carries the gradient); with reentrant checkpointing the forward ran under ``no_grad`` (counted,
not hooked) and the recomputation is the call that gets hooked. Either way a checkpointed module
is one call and squares in place. With non-reentrant checkpointing the inputs a rule saves in the
forward go through the checkpoint's own saved-tensor hooks (packed like any tensor autograd saves
there: dropped after the forward, recomputed on unpack in the backward), so the hooks hold no
activation through the forward that checkpointing would have freed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fish_lightning.core.per_example import peft_rules, torch_rules  # noqa: F401  (registers the rules)
from fish_lightning.core.per_example.fallback import FALLBACK
from fish_lightning.core.per_example.registry import SKIP, Rule, find_rule, is_replaying
from fish_lightning.core.sharding import local

log = logging.getLogger("fish_lightning.per_example")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _checkpoint_hooks() -> tuple[Any, Any] | None:
    """The (pack, unpack) saved-tensor hooks of a non-reentrant ``torch.utils.checkpoint`` region being
    run (its forward) or recomputed (in the backward); ``None`` elsewhere."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if not hooks:
        return None
    kind = getattr(hooks[0], "__qualname__", "")
    return hooks if kind.startswith(("_checkpoint_hook.", "_recomputation_hook.")) else None


class _Packed:
    """A tensor of a rule's saved value, handed to a checkpoint's pack hook."""

    __slots__ = ("handle",)

    def __init__(self, handle: Any) -> None:
        self.handle = handle


def _pack(pack: Any, saved: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: _Packed(pack(t)) if isinstance(t, Tensor) else t, saved)


def _unpack(unpack: Any, packed: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: unpack(t.handle) if isinstance(t, _Packed) else t, packed)


class PerExampleSquaredGrads:
    """Exact sums of squared per-example gradients, captured from an ordinary forward + backward.

    Rules (:func:`~fish_lightning.core.per_example.registry.register_rule`) cover ``nn.Linear``,
    ``nn.LayerNorm``, ``nn.Embedding`` (also batch-shared ids), peft's DoRA, IA3, LoHa, LoKr and
    VeRA layers; any other module owning scored parameters gets the general ``torch.func`` rule
    (listed in ``fallback_modules``). Requires the loss to be a sum (or mean) over independent
    examples. ``uncovered`` lists parameters no rule applies to; ``missed`` those whose per-example
    values were lost at run time (a call no rule could take, or use without the module's forward:
    see :meth:`unseen`); callers redo both exactly.

    Args:
        model: the module whose forward runs.
        params: name -> parameter to score (names as in ``model.named_parameters()``).
    """

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        by_id = {id(p): n for n, p in params.items()}
        self._rules: list[tuple[nn.Module, Rule, dict[str, str]]] = []  # module, rule, {attr path: param name}
        self.fallback_modules: list[str] = []
        for module in model.modules():
            found = find_rule(module)
            if found is None:
                continue
            rule, claim = found
            owned = {a: by_id[id(p)] for a, p in claim.items() if id(p) in by_id}
            if owned:
                self._rules.append((module, rule, owned))
        ruled = {id(m) for m, _, _ in self._rules}
        for mname, module in model.named_modules():  # modules without a rule: the general rule (a tied
            claim = {} if id(module) in ruled else FALLBACK.claim(module) or {}  # parameter: each user counts)
            owned = {a: by_id[id(p)] for a, p in claim.items() if id(p) in by_id}
            if owned:
                self._rules.append((module, FALLBACK, owned))
                self.fallback_modules.append(mname or type(module).__name__)
        covered = {n for _, _, o in self._rules for n in o.values()}
        if self.fallback_modules:
            log.info("FISH per-example Fisher: general torch.func rule for %d module(s): %s",
                     len(self.fallback_modules), ", ".join(self.fallback_modules))  # fmt: skip
        self._owned = {id(m): (rule, o) for m, rule, o in self._rules}
        self.uncovered = [n for n in params if n not in covered]
        self.missed: set[str] = set()  # covered, but a call's gradient was not per-example (see _on_forward)
        self.failures: dict[str, str] = {}  # module name -> why its rule failed at run time
        self.sums: dict[str, Tensor] = {}
        self.direct = False  # sums are the caller's accumulators (attach(into=...)): reset() keeps them
        self._scatter: dict[str, Callable[[Tensor], Tensor]] = {}  # sharded: whole-shaped call sum -> own part
        self._params = {n: p for n, p in params.items() if n in covered}  # params' order: same on every rank
        self._names = {id(m): n for n, m in model.named_modules()}
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}  # per parameter name: module calls in this forward (tied weights)
        self._hooked: dict[int, int] = {}  # per module: calls hooked outside a backward, this batch
        self._packed: dict[int, int] = {}  # per module: calls whose inputs went to a checkpoint's pack hook
        self._pending: dict[str, Tensor] = {}  # per-example grads of multi-call parameters, [B, numel]
        self._seen: set[str] = set()  # names that got a per-example contribution since reset()
        self._batch: int | None = None
        self.factor = 1.0
        self._weights: Tensor | None = None  # per-example sqrt(multipliers) of this batch (start_batch)

    @property
    def covered(self) -> list[str]:
        return list(self._params)

    # ------------------------------------------------------------------ lifecycle
    def attach(
        self, into: Mapping[str, Tensor] | None = None, scatter: Mapping[str, Callable[[Tensor], Tensor]] | None = None
    ) -> PerExampleSquaredGrads:
        """Register the hooks (idempotent). The squares go into ``into`` (the caller's fp32 accumulators,
        shaped like the parameters: no second buffer) or, without it, into fp32 zero sums made here
        (whole-shaped, also for sharded parameters: the modules run on gathered weights) that
        :meth:`reset` clears.

        ``scatter`` (with ``into``): name -> a function from a whole-shaped tensor to this rank's part of it
        (e.g. a reduce-scatter over ranks) for sharded parameters, whose ``into`` entries are shard-shaped:
        each module call's whole-shaped contribution is made, handed to it and added at once, so no
        whole-shaped buffer outlives the call. The function runs inside the backward, in the same order
        on every rank as long as every rank runs the same modules (as FSDP's own reduce-scatters do)."""
        if scatter and into is None:
            raise ValueError("PerExampleSquaredGrads.attach: scatter needs into= (the shard-shaped accumulators)")
        self._scatter = {n: f for n, f in (scatter or {}).items() if n in self._params}
        if into is not None:
            self.sums, self.direct = {n: into[n] for n in self._params}, True
        elif not self.sums:
            self.sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self._params.items()}
        if not self._handles:
            for module, _, _ in self._rules:
                # prepend: see the module's own output, before other hooks (e.g. our adapters') replace it
                self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True, prepend=True))
        return self

    def probe_batch_dim(self, run: Callable[[Any], Any], full: Any, fewer: Any, n: int) -> dict[str, list[str]]:
        """Which modules' outputs do not carry the examples on dim 0 (e.g. sequence-first ``[T, B, d]``, which a
        ``T == B`` batch makes look batch-first). ``run`` is called on ``full`` (``n`` examples) and ``fewer``
        (``n - 1``) under ``no_grad``, with the RNG forked; a ruled module whose output changes in a dim other
        than 0, or not in dim 0, is flagged. Returns parameter name -> [module name, the two shapes] for the
        parameters of flagged modules (callers redo them exactly or fall back)."""
        shapes: list[dict[int, list[tuple[int, ...]]]] = [{}, {}]
        phase = [0]  # which of the two forwards is running

        def record(mod: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                shapes[phase[0]].setdefault(id(mod), []).append(tuple(output.shape))

        handles = [module.register_forward_hook(record) for module, _, _ in self._rules]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                for i, batch in enumerate((full, fewer)):
                    phase[0] = i
                    run(batch)
        finally:
            for h in handles:
                h.remove()
        flagged: dict[str, list[str]] = {}
        for module, _, owned in self._rules:
            a, b = shapes[0].get(id(module), []), shapes[1].get(id(module), [])
            bad = [(x, y) for x, y in zip(a, b) if len(x) != len(y) or (x != y and (
                x[0] != n or y[0] != n - 1 or x[1:] != y[1:]))]  # fmt: skip
            if bad:
                desc = [self._names.get(id(module), type(module).__name__), str(list(bad[0][0])), str(list(bad[0][1]))]
                flagged.update(dict.fromkeys(owned.values(), desc))
        return flagged

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def start_batch(self, batch_size: int, factor: float | Tensor = 1.0) -> None:
        """Call before each forward: examples in the batch and a multiplier for its squared grads (a number, or
        a ``[batch_size]`` tensor: one multiplier per example, e.g. when examples weigh differently in the loss)."""
        self._weights = None
        if isinstance(factor, Tensor):  # per example: each output gradient's rows scaled by sqrt(weight)
            self._weights, factor = factor.detach().float().clamp_min(0).sqrt(), 1.0
        self._batch, self.factor, self._calls, self._pending, self._hooked = batch_size, factor, {}, {}, {}
        self._packed = {}

    def reweight(self, factor: Tensor) -> None:
        """Replace the current batch's per-example multipliers (``[batch_size]``) before its backward."""
        self._weights, self.factor = factor.detach().float().clamp_min(0).sqrt(), 1.0

    def finish_batch(self) -> None:
        """Call after the backward: squares the buffered gradients of multi-call modules."""
        for name, g in self._pending.items():  # (arrival order: the same on every rank)
            if name in self._scatter:
                whole = g.square().sum(0).mul_(self.factor).view(self._params[name].shape)
                self.sums[name].add_(self._scatter[name](whole))
            else:
                self.sums[name].view(-1).add_(g.square().sum(0), alpha=self.factor)
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
    def _count(self, module: nn.Module) -> None:
        for name in self._owned[id(module)][1].values():
            self._calls[name] = self._calls.get(name, 0) + 1

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._batch is None or is_replaying() or not isinstance(output, Tensor):
            return None
        rule, _ = self._owned[id(module)]
        key, batch = id(module), self._batch
        expanded = None
        if rule.broadcast and output.dim() > 0 and output.shape[0] == 1 and batch > 1:
            expanded = output = output.expand(batch, *output.shape[1:])  # batch-shared: gradient per example
        batched = output.dim() > 0 and output.shape[0] == batch
        in_backward = _in_backward()
        if not output.requires_grad:
            if batched and not in_backward and not torch.is_grad_enabled():
                self._count(module)  # e.g. reentrant checkpointing's first pass: hooked when recomputed
            return expanded
        ckpt = _checkpoint_hooks()
        if in_backward:
            if self._hooked.get(key):  # non-reentrant checkpointing: this call was hooked in the forward
                if ckpt is not None and self._packed.get(key):  # recomputation: pack as the forward did
                    self._packed[key] -= 1
                    _pack(ckpt[0], rule.save(module, args, kwargs, output, batch))
                return expanded
        else:
            self._hooked[key] = self._hooked.get(key, 0) + 1
        saved = rule.save(module, args, kwargs, output, batch) if batched else None
        if saved is SKIP:
            return expanded
        if saved is not None and ckpt is not None and not in_backward:  # non-reentrant checkpoint region
            pack, unpack = ckpt
            self._packed[key] = self._packed.get(key, 0) + 1
            packed = _pack(pack, saved)
            del saved
            self._count(module)
            output.register_hook(lambda g, m=module, s=packed, u=unpack: self._on_grad(m, _unpack(u, s), g))
            return expanded
        if saved is None:  # not per-example: if a gradient arrives, per-example values are lost
            output.register_hook(lambda g, m=module: self._missed_call(m))
        else:  # (calls that cannot reach here, e.g. DoRA's identity probe of lora_A/B, do not count)
            if not in_backward:
                self._count(module)
            output.register_hook(lambda g, m=module, s=saved: self._on_grad(m, s, g))
        return expanded

    def _missed_call(self, module: nn.Module) -> None:
        self.missed.update(self._owned[id(module)][1].values())

    def _on_grad(self, module: nn.Module, saved: Any, g: Tensor) -> None:
        rule, owned = self._owned[id(module)]
        multi = {a: self._calls.get(n, 1) > 1 for a, n in owned.items()}
        whole: dict[str, Tensor] = {}  # sharded parameters: this call's whole-shaped sum, scattered below
        if self._weights is not None and g.dim() > 0 and g.shape[0] == self._weights.shape[0]:
            g = g * self._weights.to(g.device, g.dtype).view(-1, *([1] * (g.dim() - 1)))  # per-example grads are
        try:  # linear in the rows of g
            parts: dict[str, list[Tensor]] = {}
            for chunk in rule.grads(module, saved, g, list(owned), any(multi.values())):
                for attr, val in chunk.items():
                    name = owned[attr]
                    if multi[attr]:
                        parts.setdefault(attr, []).append(val.float().reshape(val.shape[0], -1))
                        continue
                    if name in self._scatter:
                        if name not in whole:
                            whole[name] = torch.zeros(self._params[name].shape, dtype=torch.float32, device=g.device)
                        target = whole[name]
                    else:
                        target = self.sums[name]
                    if callable(val):
                        val(target, self.factor)
                    else:
                        target.view(-1).add_(val.float().reshape(val.shape[0], -1).square().sum(0), alpha=self.factor)
        except Exception as err:  # noqa: BLE001 - any failure of a rule: per-example values of this call are lost
            mname = self._names.get(id(module), type(module).__name__)
            self.failures[mname] = f"{type(err).__name__}: {err}"
            log.warning("FISH per-example Fisher: the %s rule failed on %s (%s)", type(rule).__name__, mname, err)
            self.missed.update(owned.values())
            return
        for name, buf in whole.items():
            self.sums[name].add_(self._scatter[name](buf))
        for attr, chunks in parts.items():
            name, per_example = owned[attr], torch.cat(chunks)
            pending = self._pending.get(name)
            self._pending[name] = per_example if pending is None else pending + per_example
        self._seen.update(owned.values())
