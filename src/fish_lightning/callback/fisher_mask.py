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

import weakref
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from fish_lightning.callback import checkpoint as ckpt
from fish_lightning.callback import distributed
from fish_lightning.callback.calibration import calibrate_fisher
from fish_lightning.callback.checks import (
    bound_to,
    check_budget,
    check_fit,
    check_strategy,
    load_given_masks,
    warn_new_model,
    warn_short_warmup,
)
from fish_lightning.callback.enforcer import MaskEnforcer
from fish_lightning.callback.frozen import FrozenMask, log_anatomy, report_verify
from fish_lightning.callback.settings import FishSettings
from fish_lightning.callback.step_gate import StepGate
from fish_lightning.callback.warmup import WarmupFisher, inverse_loss_scale, rewind_frozen_, snapshot
from fish_lightning.core.candidates import find_candidates
from fish_lightning.core.fisher import zeros_like_params
from fish_lightning.core.selection import num_kept, select_masks, selection_scores


class _Count:
    """A read-only counter of the callback: ``<phase>.<attr>`` while that phase object exists, else the value
    under ``key`` of a checkpoint loaded outside fit (``default`` when neither)."""

    def __init__(self, phase: str, attr: str, key: str, default: int | None, doc: str) -> None:
        self.phase, self.attr, self.key, self.default, self.__doc__ = phase, attr, key, default, doc

    def __get__(self, cb: Any, owner: type | None = None) -> Any:
        if cb is None:
            return self
        obj = getattr(cb, self.phase)
        if obj is not None:
            return getattr(obj, self.attr)
        value = cb._pending(self.key, self.default)
        return value if value is None else int(value)


class FisherMaskCallback(Callback):
    """Train only the top-Fisher fraction of a model's (PEFT) parameters.

    Args:
        sparsity: fraction of candidate entries frozen, in ``[0, 1)``; density is ``1 - sparsity``.
        warmup_steps: dense optimizer steps before the freeze whose gradients feed the Fisher (``>= 1``; ``0``
            only with ``calibration_samples`` or ``mask_path``: the mask before any training step).
        mask_epoch: the mask is frozen at the start of this epoch; ``None`` freezes right after ``warmup_steps``.
        include: regexes (``re.search``) over ``named_parameters()`` names; when given, the candidates are the
            trainable parameters matching any of them.
        exclude: regexes removing candidates. By default the candidates are all trainable parameters except peft's
            ``modules_to_save`` copies (e.g. the classifier head) and modules marked ``fish_always_trained = True``
            (our bottleneck adapters' head), which stay fully trainable. AdaLoRA is refused at fit start.
        scope: ``"global"`` top-k over all candidates (the paper), ``"per_tensor"`` (one density everywhere), or
            ``"normalized"``: a global top-k over each tensor's Fisher divided by its mean, so tensors with much
            smaller gradients (LoRA A vs B) are not starved while densities still follow the Fisher.
        selection: ``"fisher"``; baselines ``"random"`` (seeded), ``"reverse"`` (lowest Fisher), ``"magnitude"``.
        seed: seed of the ``"random"`` selection (identical on every rank).
        calibration_samples: when set, the Fisher is the sum of true per-example squared gradients over this many
            training examples, computed at the freeze without updating anything (eval mode), from the module's
            ``fisher_loss(batch) -> Tensor[b]`` if it defines one, else ``training_step`` on one example at a time.
        keep_fisher: keep ``cb.fisher`` (on CPU) after the freeze instead of freeing it.
        fisher_estimator: ``"per_example"`` (exact sum of squared per-example gradients from the training
            backward, one rule per module type; ``"batch_grad"`` with a warning for what none covers) or
            ``"batch_grad"`` (squared mini-batch gradient per step).
        rewind_frozen: at the freeze, reset frozen entries to their fit-start values (one copy kept until then).
        sparse_optimizer_state: from the freeze on, the optimizer trains compact tensors of the kept entries
            (:class:`~fish_lightning.core.sparse_state.CompactOptimizer`); frozen entries leave it.
        strict: make :meth:`verify` at the end of ``fit`` raise instead of warn when a frozen entry moved.
        reselect_every_n_steps: after the freeze, keep accumulating squared mini-batch gradients and re-select
            exactly k entries every N optimizer steps (newly kept entries start with zero optimizer state);
            ``None`` (default): the paper's fixed mask.
        loss_reduction: ``"mean"`` (default) or ``"sum"``: how the training loss reduces per-example losses; the
            Fisher undoes it; with ``fisher_loss`` the first warmup batch is checked and a mismatch warned about.
        mask_path: a mask saved with :func:`~fish_lightning.core.mask_file.save_mask` (a run's
            ``fish_mask.safetensors``), applied at the configured freeze instead of a selection (no Fisher; the
            dense warmup still runs; ``warmup_steps=0, mask_epoch=None``: at fit start). Names and shapes must be
            this fit's candidates (checked at fit start); ``sparsity``/``selection`` are then unused.

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
        loss_reduction: str = "mean",
        mask_path: str | None = None,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k in FishSettings.names()}  # exactly the parameters
        super().__init__()
        self.settings = FishSettings(**arguments)
        if self.settings.unused_warmup:
            rank_zero_warn(
                f"warmup_steps={warmup_steps} is not used: with calibration_samples and mask_epoch={mask_epoch} "
                "the Fisher is computed at the start of that epoch (pass warmup_steps=0 to say so, or "
                "mask_epoch=None to freeze after warmup_steps dense steps)"
            )
        self.candidates: list[str] | None = None
        self.warmup: WarmupFisher | None = None  # phase 1 (kept after the freeze for its counters)
        self.mask: FrozenMask | None = None  # phase 2
        self.enforcer = MaskEnforcer(self.settings.sparse_optimizer_state)
        self._gate = StepGate(on_step_end=self._after_optimizer_step)  # per-step work once per step()
        self._params: dict[str, nn.Parameter] = {}
        self._bound: list[weakref.ref] = []  # the candidates the state belongs to (a new model starts over)
        self._sharded: set[str] = set()  # candidates split across ranks (FSDP2 DTensor shards)
        self._trainer: pl.Trainer | None = None
        self._fit_started = False  # on_fit_start ran and teardown did not yet
        self._restored: dict[str, Any] | None = None  # checkpoint state waiting for the candidates
        self._init_state: dict[str, Tensor] | None = None  # fit-start values, for rewind_frozen
        self._kept_fisher: dict[str, Tensor] | None = None  # keep_fisher: the Fisher of the last selection (CPU)
        self._calibration_examples = 0
        self._given_masks: dict[str, Tensor] | None = None  # mask_path, loaded and checked at fit start

    # ``state_key`` stays Lightning's default (the class name): a key built from the settings would make a
    # resumed run with a changed setting silently skip load_state_dict; load_state_dict checks them instead.

    # ------------------------------------------------------------------ public, read-only
    @property
    def frozen(self) -> bool:
        """Whether the mask has been selected and is being enforced."""
        return self.mask is not None

    @property
    def masks(self) -> dict[str, Tensor] | None:
        """name -> bool mask (True = trained) after the freeze (this rank's part when sharded), else ``None``."""
        return self.mask.masks if self.mask is not None else None

    @property
    def fisher(self) -> dict[str, Tensor] | None:
        """The warmup Fisher before the freeze; after it, the Fisher of the selection on CPU with ``keep_fisher``."""
        if self.mask is None and self.warmup is not None:
            return self.warmup.fisher
        return self._kept_fisher

    @property
    def num_candidates(self) -> int:
        """Candidate entries (whole tensors; from the checkpoint's masks when loaded outside fit)."""
        if self._params:
            return sum(p.numel() for p in self._params.values())
        return sum(m.numel() for m in self.mask.masks.values()) if self.mask is not None else 0

    @property
    def num_kept(self) -> int:
        """Kept candidate entries: exact after the freeze, the target ``k`` before it."""
        if self.mask is not None:
            return self.mask.num_kept
        if self._given_masks is not None:
            return sum(int(m.sum()) for m in self._given_masks.values())
        return num_kept(self.num_candidates, self.sparsity)

    freeze_step = _Count("mask", "freeze_step", "frozen_at_step", None,
                         "Global step at which the mask was (last) selected; ``None`` before the freeze.")  # fmt: skip
    warmup_steps_done = _Count("warmup", "steps_done", "warmup_done", 0,
                               "Optimizer steps in the warmup Fisher (non-finite ones excluded).")  # fmt: skip
    skipped_nonfinite_steps = _Count("warmup", "skipped_nonfinite", "skipped_nonfinite", 0,
                                     "Warmup steps left out of the Fisher for a non-finite gradient.")  # fmt: skip
    reselections = _Count("mask", "reselections", "reselections", 0,
                          "Re-selections since the freeze (``reselect_every_n_steps``).")  # fmt: skip

    @property
    def calibration_examples(self) -> int:
        """Examples in the calibration Fisher (``calibration_samples``)."""
        return self._calibration_examples or int(self._pending("fisher_examples", 0))

    @property
    def sharded(self) -> frozenset[str]:
        """Candidates split across ranks (FSDP2 shards): their masks and Fisher are this rank's rows."""
        return frozenset(self._sharded)

    @property
    def estimator_in_use(self) -> str:
        """The warmup estimator in effect: ``fisher_estimator``, or ``"batch_grad"`` after a fallback."""
        return self.warmup.estimator if self.warmup is not None else self.fisher_estimator

    def _pending(self, key: str, default: Any) -> Any:
        return default if self._restored is None else self._restored.get(key, default)

    # ------------------------------------------------------------------ fit start
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_fit(self.settings, trainer, pl_module)
        self._trainer = trainer
        named = dict(pl_module.named_parameters())
        restored, self._restored = self._restored, None
        if restored is not None and restored.get("candidates") is not None:
            self.candidates = list(restored["candidates"])
            missing = [n for n in self.candidates if n not in named]
            if missing:
                raise ValueError(f"checkpointed FISH candidates are not parameters of this model: {missing[:4]}")
        else:
            self.candidates = find_candidates(pl_module, self.include, self.exclude)
        params = {n: named[n] for n in self.candidates}
        if restored is None and not bound_to(self._bound, params):
            self._start_over(params)
        self._params, self._bound = params, [weakref.ref(p) for p in params.values()]
        self._sharded = check_strategy(self.settings, trainer, self._params)
        if self.mask_path is not None and self.mask is None:
            self._given_masks = load_given_masks(self.mask_path, self._params)
        elif self.mask is None:
            check_budget(self.settings, self._params)
        if self.warmup is None or restored is not None:
            self.warmup = WarmupFisher(self.settings, self._params, self._sharded, allocate=self.mask is None)
        if self.rewind_frozen and self.mask is None and self._init_state is None:
            self._init_state = snapshot(self._params)
        self._fit_started = True
        if restored is not None:
            self._apply_restored(trainer, restored)
        elif self.mask is not None:
            self._enforce(trainer)
        how = f"from mask_path={self.mask_path}" if self._given_masks is not None else \
            f"(sparsity {self.sparsity:g}, {self.selection}, {self.scope})"  # fmt: skip
        rank_zero_info(f"FISH: {len(self.candidates)} candidate tensors, {self.num_candidates:,} entries; "
                       f"keeping {self.num_kept:,} {how}")  # fmt: skip

    def _start_over(self, params: dict[str, nn.Parameter]) -> None:
        """A model other than the one this state belongs to: the previous Fisher/mask are not for it."""
        if self.mask is not None or (self.warmup is not None and self.warmup.steps_done):
            warn_new_model()
        self.warmup, self.mask, self._init_state, self._kept_fisher = None, None, None, None
        self.enforcer.remove()

    def _apply_restored(self, trainer: pl.Trainer, restored: dict[str, Any]) -> None:
        """Checkpointed state onto this fit's candidates: from ``on_fit_start``, or from ``load_state_dict`` when
        the strategy restores callbacks after setup (``ModelParallelStrategy``/FSDP2 does, after ``on_fit_start``)."""
        saved = restored.get("candidates")
        if saved is not None and list(saved) != list(self.candidates or []):
            raise ValueError(
                f"checkpointed FISH candidates ({len(saved)} tensors) differ from this model's "
                f"({len(self.candidates or [])}): resume with the same model, peft config and include/exclude"
            )
        self.warmup = WarmupFisher(self.settings, self._params, self._sharded, allocate=False)
        packed = restored.get("masks")
        self.warmup.restore(None if packed is not None else restored.get("fisher"), int(restored["warmup_done"]),
                            int(restored.get("skipped_nonfinite", 0)), restored.get("fisher_estimator"))  # fmt: skip
        self._calibration_examples = int(restored.get("fisher_examples", 0))
        self.mask = ckpt.restore_mask(restored, self._params, self._sharded)
        if self.mask is not None:
            self._init_state = None
            self._enforce(trainer)  # before Lightning loads the (compact) optimizer state
        else:
            if self.warmup.fisher is None and self.settings.accumulates_warmup:
                self.warmup.fisher = zeros_like_params(self._params)
            if self._init_state is not None and restored.get("init_state") is not None:
                self._init_state = ckpt.local_copies(restored["init_state"], self._params, self._sharded)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._gate.watch(trainer.optimizers)
        if self.mask is not None:
            if not self.enforcer.covers(trainer.optimizers):
                self._enforce(trainer)
            self._check_enforced()
            return
        s = self.settings
        if s.mask_epoch is None and s.warmup_steps == 0:  # calibration or mask_path: the mask before any step
            self._freeze(trainer, pl_module)
            return
        self.warmup.attach(pl_module, trainer)  # type: ignore[union-attr]
        warn_short_warmup(s, trainer)
        self._freeze_if_due(trainer, pl_module)

    # ------------------------------------------------------------------ per batch: dispatch
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._gate.reopen()
        self._freeze_if_due(trainer, pl_module)  # (Lightning skips on_train_epoch_start on some resumes)
        if self.mask is None and self.warmup is not None:
            self.warmup.start_batch(trainer, batch)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mask is not None and not pl_module.automatic_optimization:  # before the user's clip_gradients
            if self.reselect_every_n_steps is not None:  # (manual optimization: each backward's squares)
                self.mask.add_squares(self._params, 1.0)
            self.enforcer.after_backward(self._params, self.mask.masks)
        elif self.mask is None and self.warmup is not None:
            self.warmup.finish_batch()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self.mask is not None:  # (Lightning's own gradient clipping comes right after this hook)
            self._check_enforced()
            if self.reselect_every_n_steps is not None and self._gate.take():
                if pl_module.automatic_optimization:
                    self.mask.add_squares(self._params, inverse_loss_scale(trainer, optimizer))
                self.mask.steps_since_select += 1
            self.enforcer.before_step(self._params, self.mask.masks)
        elif self.warmup is not None and self.warmup.active and self._gate.take():
            self.warmup.take_step(trainer, optimizer)

    def _after_optimizer_step(self) -> None:
        if self.mask is None and self.warmup is not None:
            self.warmup.rearm()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        warmup = self.warmup
        if self.mask is None and warmup is not None and not warmup.reduction_checked and warmup.hooks is not None:
            warmup.check_reduction(trainer, pl_module, outputs, batch)
        if self.mask is None:
            self._freeze_if_due(trainer, pl_module)
        elif self.mask is not None and self.reselect_every_n_steps is not None \
                and self.mask.steps_since_select >= self.reselect_every_n_steps:  # fmt: skip
            self._reselect(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze_if_due(trainer, pl_module)

    def _freeze_due(self, trainer: pl.Trainer) -> bool:
        """Whether the freeze is due, from the trainer's epoch (``mask_epoch``) or the warmup's step count: checked
        at train start, epoch start, batch start and batch end, so no single skipped hook can delay it."""
        if self.mask is not None or self.warmup is None:
            return False
        if self.mask_epoch is not None:
            return trainer.current_epoch >= self.mask_epoch
        return not self.warmup.active

    def _freeze_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._freeze_due(trainer):
            self._freeze(trainer, pl_module)

    # ------------------------------------------------------------------ freeze and re-selection
    def _freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warmup = self.warmup
        warmup.detach()  # type: ignore[union-attr]
        fisher = None
        if self.settings.needs_fisher:
            if self.calibration_samples is not None:
                fisher, self._calibration_examples = calibrate_fisher(
                    trainer, pl_module, self._params, self.calibration_samples, self.loss_reduction
                )
                fisher = distributed.reduce_mean_(trainer, fisher, skip=self._sharded)
            else:
                fisher = warmup.reduced_fisher(trainer)  # type: ignore[union-attr]
        if self._given_masks is None:
            masks, kept = self._select(trainer, fisher)
        else:  # mask_path: this rank's rows, on the parameters' devices
            given, self._given_masks = self._given_masks, None
            masks, kept = ckpt.local_copies(given, self._params, self._sharded), ckpt.counts(given)
        if self._init_state is not None:  # rewind_frozen
            rewind_frozen_(self._params, masks, self._init_state)
            self._init_state = None
        self.mask = FrozenMask.select(masks, kept, self._params, trainer.global_step)
        self._kept_fisher = {n: f.detach().cpu() for n, f in fisher.items()} if self.keep_fisher and fisher else None
        self.mask.log(trainer, self._params)  # type: ignore[union-attr]
        log_anatomy(trainer, self.mask, self._params, fisher)
        warmup.fisher = None  # type: ignore[union-attr]
        self._enforce(trainer)

    def _select(self, trainer: pl.Trainer, fisher: dict[str, Tensor] | None) -> tuple[dict, dict[str, int]]:
        """Exactly k entries scored from ``fisher`` (already reduced across ranks), identical on every rank;
        with the kept count per tensor over all ranks."""
        scores = selection_scores(self.selection, fisher, self._params, self.seed)
        if self._sharded:
            masks = distributed.select_sharded(trainer, scores, self._params, self._sharded, self.sparsity, self.scope)
        else:
            masks = select_masks(scores, self.sparsity, self.scope)
        del scores
        masks = distributed.broadcast_masks(trainer, masks, [n for n in masks if n not in self._sharded])
        masks = {n: m.to(self._params[n].device) for n, m in masks.items()}
        return masks, distributed.kept_counts(trainer, masks, self._sharded)

    def _enforce(self, trainer: pl.Trainer) -> None:
        """Enforce the mask on this fit's optimizers; with compact ones, ``cb.masks`` becomes a view of their
        indices (the bool masks are released)."""
        masks = dict(self.mask.masks)  # type: ignore[union-attr]
        self.enforcer.install(trainer.optimizers, self._params, masks)
        self.mask.masks = self.enforcer.mask_view(self._params, masks)  # type: ignore[union-attr]

    def _check_enforced(self) -> None:
        """Every step: the optimizers still hold what the enforcer installed (another callback may have rebuilt
        their param groups); if not, enforce again (dense) or refuse (compact state mid-training)."""
        if self.enforcer.installed and not self.enforcer.intact():
            rank_zero_info("FISH: the optimizer's param groups changed since the mask was installed; enforcing again")
            self.enforcer.repair(self.mask.masks)  # type: ignore[union-attr]

    def _reselect(self, trainer: pl.Trainer) -> None:
        """Re-select k entries from the Fisher accumulated since the last selection."""
        mask = self.mask
        fisher = distributed.reduce_mean_(trainer, mask.refisher) if self.settings.needs_fisher else None  # type: ignore[union-attr,arg-type]
        new, kept = self._select(trainer, fisher)
        self.enforcer.reselect(trainer.optimizers, self._params, dict(mask.masks), new)  # type: ignore[union-attr]
        mask.replace(new, kept, self._params)  # type: ignore[union-attr]
        mask.masks = self.enforcer.mask_view(self._params, new)  # type: ignore[union-attr]
        self.mask.log(trainer, self._params)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ verify and the end of fit
    def verify(self, pl_module: nn.Module | None = None) -> dict[str, Any]:
        """Check, against hashes taken at the freeze, that no frozen entry moved.

        Returns ``{"frozen_unchanged": bool, "kept": int, "candidates": int, "moved": [names], "untrained":
        [names]}``: ``moved`` lists tensors whose frozen entries changed, ``untrained`` tensors with kept entries
        that no optimizer of the fit trains (during fit only).
        """
        named = dict(pl_module.named_parameters()) if pl_module is not None else {}
        if self.mask is None and self._restored is not None and self._restored.get("candidates") and named:
            self.mask = ckpt.preview_mask(self._restored, {n: named[n].shape for n in self._restored["candidates"]})
        if self.mask is None:
            raise RuntimeError("FISH verify: no mask has been frozen yet")
        params = self._params if pl_module is None else {n: named[n] for n in self.mask.masks}
        moved = self.mask.moved(params)
        untrained = self.enforcer.untrained(self._params, self.mask.masks) if self._params else []
        return {"frozen_unchanged": not moved, "kept": self.num_kept, "candidates": self.num_candidates,
                "moved": moved, "untrained": untrained}  # fmt: skip

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips Callback.teardown on an exception

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mask is None:
            msg = (f"FISH: training ended before the mask was frozen (warmup steps done: {self.warmup_steps_done}, "
                   f"mask_epoch={self.mask_epoch}): every candidate trained densely")  # fmt: skip
            if self.strict:
                raise RuntimeError(msg)
            rank_zero_warn(msg)
            return
        if self.mask.digests is not None:
            report_verify(trainer, self.verify(pl_module), self.strict)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit_started = False
        self.enforcer.remove()
        self._gate.remove()
        if self.warmup is not None:
            self.warmup.detach()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        mask, warmup, trainer = self.mask, self.warmup, self._trainer
        return {
            **ckpt.settings_state(self.settings),
            "candidates": list(self.candidates) if self.candidates is not None else None,
            "shapes": {n: list(p.shape) for n, p in self._params.items()} or None,
            "fisher": warmup.checkpoint_fisher(trainer) if warmup is not None and mask is None else None,
            "warmup_done": self.warmup_steps_done,
            "fisher_examples": self.calibration_examples,
            "skipped_nonfinite": self.skipped_nonfinite_steps,
            "frozen_at_step": self.freeze_step,
            "fisher_estimator": self.estimator_in_use,
            "reselections": self.reselections,
            **ckpt.mask_state(trainer, mask, self._params, self._sharded),
            "init_state": ckpt.whole_copies(self._init_state, self._params, self._sharded),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ckpt.check_settings(state_dict, self.settings)
        if self._fit_started and self._trainer is not None:  # restored after on_fit_start (FSDP2, DeepSpeed)
            self._apply_restored(self._trainer, state_dict)
            return
        self._restored = state_dict  # applied to the candidates at fit start
        self.candidates = list(state_dict["candidates"]) if state_dict.get("candidates") is not None else None
        self.mask = ckpt.preview_mask(state_dict, state_dict.get("shapes"))  # masks, verify(module) outside fit


def _settings_property(name: str) -> property:
    return property(lambda self: getattr(self.settings, name), doc=f"The ``{name}`` setting (read-only).")


for _name in FishSettings.names():  # cb.sparsity, cb.warmup_steps, ...: the constructor's arguments
    setattr(FisherMaskCallback, _name, _settings_property(_name))
