"""``FisherMaskCallback``: FISH-Tuning for any Lightning (+ peft) training run.

Lifecycle, in optimizer steps:

1. **Dense warmup.** All candidates train. Unless ``calibration_samples`` is set, the first
   ``warmup_steps`` optimizer steps feed the Fisher: by default the exact sum of squared
   per-example gradients, captured by hooks from the training backward itself
   (:class:`~fish_lightning.core.fisher.PerExampleSquaredGrads`); with ``fisher_estimator="batch_grad"``
   the squared (unscaled) mini-batch gradient of each step, a cheaper proxy.
2. **Freeze.** At the start of epoch ``mask_epoch`` (or right after warmup when it is ``None``),
   the Fisher is averaged across ranks, exactly ``k = round((1 - sparsity) * n)`` entries are
   kept (:func:`~fish_lightning.core.selection.select_masks`), and the Fisher buffers are freed.
   With ``calibration_samples`` the Fisher is computed at this point instead, from true
   per-example gradients of that many training examples (the original FISH procedure).
3. **Masked training.** Frozen entries get zero gradient (so they drop out of gradient
   clipping) and are written back after every ``optimizer.step()``: they stay bit-identical with
   any torch optimizer, AdamW's decoupled weight decay and warmup momentum included. With
   ``rewind_frozen=True`` the frozen entries are first reset to their values at fit start, so the
   trained model differs from its initialisation only in the kept entries (sparse export).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from fish_lightning.callback.calibration import calibrate_fisher
from fish_lightning.core.candidates import check_supported, find_candidates, validate_patterns
from fish_lightning.core.fisher import (
    PerExampleSquaredGrads,
    accumulate_squared_grads,
    batch_size,
    nonfinite_grads,
    zeros_like_params,
)
from fish_lightning.core.masking import FrozenEntryGuard, mask_gradients, pack_mask, unpack_mask
from fish_lightning.core.selection import (
    SCOPES,
    SELECTIONS,
    num_kept,
    select_masks,
    select_masks_sharded,
    selection_scores,
)
from fish_lightning.core.sharding import (
    check_placements,
    gather_full,
    is_sharded,
    local,
    local_rows,
    reduce_scatter_sum,
    shard_range,
)
from fish_lightning.core.sparse_state import CompactOptimizer, frozen_digest, zero_state_entries

_NEEDS_FISHER = ("fisher", "reverse")
ESTIMATORS = ("per_example", "batch_grad")


class FisherMaskCallback(Callback):
    """Train only the top-Fisher fraction of a model's (PEFT) parameters.

    Args:
        sparsity: fraction of candidate entries frozen, in ``[0, 1)``; density is ``1 - sparsity``.
        warmup_steps: dense optimizer steps before the freeze whose gradients feed the Fisher
            (``>= 1``; ``0`` is allowed only with ``calibration_samples``: mask chosen before
            training).
        mask_epoch: the mask is frozen at the start of this epoch; ``None`` freezes right after
            ``warmup_steps`` steps.
        include: regexes (``re.search``) over ``named_parameters()`` names; when given, the
            candidates are the trainable parameters matching any of them.
        exclude: regexes removing candidates. By default the candidates are all trainable
            parameters except peft's ``modules_to_save`` copies (e.g. the classifier head) and
            modules marked ``fish_always_trained = True`` (our bottleneck adapters' head), which
            stay fully trainable. AdaLoRA is refused at fit start (its rank allocator edits entries).
        scope: ``"global"`` top-k over all candidates, or ``"per_tensor"``.
        selection: ``"fisher"``; baselines ``"random"`` (seeded), ``"reverse"`` (lowest Fisher),
            ``"magnitude"`` (largest ``|w|`` at the freeze).
        seed: seed of the ``"random"`` selection (identical on every rank).
        calibration_samples: when set, the Fisher is the sum of true per-example squared
            gradients over this many training examples, computed at the freeze without updating
            anything (model in eval mode). The module's ``fisher_loss(batch) -> Tensor[b]`` is used
            if it defines one, else ``training_step`` on one example at a time.
        keep_fisher: keep ``cb.fisher`` (on CPU) after the freeze instead of freeing it.
        fisher_estimator: warmup estimate: ``"per_example"`` (exact sum of squared per-example
            gradients from the training backward; assumes the loss is a mean over the batch, and
            falls back to ``"batch_grad"`` with a warning for tensors no hook rule covers) or
            ``"batch_grad"`` (squared mini-batch gradient per step).
        rewind_frozen: at the freeze, reset frozen entries to their values at fit start (keeps one
            copy of the candidates until the freeze).
        sparse_optimizer_state: from the freeze on, the optimizer trains compact tensors of the
            kept entries (:class:`~fish_lightning.core.sparse_state.CompactOptimizer`), so its state
            (and the gradients it sees) scale with the kept entries; frozen entries leave it.
        strict: make :meth:`verify` at the end of ``fit`` raise instead of warn when a frozen entry
            moved.
        reselect_every_n_steps: after the freeze, keep accumulating the Fisher (squared mini-batch
            gradients of all candidates) and every N optimizer steps re-select exactly k entries:
            newly kept entries start with zero optimizer state, dropped ones stop where they are.
            ``None`` (default): the paper's fixed mask.

    After the freeze, ``cb.masks`` maps parameter names to bool masks (True = trained).
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        warmup_steps: int = 50,
        mask_epoch: int | None = 1,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        scope: str = "global",
        selection: str = "fisher",
        seed: int = 0,
        calibration_samples: int | None = None,
        keep_fisher: bool = False,
        fisher_estimator: str = "per_example",
        rewind_frozen: bool = False,
        sparse_optimizer_state: bool = False,
        strict: bool = False,
        reselect_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity!r} is out of range: expected a number with 0 <= sparsity < 1")
        if calibration_samples is not None and (
            isinstance(calibration_samples, bool) or not isinstance(calibration_samples, int) or calibration_samples < 1
        ):
            raise ValueError(f"calibration_samples={calibration_samples!r} must be None or an integer >= 1")
        min_warmup = 0 if calibration_samples is not None else 1
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < min_warmup:
            hint = "" if calibration_samples is not None else " (0 is allowed only with calibration_samples)"
            raise ValueError(f"warmup_steps={warmup_steps!r} must be an integer >= {min_warmup}{hint}")
        if mask_epoch is not None and (
            isinstance(mask_epoch, bool) or not isinstance(mask_epoch, int) or mask_epoch < 0
        ):
            raise ValueError(f"mask_epoch={mask_epoch!r} must be None or an integer >= 0")
        if mask_epoch == 0 and calibration_samples is None:
            raise ValueError(
                "mask_epoch=0 freezes the mask before any warmup step, so there is no gradient to "
                "estimate the Fisher from: use mask_epoch>=1, mask_epoch=None, or calibration_samples"
            )
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is not valid: expected one of {SCOPES}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r} is not valid: expected one of {SELECTIONS}")
        if fisher_estimator not in ESTIMATORS:
            raise ValueError(f"fisher_estimator={fisher_estimator!r} is not valid: expected one of {ESTIMATORS}")
        if reselect_every_n_steps is not None:
            if (
                isinstance(reselect_every_n_steps, bool)
                or not isinstance(reselect_every_n_steps, int)
                or (reselect_every_n_steps < 1)
            ):
                raise ValueError(f"reselect_every_n_steps={reselect_every_n_steps!r} must be None or an integer >= 1")
            if selection == "random":
                raise ValueError("reselect_every_n_steps with selection='random' would only reshuffle the mask: "
                                 "use selection='fisher', 'reverse' or 'magnitude'")  # fmt: skip
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        validate_patterns(include, exclude)
        if calibration_samples is not None and mask_epoch is not None and warmup_steps > 0:
            rank_zero_warn(
                f"warmup_steps={warmup_steps} is not used: with calibration_samples and mask_epoch={mask_epoch} "
                "the Fisher is computed at the start of that epoch (pass warmup_steps=0 to say so, or "
                "mask_epoch=None to freeze after warmup_steps dense steps)"
            )

        self.sparsity = float(sparsity)
        self.warmup_steps = warmup_steps
        self.mask_epoch = mask_epoch
        self.include = include
        self.exclude = exclude
        self.scope = scope
        self.selection = selection
        self.seed = seed
        self.calibration_samples = calibration_samples
        self.keep_fisher = keep_fisher
        self.fisher_estimator = fisher_estimator
        self.rewind_frozen = rewind_frozen
        self.sparse_optimizer_state = sparse_optimizer_state
        self.strict = strict
        self.reselect_every_n_steps = reselect_every_n_steps

        self.masks: dict[str, Tensor] | None = None
        self.fisher: dict[str, Tensor] | None = None
        self.candidates: list[str] | None = None
        self._warmup_done = 0  # optimizer steps seen before the freeze (non-finite ones excluded)
        self._fisher_examples = 0  # calibration examples in the Fisher
        self._skipped_nonfinite = 0
        self._frozen_at_step: int | None = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self._fit_started = False  # on_fit_start ran and teardown did not yet
        self._guards: list[FrozenEntryGuard] = []
        self._restored: dict[str, Any] | None = None
        self._per_example: PerExampleSquaredGrads | None = None  # warmup hooks while attached
        self._trainer: pl.Trainer | None = None
        self._init_state: dict[str, Tensor] | None = None  # fit-start values, for rewind_frozen
        self._compact: list[CompactOptimizer] = []  # sparse_optimizer_state after the freeze
        self._digests: dict[str, str] | None = None  # frozen-entry hashes taken at the freeze
        self._refisher: dict[str, Tensor] | None = None  # Fisher since the last selection (re-selection)
        self._steps_since_select = 0
        self.reselections = 0
        self._sharded: set[str] = set()  # candidates split across ranks (FSDP2 DTensor shards)
        self._kept_counts: dict[str, int] | None = None  # name -> kept entries over all ranks

    # ------------------------------------------------------------------ properties
    # ``state_key`` stays Lightning's default (the class name): a key built from the settings would make a
    # resumed run with a changed setting silently skip load_state_dict; load_state_dict checks them instead.

    @property
    def frozen(self) -> bool:
        """Whether the mask has been selected and is being enforced."""
        return self.masks is not None

    @property
    def num_candidates(self) -> int:
        return sum(self._params[n].numel() for n in self.candidates or [])

    @property
    def num_kept(self) -> int:
        """Kept candidate entries: exact after the freeze, the target ``k`` before it."""
        if self._kept_counts is not None:
            return sum(self._kept_counts.values())
        if self.masks is not None:
            return sum(int(m.sum()) for m in self.masks.values())
        return num_kept(self.num_candidates, self.sparsity)

    @property
    def _accumulates_warmup(self) -> bool:
        return self.calibration_samples is None and self.selection in _NEEDS_FISHER

    # ------------------------------------------------------------------ fit start
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_epochs = trainer.max_epochs
        if self.mask_epoch is not None and max_epochs is not None and max_epochs >= 0 and self.mask_epoch >= max_epochs:
            raise ValueError(
                f"mask_epoch={self.mask_epoch} is past the run: Trainer(max_epochs={max_epochs}) "
                f"trains epochs 0..{max_epochs - 1}; use mask_epoch < max_epochs or mask_epoch=None"
            )
        check_supported(pl_module)
        if self.sparse_optimizer_state and getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "sparse_optimizer_state=True does not support fp16 mixed precision with a GradScaler (the scaler "
                "unscales the optimizer's compact tensors before their gradients exist): use precision='bf16-mixed' "
                "or '32-true', or sparse_optimizer_state=False"
            )
        if len(trainer.optimizers) > 1:
            rank_zero_warn(
                f"FISH assumes one optimizer; this run has {len(trainer.optimizers)}: warmup steps and the Fisher "
                "are counted per optimizer.step() call"
            )
        self._trainer = trainer
        named = dict(pl_module.named_parameters())
        if self._restored is not None and self._restored["candidates"] is not None:
            self.candidates = list(self._restored["candidates"])
            missing = [n for n in self.candidates if n not in named]
            if missing:
                raise ValueError(f"checkpointed FISH candidates are not parameters of this model: {missing[:4]}")
        else:
            self.candidates = find_candidates(pl_module, self.include, self.exclude)
        self._params = {n: named[n] for n in self.candidates}
        self._check_sharding(trainer)
        if self.masks is None and self._accumulates_warmup:
            self.fisher = zeros_like_params(self._params)
        if self.rewind_frozen and self.masks is None:
            self._init_state = {n: local(p).detach().to(p.device, copy=True) for n, p in self._params.items()}
        self._fit_started = True
        restored, self._restored = self._restored, None
        if restored is not None:
            self._apply_restored(trainer, restored)
        rank_zero_info(
            f"FISH: {len(self.candidates)} candidate tensors, {self.num_candidates:,} entries; "
            f"keeping {num_kept(self.num_candidates, self.sparsity):,} (sparsity {self.sparsity:g}, "
            f"{self.selection}, {self.scope})"
        )

    def _apply_restored(self, trainer: pl.Trainer, restored: dict[str, Any]) -> None:
        """Checkpointed state onto this fit's candidates: from ``on_fit_start``, or from ``load_state_dict`` when
        the strategy restores callbacks after setup (``ModelParallelStrategy``/FSDP2 does, after ``on_fit_start``)."""
        saved = restored.get("candidates")
        if saved is not None and list(saved) != list(self.candidates or []):
            raise ValueError(
                f"checkpointed FISH candidates ({len(saved)} tensors) differ from this model's "
                f"({len(self.candidates or [])}): resume with the same model, peft config and include/exclude"
            )
        if restored.get("masks") is not None:
            self.masks = {
                n: self._local_part(unpack_mask(packed, self._params[n].shape), n).to(self._params[n].device)
                for n, packed in restored["masks"].items()
            }
            self._kept_counts = {n: int(unpack_mask(packed, (self._params[n].numel(),)).sum())
                                 for n, packed in restored["masks"].items()}  # fmt: skip
            self.fisher, self._init_state = None, None
        elif restored.get("fisher") is not None:
            self.fisher = {n: self._local_part(t, n).to(self._params[n].device) for n, t in restored["fisher"].items()}
        self.fisher_estimator = restored.get("fisher_estimator", self.fisher_estimator)
        if self._init_state is not None and restored.get("init_state") is not None:
            init = restored["init_state"]
            self._init_state = {
                n: self._local_part(init[n], n).to(p.device, copy=True) for n, p in self._params.items()
            }
        if restored.get("refisher") is not None:
            self._refisher = {n: t.to(self._params[n].device) for n, t in restored["refisher"].items()}
        if self.frozen and self.sparse_optimizer_state:
            self._compact_optimizers(trainer)  # before Lightning loads the (compact) optimizer state

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.frozen:
            if not self.sparse_optimizer_state:
                self._install_guards(trainer)
            return
        if self.mask_epoch is None and self.calibration_samples is not None and self.warmup_steps == 0:
            self._freeze(trainer, pl_module)
            return
        if self._accumulates_warmup and self.fisher_estimator == "per_example" and self._in_warmup:
            hooks = PerExampleSquaredGrads(pl_module, self._params)
            if hooks.uncovered:
                self._fall_back_to_batch_grad(f"no per-example rule for {hooks.uncovered[:3]}")
            else:  # squares straight into the Fisher (one fp32 buffer); sharded: whole-shaped step sums
                self._per_example = hooks.attach(into=None if self._sharded else self.fisher)
        if self.mask_epoch is not None and self.warmup_steps > 0:
            accumulate = max(1, trainer.accumulate_grad_batches)
            per_epoch = trainer.num_training_batches / accumulate
            if (
                math.isfinite(per_epoch)
                and per_epoch * self.mask_epoch < self.warmup_steps
                and self._accumulates_warmup
            ):
                rank_zero_warn(
                    f"warmup_steps={self.warmup_steps} but only ~{int(per_epoch * self.mask_epoch)} optimizer "
                    f"steps run before mask_epoch={self.mask_epoch}: the Fisher will use those steps only"
                )

    # ------------------------------------------------------------------ warmup
    @property
    def _in_warmup(self) -> bool:
        return not self.frozen and self._warmup_done < self.warmup_steps

    def _fall_back_to_batch_grad(self, why: str) -> None:
        rank_zero_warn(
            f"FISH: per-example Fisher is not exact for this model ({why}); using fisher_estimator='batch_grad' "
            "(squared mini-batch gradients) for all candidates. Calibration (calibration_samples) stays exact."
        )
        self.fisher_estimator = "batch_grad"
        direct = self._per_example is not None and self._per_example.direct  # this step's squares are in
        self._detach_per_example()
        if self.fisher is not None and (self._warmup_done or direct):  # do not mix the two estimators' scales
            if self._warmup_done:
                rank_zero_warn(f"FISH: restarting the Fisher; the {self._warmup_done} steps so far stay dense warmup")
            for f in self.fisher.values():
                f.zero_()

    def _detach_per_example(self) -> None:
        if self._per_example is not None:
            self._per_example.detach()
            self._per_example = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._per_example is None:
            return
        if not self._in_warmup:
            self._detach_per_example()
            return
        try:
            n = batch_size(batch)
        except (TypeError, IndexError) as err:
            self._fall_back_to_batch_grad(f"cannot size the batch: {err}")
            return
        # training loss = mean over the batch / accumulate_grad_batches (* AMP loss scale): undo both
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        self._per_example.start_batch(n, (n * max(1, trainer.accumulate_grad_batches) / scale) ** 2)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._per_example is not None:
            self._per_example.finish_batch()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self.frozen:
            if self.reselect_every_n_steps is not None:
                if self._refisher is None:
                    self._refisher = zeros_like_params(self._params)
                if not nonfinite_grads(self._params):
                    accumulate_squared_grads(self._refisher, self._params, _inverse_loss_scale(trainer, optimizer))
                self._steps_since_select += 1
            if self._compact:
                for c in self._compact:
                    c.gather_grads()
            else:
                mask_gradients(self._params, self.masks)  # type: ignore[arg-type]
                for g in self._guards:  # snapshot now, not in the step pre-hook that precedes the closure
                    g.snapshot()
            return
        if self.mask_epoch is None and self._warmup_done >= self.warmup_steps:
            return  # freezing at the end of this batch
        if self.mask_epoch is not None and self._warmup_done >= self.warmup_steps:
            return  # dense training until mask_epoch; Fisher is complete
        hooks = self._per_example
        if hooks is not None:
            hooks.missed.update(hooks.unseen({n: p.grad for n, p in self._params.items()}))
            if self._sharded and trainer.world_size > 1:  # shards differ per rank: decide the fallback together
                flag = torch.tensor([len(hooks.missed)], dtype=torch.int64, device=trainer.strategy.root_device)
                if int(trainer.strategy.reduce(flag, reduce_op="sum")[0]) and not hooks.missed:
                    hooks.missed.add("(on another rank)")
        if hooks is not None and hooks.missed:
            self._fall_back_to_batch_grad(f"no per-example gradient for {sorted(hooks.missed)[:3]}")
            hooks = None
        bad = nonfinite_grads(self._params)
        if bad:
            restart = hooks is not None and hooks.direct  # this step's squares are in the Fisher already
            if restart:
                for f in self.fisher.values():  # type: ignore[union-attr]
                    f.zero_()
            if hooks is not None:
                hooks.reset()
            self._skipped_nonfinite += 1
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is None or (restart and self._warmup_done):  # (fp16 AMP skips overflowing steps routinely)
                name, value = next(iter(bad.items()))
                what = (f"the per-example Fisher restarts after {self._warmup_done} warmup steps (so does the count)"
                        if restart else "this step is left out of the Fisher")  # fmt: skip
                rank_zero_warn(
                    f"FISH warmup: non-finite gradient {value} in {name!r} ({len(bad)} tensors affected) "
                    f"at global step {trainer.global_step}; {what}"
                )
            if restart:
                self._warmup_done = 0
            return
        if hooks is not None:
            if not hooks.direct:  # (in the candidates' order: the collectives match across ranks)
                for n, acc in hooks.sums.items():
                    if n in self._sharded:  # whole-shaped sums of this rank's examples -> rank mean, own rows
                        acc = reduce_scatter_sum(acc, self._params[n]).div_(trainer.world_size)
                    self.fisher[n].add_(acc)  # type: ignore[index]
            hooks.reset()
        elif self._accumulates_warmup:
            accumulate_squared_grads(self.fisher, self._params, _inverse_loss_scale(trainer, optimizer))  # type: ignore[arg-type]
        self._warmup_done += 1
        if not self._in_warmup:
            self._detach_per_example()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.frozen and self.mask_epoch is None and self._warmup_done >= self.warmup_steps:
            self._freeze(trainer, pl_module)
        elif (
            self.frozen
            and self.reselect_every_n_steps is not None
            and self._steps_since_select >= self.reselect_every_n_steps
        ):
            self._reselect(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.frozen and self.mask_epoch is not None and trainer.current_epoch >= self.mask_epoch:
            self._freeze(trainer, pl_module)

    # ------------------------------------------------------------------ freeze
    def _freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach_per_example()
        if self.calibration_samples is not None and self.selection in _NEEDS_FISHER:
            self.fisher = self._calibrate(trainer, pl_module)
        if self.selection in _NEEDS_FISHER:
            if self._accumulates_warmup and self._warmup_done == 0:
                raise RuntimeError(
                    "FISH: no finite warmup gradient was accumulated before the freeze "
                    f"({self._skipped_nonfinite} steps skipped as non-finite); cannot rank entries"
                )
            self.fisher = _reduce_mean(trainer, self.fisher, skip=self._sharded)  # type: ignore[arg-type]
        self.masks = self._select(trainer, self.fisher if self.selection in _NEEDS_FISHER else None)
        self._frozen_at_step = trainer.global_step
        if self._init_state is not None:
            with torch.no_grad():
                for n, m in self.masks.items():
                    p = local(self._params[n]).detach()
                    p.copy_(torch.where(m, p, self._init_state[n]))
            self._init_state = None
        self._digests = {n: frozen_digest(self._params[n], m) for n, m in self.masks.items()}
        if self.keep_fisher and self.fisher is not None:
            self.fisher = {n: f.detach().cpu() for n, f in self.fisher.items()}
        else:
            self.fisher = None
        self._log_masks(trainer)
        if self.sparse_optimizer_state:
            self._compact_optimizers(trainer)
        else:
            self._install_guards(trainer)

    def _select(self, trainer: pl.Trainer, fisher: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """Exactly k entries scored from ``fisher`` (already reduced across ranks), identical on every rank."""
        scores = selection_scores(self.selection, fisher, self._params, self.seed)
        if self._sharded:
            masks = self._select_sharded(trainer, scores)
        else:
            masks = select_masks(scores, self.sparsity, self.scope)
        del scores
        replicated = [n for n in masks if n not in self._sharded]
        if trainer.world_size > 1 and replicated:  # bit-identical masks on every rank, whatever the reduction did
            packed = trainer.strategy.broadcast({n: pack_mask(masks[n]) for n in replicated}, src=0)
            masks.update({n: unpack_mask(packed[n], self._params[n].shape) for n in replicated})
        masks = {n: m.to(self._params[n].device) for n, m in masks.items()}
        self._kept_counts = self._global_counts(trainer, masks)
        return masks

    def _select_sharded(self, trainer: pl.Trainer, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        """Exactly k entries over every rank's shards (the same entries a single process would keep);
        replicated candidates are scored by rank 0 and broadcast by the caller."""
        rank, local_scores, offsets = trainer.global_rank, {}, {}
        for n, p in self._params.items():
            s = local(scores[n])
            if n in self._sharded:
                local_scores[n] = s if s.shape == local(p).shape else local_rows(s, p)  # random: drawn whole
                offsets[n] = shard_range(p)[0]
            else:
                local_scores[n] = s if rank == 0 else s.reshape(-1)[:0]
                offsets[n] = 0 if rank == 0 else p.numel()
        masks = select_masks_sharded(
            local_scores, {n: p.numel() for n, p in self._params.items()}, offsets, self.sparsity,
            lambda t: trainer.strategy.reduce(t, reduce_op="sum"), rank, trainer.world_size, self.scope,
        )  # fmt: skip
        return {n: m if n in self._sharded else m.reshape(-1)[:0] for n, m in masks.items()}

    def _global_counts(self, trainer: pl.Trainer, masks: dict[str, Tensor]) -> dict[str, int]:
        """name -> kept entries summed over the ranks' shards (one all-reduce when sharded)."""
        counts = torch.tensor([int(m.sum()) for m in masks.values()], dtype=torch.int64)
        if self._sharded:
            own = torch.tensor([n in self._sharded or trainer.global_rank == 0 for n in masks], dtype=torch.int64)
            counts = trainer.strategy.reduce((counts * own).to(trainer.strategy.root_device), reduce_op="sum").cpu()
        return {n: int(c) for n, c in zip(masks, counts)}

    def _local_part(self, full: Tensor, name: str) -> Tensor:
        """This rank's rows of a whole tensor restored from a checkpoint (the whole tensor if not sharded)."""
        return local_rows(full, self._params[name]) if name in self._sharded else full

    def _check_sharding(self, trainer: pl.Trainer) -> None:
        """Find the candidates FSDP2 split across ranks; refuse what FISH does not support with them."""
        for n, p in self._params.items():
            check_placements(p, f"candidate {n!r}")
        self._sharded = {n for n, p in self._params.items() if is_sharded(p)}
        strategy = type(trainer.strategy).__name__
        if "deepspeed" in strategy.lower():
            raise ValueError(
                f"FISH does not support {strategy}: DeepSpeed keeps its own fp32 master partitions of the "
                "parameters and steps them itself, so frozen entries cannot be held fixed from a callback; use "
                "strategy='ddp' or FSDP2 (ModelParallelStrategy with fully_shard)"
            )
        if strategy == "FSDPStrategy":
            raise ValueError(
                "FISH does not support FSDPStrategy (FSDP1): its flat parameters expose each rank's piece of a "
                "candidate as a 1-D view, not a placed shard; use FSDP2: ModelParallelStrategy with fully_shard "
                "in configure_model (see docs/distributed.md), or strategy='ddp'"
            )
        if not self._sharded:
            return
        unsupported = {"sparse_optimizer_state": self.sparse_optimizer_state,
                       "reselect_every_n_steps": self.reselect_every_n_steps is not None,
                       "calibration_samples": self.calibration_samples is not None}  # fmt: skip
        bad = [k for k, on in unsupported.items() if on]
        if bad:
            raise ValueError(
                f"FISH: {', '.join(bad)} is not supported with sharded parameters ({len(self._sharded)} FSDP2 "
                f"candidates, e.g. {sorted(self._sharded)[0]!r}): use the warmup Fisher with a fixed mask and "
                "the dense masked step, or a data-parallel strategy"
            )

    def _reselect(self, trainer: pl.Trainer) -> None:
        """Re-select k entries from the Fisher accumulated since the last selection."""
        fisher = _reduce_mean(trainer, self._refisher) if self.selection in _NEEDS_FISHER else None  # type: ignore[arg-type]
        new = self._select(trainer, fisher)
        for c in self._compact:  # back to dense params; kept entries' state scattered, zeros elsewhere
            c.expand()
        self._compact = []
        self._remove_guards()
        for n, m in new.items():
            newly = m & ~self.masks[n]  # type: ignore[index]
            for opt in trainer.optimizers:
                zero_state_entries(opt, self._params[n], newly)
        self.masks = new
        self._digests = {n: frozen_digest(self._params[n], m) for n, m in self.masks.items()}
        self._refisher, self._steps_since_select = None, 0
        self.reselections += 1
        self._log_masks(trainer)
        if self.sparse_optimizer_state:
            self._compact_optimizers(trainer)
        else:
            self._install_guards(trainer)

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        fisher, seen = calibrate_fisher(trainer, pl_module, self._params, self.calibration_samples)  # type: ignore[arg-type]
        if seen < self.calibration_samples:  # type: ignore[operator]
            rank_zero_warn(
                f"calibration_samples={self.calibration_samples} but the train dataloader yielded {seen} examples"
            )
        self._fisher_examples = seen
        return fisher

    def _install_guards(self, trainer: pl.Trainer) -> None:
        self._remove_guards()
        by_param = {self._params[n]: m for n, m in self.masks.items()}  # type: ignore[union-attr]
        self._guards = [FrozenEntryGuard(opt, by_param, snapshot_in_pre_hook=False) for opt in trainer.optimizers]
        covered = sum(g.num_guarded for g in self._guards)
        partial = sum(1 for m in self.masks.values() if not bool(m.all()))  # type: ignore[union-attr]
        if covered < partial:
            rank_zero_warn(
                f"FISH: {partial - covered} masked tensors are in no optimizer of this trainer; they are not guarded"
            )

    def _compact_optimizers(self, trainer: pl.Trainer) -> None:
        self._remove_guards()
        by_param = {self._params[n]: m for n, m in self.masks.items()}  # type: ignore[union-attr]
        self._compact = [CompactOptimizer(opt, by_param) for opt in trainer.optimizers]

    def _remove_guards(self) -> None:
        for g in self._guards:
            g.remove()
        self._guards = []

    def _log_masks(self, trainer: pl.Trainer) -> None:
        counts = self._kept_counts or {n: int(m.sum()) for n, m in self.masks.items()}  # type: ignore[union-attr]
        density = {n: c / max(1, self._params[n].numel()) for n, c in counts.items()}
        total = sum(counts.values()) / max(1, self.num_candidates)
        metrics = {f"fish/density/{n}": d for n, d in density.items()}
        metrics.update(
            {"fish/density": total, "fish/kept": float(self.num_kept), "fish/candidates": float(self.num_candidates)}
        )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"FISH: mask frozen at global step {trainer.global_step}: kept {self.num_kept:,} of "
            f"{self.num_candidates:,} candidate entries (density {total:.4g})"
        )

    # ------------------------------------------------------------------ teardown
    # ------------------------------------------------------------------ verify
    def verify(self, pl_module: pl.LightningModule | None = None) -> dict[str, Any]:
        """Check, against hashes taken at the freeze, that no frozen entry moved.

        Returns ``{"frozen_unchanged": bool, "kept": int, "candidates": int, "moved": [names]}``.
        """
        if self.masks is None or self._digests is None:
            raise RuntimeError("FISH verify: no mask has been frozen yet")
        params = self._params if pl_module is None else {n: dict(pl_module.named_parameters())[n] for n in self.masks}
        moved = [n for n, m in self.masks.items() if frozen_digest(params[n], m) != self._digests[n]]
        return {"frozen_unchanged": not moved, "kept": self.num_kept, "candidates": self.num_candidates,
                "moved": moved}  # fmt: skip

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips Callback.teardown on an exception

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None:
            msg = (f"FISH: training ended before the mask was frozen (warmup steps done: {self._warmup_done}, "
                   f"mask_epoch={self.mask_epoch}): every candidate trained densely")  # fmt: skip
            if self.strict:
                raise RuntimeError(msg)
            rank_zero_warn(msg)
            return
        if self._digests is None:
            return
        report = self.verify(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({"fish/frozen_unchanged": float(report["frozen_unchanged"])}, step=trainer.global_step)
        if report["frozen_unchanged"]:
            rank_zero_info(f"FISH verify: all frozen entries unchanged; kept {report['kept']:,} of "
                           f"{report['candidates']:,}")  # fmt: skip
            return
        msg = f"FISH verify: frozen entries moved in {len(report['moved'])} tensors: {report['moved'][:4]}"
        if self.strict:
            raise RuntimeError(msg)
        rank_zero_warn(msg)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit_started = False
        self._remove_guards()
        for c in self._compact:
            c.remove()
        self._compact = []
        self._detach_per_example()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "selection": self.selection,
            "scope": self.scope,
            "seed": self.seed,
            "candidates": list(self.candidates) if self.candidates is not None else None,
            "masks": {n: pack_mask(self._whole(m, n)) for n, m in self.masks.items()}
            if self.masks is not None
            else None,
            "fisher": self._fisher_for_checkpoint(),
            "warmup_done": self._warmup_done,
            "fisher_examples": self._fisher_examples,
            "skipped_nonfinite": self._skipped_nonfinite,
            "frozen_at_step": self._frozen_at_step,
            "fisher_estimator": self.fisher_estimator,
            "digests": self._digests_for_checkpoint(),
            "refisher": {n: f.detach().cpu() for n, f in self._refisher.items()}
            if self._refisher is not None
            else None,
            "steps_since_select": self._steps_since_select,
            "reselections": self.reselections,
            "init_state": {n: self._whole(t, n).detach().cpu() for n, t in self._init_state.items()}
            if self._init_state is not None
            else None,
        }

    def _fisher_for_checkpoint(self) -> dict[str, Tensor] | None:
        """The warmup Fisher, averaged over ranks: rank 0 writes the checkpoint, and per-example sums are
        rank-local until the freeze (state_dict runs on every rank while saving, so the reduce is safe)."""
        if self.fisher is None or self.masks is not None:
            return None
        fisher = self.fisher
        if self._trainer is not None and self._trainer.world_size > 1:
            fisher = _reduce_mean(self._trainer, {n: f.clone() for n, f in fisher.items()}, skip=self._sharded)
        return {n: self._whole(f, n).detach().cpu() for n, f in fisher.items()}

    def _whole(self, t: Tensor, name: str) -> Tensor:
        """A sharded candidate's per-rank tensor gathered whole (a collective: every rank calls it)."""
        if name not in self._sharded:
            return t
        if t.dtype == torch.bool:  # gloo has no bool collectives
            return gather_full(t.to(torch.uint8), self._params[name]).bool()
        return gather_full(t, self._params[name])

    def _digests_for_checkpoint(self) -> dict[str, Any] | None:
        """Frozen-entry hashes; with sharded candidates each rank hashes its own shard, so all ranks' are kept."""
        if self._digests is None or not self._sharded or self._trainer is None:
            return self._digests
        import torch.distributed as dist

        every: list[Any] = [None] * self._trainer.world_size
        dist.all_gather_object(every, self._digests)
        return {"by_rank": every}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("sparsity", "selection", "scope", "seed"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint was written with FisherMaskCallback({key}={state_dict[key]!r}), this callback has "
                    f"{key}={getattr(self, key)!r}: resume with the same settings (or start a new run)"
                )
        self._warmup_done = int(state_dict["warmup_done"])
        self._fisher_examples = int(state_dict.get("fisher_examples", 0))
        self._skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self._frozen_at_step = state_dict.get("frozen_at_step")
        digests = state_dict.get("digests")
        if isinstance(digests, dict) and "by_rank" in digests:  # written by a sharded run: this rank's own
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            digests = digests["by_rank"][rank]
        self._digests = digests
        self._steps_since_select = int(state_dict.get("steps_since_select", 0))
        self.reselections = int(state_dict.get("reselections", 0))
        if self._fit_started and self._trainer is not None:  # restored after on_fit_start (FSDP2, DeepSpeed)
            self._apply_restored(self._trainer, state_dict)
        else:
            self._restored = state_dict


def _inverse_loss_scale(trainer: pl.Trainer, optimizer: Optimizer) -> float:
    """1 / loss scale when the gradients seen here are still scaled (fused optimizer + fp16 AMP)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and _optimizer_handles_unscaling(optimizer):
        return 1.0 / float(scaler.get_scale())
    return 1.0


def _reduce_mean(
    trainer: pl.Trainer, fisher: dict[str, Tensor], skip: set[str] | frozenset = frozenset(), bucket: int = 1 << 22
) -> dict[str, Tensor]:
    """Average the Fisher over ranks, in place, in all-reduces of at most ``bucket`` entries (16 MiB in fp32)
    of consecutive tensors (``skip``: sharded tensors, whose per-rank parts are different rows, already
    averaged when accumulated). A flat copy of the whole Fisher would double its memory at the freeze."""
    if trainer.world_size <= 1:
        return fisher
    names = [n for n in fisher if n not in skip]
    batch: list[str] = []
    for i, n in enumerate(names):
        batch.append(n)
        size = sum(fisher[m].numel() for m in batch)
        if i + 1 < len(names) and size + fisher[names[i + 1]].numel() <= bucket:
            continue
        if len(batch) == 1:
            fisher[n].copy_(trainer.strategy.reduce(fisher[n], reduce_op="mean"))
        else:
            flat = trainer.strategy.reduce(torch.cat([fisher[m].reshape(-1) for m in batch]), reduce_op="mean")
            offset = 0
            for m in batch:
                fisher[m].copy_(flat[offset : offset + fisher[m].numel()].view_as(fisher[m]))
                offset += fisher[m].numel()
        batch = []
    return fisher
