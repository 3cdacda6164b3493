"""Phase 1, dense warmup: the Fisher accumulated from the first ``warmup_steps`` optimizer steps."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fish_lightning.core.fisher import (
    PerExampleSquaredGrads,
    accumulate_squared_grads,
    batch_size,
    nonfinite_grads,
    probe_batch_dim,
    zeros_like_params,
)
from fish_lightning.core.sharding import local, local_rows
from fish_lightning.masker import collectives as distributed
from fish_lightning.masker.calibration import eval_mode, muted_logging, per_example_losses
from fish_lightning.masker.log import info as rank_zero_info
from fish_lightning.masker.log import warn as rank_zero_warn
from fish_lightning.masker.settings import FishSettings


def loss_scale(trainer: Any) -> float:
    """The AMP loss scale applied to this step's gradients (1 without a GradScaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0


def inverse_loss_scale(trainer: Any, optimizer: Optimizer) -> float:
    """1 / loss scale when the gradients seen in ``on_before_optimizer_step`` are still scaled (fused
    optimizers under fp16 AMP unscale inside ``step``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0 / float(scaler.get_scale())
    return 1.0


class WarmupFisher:
    """The warmup Fisher: fp32 accumulators, the per-example hooks that fill them, the fallback to the
    ``batch_grad`` estimator, the restart after a non-finite step, and the count of steps taken in.

    Args:
        settings: the callback's settings (``warmup_steps``, ``fisher_estimator``, ...).
        params: name -> candidate parameter, in the candidates' order (the same on every rank).
        sharded: names of candidates split across ranks (FSDP2).
        allocate: create the fp32 zero accumulators now (``False`` when a checkpoint's state follows).
    """

    def __init__(
        self, settings: FishSettings, params: dict[str, nn.Parameter], sharded: set[str], allocate: bool = True
    ) -> None:
        self.settings, self.params, self.sharded = settings, params, sharded
        self.estimator = settings.fisher_estimator  # in use: "per_example" may fall back to "batch_grad"
        self.fisher: dict[str, Tensor] | None = None
        if allocate and settings.accumulates_warmup:
            self.fisher = zeros_like_params(params)
        self.steps_done = 0  # optimizer steps in the Fisher (non-finite ones excluded)
        self.skipped_nonfinite = 0
        self.hooks: PerExampleSquaredGrads | None = None
        self._armed: tuple[int, float] | None = None  # (batch size, factor) of the batch being captured
        self._module: nn.Module | None = None  # the module whose forward the hooks see (for the batch-dim probe)
        self.runner: Any = None  # batch -> a forward of it without side effects, for the probe (plain loops)
        self.probed = False
        self.reduction_checked = False

    @property
    def active(self) -> bool:
        """More warmup steps are to come."""
        return self.steps_done < self.settings.warmup_steps

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module, trainer: Any = None) -> None:
        """Capture per-example gradients from the training backward (``fisher_estimator="per_example"``)."""
        if not (self.settings.accumulates_warmup and self.estimator == "per_example" and self.active):
            return
        self._module = model
        hooks = PerExampleSquaredGrads(model, self.params)
        if hooks.uncovered:
            self.fall_back(f"no per-example rule for {hooks.uncovered[:3]}")
        elif self.staged(trainer):  # fp16 AMP: a step's squares wait in their own buffer until the GradScaler's
            # verdict, so an overflowing step is left out without touching the steps before it
            self.hooks = hooks.attach()
        else:  # squares straight into the Fisher (one fp32 buffer); a sharded candidate's whole-shaped sum of
            # one module call is reduce-scattered at once into its shard (no whole-shaped buffer per step)
            scatter = {n: partial(distributed.reduce_scatter_mean, trainer, param=self.params[n])
                       for n in self.params if n in self.sharded}  # fmt: skip
            self.hooks = hooks.attach(into=self.fisher, scatter=scatter)
            general = list(getattr(hooks, "fallback_modules", []))
            if general:
                rank_zero_info(
                    f"FISH: exact per-example Fisher through the general torch.func rule (slower than a module "
                    f"rule) for {len(general)} modules: {general[:4]}{' ...' if len(general) > 4 else ''}"
                )

    def staged(self, trainer: Any) -> bool:
        """Per-step staging of the per-example squares: under a GradScaler (overflowing steps are routine) and
        with no sharded candidate (FSDP2 scatters each module call's squares into the Fisher at once). Costs one
        fp32 buffer per candidate during the warmup."""
        return getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None and not self.sharded

    def detach(self) -> None:
        if self.hooks is not None:
            self.hooks.detach()
            self.hooks = None

    def fall_back(self, why: str) -> None:
        """Switch to squared mini-batch gradients for the rest of the warmup (never mixing the two scales)."""
        rank_zero_warn(
            f"FISH: per-example Fisher is not exact for this model ({why}); using fisher_estimator='batch_grad' "
            "(squared mini-batch gradients) for all candidates. Calibration (calibration_samples) stays exact."
        )
        self.estimator = "batch_grad"
        direct = self.hooks is not None and self.hooks.direct  # this step's squares are in already
        self.detach()
        if self.fisher is not None and (self.steps_done or direct):
            if self.steps_done:
                rank_zero_warn(f"FISH: restarting the Fisher; the {self.steps_done} steps so far stay dense warmup")
            self._zero()

    def _zero(self) -> None:
        for f in (self.fisher or {}).values():
            f.zero_()

    # ------------------------------------------------------------------ per batch / step
    def start_batch(self, trainer: Any, batch: Any, weights: Tensor | None = None) -> None:
        """Before the forward: tell the hooks the batch size and the factor that undoes the loss's scaling
        (``weights``: the adapter's own multipliers of each example's squared gradient, shape ``[batch]``,
        instead of the factor from ``loss_reduction``, the accumulation and the loss scale)."""
        if self.hooks is None:
            return
        if not self.active:
            self.detach()
            return
        try:
            n = batch_size(batch)
        except (TypeError, IndexError) as err:
            self.fall_back(f"cannot size the batch: {err}")
            return
        if not self.probed and n >= 2:
            self.probed = True
            flagged = self._probe(batch)
            if flagged:
                module, full, fewer = next(iter(flagged.values()))
                self.fall_back(f"the examples are not dim 0 of {module!r}'s output: {full} for {n} examples, "
                               f"{fewer} for {n - 1} (sequence-first?)")  # fmt: skip
                return
        # training loss = mean (or sum) over the batch / accumulate_grad_batches (* AMP loss scale): undo all three
        per_example = n if self.settings.loss_reduction == "mean" else 1
        factor = (per_example * max(1, trainer.accumulate_grad_batches) / loss_scale(trainer)) ** 2
        self._armed = (n, factor if weights is None else weights)
        self.hooks.start_batch(*self._armed)

    def _probe(self, batch: Any) -> dict[str, list[str]]:
        """Once, on the first warmup batch of two or more examples: the batch dimension of every hooked module's
        output, from two no-gradient forwards (this batch and all but its last example) through ``fisher_loss``
        or, under automatic optimization, ``training_step`` (logging muted, RNG forked, eval mode). Under manual
        optimization without ``fisher_loss`` nothing can run a forward without stepping: not probed."""
        module = self._module
        if module is None:
            return {}
        if self.runner is not None:
            run = self.runner
        elif callable(getattr(module, "fisher_loss", None)):
            run = module.fisher_loss
        elif getattr(module, "automatic_optimization", False) and callable(getattr(module, "training_step", None)):
            def run(b: Any) -> Any:
                with muted_logging(module):
                    return module.training_step(b, 0)
        else:
            return {}
        with eval_mode(module):
            return probe_batch_dim(run, batch, module, {n: self.params[n] for n in self.hooks.covered})  # type: ignore[union-attr]

    def pause(self) -> None:
        """Capture nothing until :meth:`rearm` (the rest of this step's closure evaluations)."""
        if self.hooks is not None:
            self.hooks.start_batch(None, 0.0)  # type: ignore[arg-type]  # no batch: forwards are not captured

    def rearm(self) -> None:
        """After an optimizer step: capture the next forward of the same batch (manual optimization)."""
        if self.hooks is not None and self._armed is not None and self.active:
            self.hooks.start_batch(*self._armed)

    def finish_batch(self) -> None:
        """After the backward: square what multi-call modules buffered."""
        if self.hooks is not None:
            self.hooks.finish_batch()

    def take_step(self, trainer: Any, optimizer: Optimizer) -> None:
        """One optimizer step's gradients into the Fisher (``on_before_optimizer_step`` during warmup). A step
        without a backward (``training_step`` returned ``None``: no candidate has a gradient) is not counted."""
        if all(p.grad is None for p in self.params.values()):
            if self.hooks is not None:
                self.hooks.reset()
            self.pause()
            return
        hooks = self.hooks
        if hooks is not None:
            hooks.missed.update(hooks.unseen({n: p.grad for n, p in self.params.items()}))
            if self.sharded and distributed.any_rank(trainer, bool(hooks.missed)) and not hooks.missed:
                hooks.missed.add("(on another rank)")  # shards differ per rank: decide the fallback together
            if hooks.missed:
                self.fall_back(f"no per-example gradient for {sorted(hooks.missed)[:3]}")
                hooks = None
        bad = nonfinite_grads(self.params)
        if bad:
            self._skip_nonfinite(trainer, hooks, bad)
            self.pause()
            return
        if hooks is not None:  # (direct: its squares are in the Fisher already: attach(into=...))
            if not hooks.direct and self.fisher is not None:
                torch._foreach_add_([self.fisher[n] for n in hooks.sums], list(hooks.sums.values()))
            hooks.reset()
        elif self.fisher is not None:
            accumulate_squared_grads(self.fisher, self.params, inverse_loss_scale(trainer, optimizer))
        self.steps_done += 1
        if not self.active:
            self.detach()
        self.pause()

    def _skip_nonfinite(self, trainer: Any, hooks: PerExampleSquaredGrads | None, bad: dict[str, float]) -> None:
        restart = hooks is not None and hooks.direct  # this step's squares are in the Fisher already
        if restart:
            self._zero()
        if hooks is not None:
            hooks.reset()
        self.skipped_nonfinite += 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or (restart and self.steps_done):  # (fp16 AMP skips overflowing steps routinely)
            name, value = next(iter(bad.items()))
            what = (f"the per-example Fisher restarts after {self.steps_done} warmup steps (so does the count)"
                    if restart else "this step is left out of the Fisher")  # fmt: skip
            rank_zero_warn(
                f"FISH warmup: non-finite gradient {value} in {name!r} ({len(bad)} tensors affected) "
                f"at global step {trainer.global_step}; {what}"
            )
        if restart:
            self.steps_done = 0

    def check_reduction(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any) -> None:
        """Once, on the first warmup batch: whether the training loss is the mean or the sum of the module's
        ``fisher_loss(batch)`` (one extra forward in eval mode, no gradient, no RNG drawn); warn when it is not
        what ``loss_reduction`` says. Without ``fisher_loss`` or a loss in ``outputs`` nothing can be compared."""
        self.reduction_checked = True
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        fisher_loss = getattr(pl_module, "fisher_loss", None)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not callable(fisher_loss):
            return
        n = batch_size(batch)
        if n < 2:
            return
        with torch.no_grad(), eval_mode(pl_module):
            per = per_example_losses(pl_module, batch).detach().float()
        total = float(loss) * max(1, trainer.accumulate_grad_batches)
        mean, summed = float(per.mean()), float(per.sum())
        if not (total > 0 and mean > 0):
            return
        to_mean, to_sum = abs(math.log(total / mean)), abs(math.log(total / summed))
        if math.isclose(to_mean, to_sum, rel_tol=1e-6, abs_tol=1e-9):
            return  # undecidable (e.g. every loss but one is 0): no advice rather than a wrong one
        observed = "mean" if to_mean < to_sum else "sum"
        if observed != self.settings.loss_reduction:
            rank_zero_warn(
                f"FISH: the training loss ({total:.4g}) looks like the {observed} of fisher_loss over the batch of "
                f"{n} (mean {mean:.4g}, sum {summed:.4g}), but loss_reduction={self.settings.loss_reduction!r}: "
                f"the per-example Fisher is off by a factor of about {n}**2 per batch; pass "
                f"loss_reduction={observed!r}"
            )

    # ------------------------------------------------------------------ end of the phase
    def reduced_fisher(self, trainer: Any) -> dict[str, Tensor]:
        """The Fisher averaged over ranks, in place (a collective; at the freeze)."""
        if self.steps_done == 0 and self.skipped_nonfinite:
            raise RuntimeError(
                "FISH: no finite warmup gradient was accumulated before the freeze "
                f"({self.skipped_nonfinite} steps skipped as non-finite); cannot rank entries"
            )
        if self.steps_done == 0:
            m, epoch = self.settings.mask_epoch, trainer.current_epoch
            where = (f"the run resumed at epoch {epoch}, past mask_epoch={m}" if trainer.global_step > 0 else
                     f"no training step had a backward before epoch {epoch} (mask_epoch={m})")  # fmt: skip
            raise ValueError(
                f"FISH: no warmup step ran before the freeze: {where}, so there is no gradient to rank entries by. "
                "Use calibration_samples=N (the Fisher of N training examples, before any update), a later "
                "mask_epoch, or mask_epoch=None with warmup_steps dense steps from here"
            )
        return distributed.reduce_mean_(trainer, self.fisher, skip=self.sharded)  # type: ignore[arg-type]

    def checkpoint_fisher(self, trainer: Any | None) -> dict[str, Tensor] | None:
        """The Fisher as a checkpoint holds it: averaged over ranks, whole, on CPU. Per-example sums are
        rank-local until the freeze; ``state_dict`` runs on every rank while saving, so the collectives are safe."""
        if self.fisher is None:
            return None
        fisher = self.fisher
        if trainer is not None and trainer.world_size > 1:
            fisher = distributed.reduce_mean_(trainer, {n: f.clone() for n, f in fisher.items()}, skip=self.sharded)
        return {n: (distributed.gather_whole(f, self.params[n]) if n in self.sharded else f).detach().cpu()
                for n, f in fisher.items()}  # fmt: skip

    def restore(self, fisher: dict[str, Tensor] | None, steps_done: int, skipped: int, estimator: str | None) -> None:
        """Checkpointed warmup state onto this fit's candidates (whole tensors; this rank's rows taken)."""
        self.steps_done, self.skipped_nonfinite = steps_done, skipped
        if estimator is not None:
            self.estimator = estimator
        if fisher is not None:
            self.fisher = {n: self._local(t, n).to(self.params[n].device) for n, t in fisher.items()}

    def _local(self, full: Tensor, name: str) -> Tensor:
        return local_rows(full, self.params[name]) if name in self.sharded else full


@torch.no_grad()
def rewind_frozen_(params: dict[str, nn.Parameter], masks: dict[str, Tensor], init: dict[str, Tensor]) -> None:
    """Reset the frozen entries (``~mask``) to their fit-start values ``init``, in place."""
    for n, m in masks.items():
        p = local(params[n]).detach()
        p.copy_(torch.where(m, p, init[n]))


@torch.no_grad()
def snapshot(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """A copy of the candidates' (local) values: the fit-start values ``rewind_frozen`` resets frozen entries to."""
    return {n: local(p).detach().to(p.device, copy=True) for n, p in params.items()}
