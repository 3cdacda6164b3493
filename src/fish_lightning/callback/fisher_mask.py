"""``FisherMaskCallback``: FISH-Tuning for any Lightning (+ peft) training run.

A thin adapter: every phase change, the Fisher, the masks, the enforcer and the checkpoint state live in
:class:`~fish_lightning.masker.masker.FishMasker` (framework-free); the hooks below tell it where the Trainer is,
with the Trainer itself as its host (epoch and step counters, loss scale, collectives, loggers). Lifecycle, in
optimizer steps:

1. **Dense warmup.** All candidates train. Unless ``calibration_samples`` is set, the first ``warmup_steps``
   optimizer steps feed the Fisher: by default the exact sum of squared per-example gradients, captured by hooks
   from the training backward itself; with ``fisher_estimator="batch_grad"`` the squared (unscaled) mini-batch
   gradient of each step, a cheaper proxy.
2. **Freeze.** At the start of epoch ``mask_epoch`` (or right after warmup when it is ``None``; checked at every
   batch, so a resume that skips ``on_train_epoch_start`` still freezes on time), the Fisher is averaged across
   ranks, exactly ``k = round((1 - sparsity) * n)`` entries are kept, and the Fisher buffers are freed. With
   ``calibration_samples`` the Fisher is computed at this point instead, from true per-example gradients of that
   many training examples (the original FISH procedure).
3. **Masked training.** Frozen entries get zero gradient (so they drop out of gradient clipping) and are written
   back after every ``optimizer.step()``: they stay bit-identical with any torch optimizer. With
   ``rewind_frozen=True`` the frozen entries are first reset to their values at fit start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from fish_lightning.callback.checks import check_fit, check_strategy, warn_short_warmup
from fish_lightning.masker import state as ckpt
from fish_lightning.masker.calibration import per_example_loss_fn
from fish_lightning.masker.checks import check_budget, load_given_masks
from fish_lightning.masker.frozen import report_verify
from fish_lightning.masker.masker import FishMasker
from fish_lightning.masker.settings import FishSettings
from fish_lightning.masker.view import MaskerView
from fish_lightning.masker.warmup import inverse_loss_scale


class FisherMaskCallback(MaskerView, Callback):
    """Train only the top-Fisher fraction of a model's (PEFT) parameters.

    Args:
        sparsity: fraction of candidate entries frozen, in ``[0, 1)``; density is ``1 - sparsity``.
        warmup_steps: dense optimizer steps before the freeze whose gradients feed the Fisher (``>= 1``; ``0``
            only with ``calibration_samples``, ``mask_path`` or a selection that reads no Fisher (``"random"``,
            ``"magnitude"``): the mask before any training step).
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
        kept: keep exactly this many candidate entries (an alternative to ``sparsity``, which then stays at its
            default; scopes ``"global"`` and ``"normalized"``), e.g. another method's trainable-entry budget.
        settings: a :class:`~fish_lightning.masker.settings.FishSettings` instead of the keywords above.

    After the freeze, ``cb.masks`` maps parameter names to bool masks (True = trained). The lifecycle is
    ``cb.masker`` (:class:`~fish_lightning.masker.masker.FishMasker`).
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
        kept: int | None = None,
        *,
        settings: FishSettings | None = None,
    ) -> None:
        arguments = dict(sparsity=sparsity, warmup_steps=warmup_steps, mask_epoch=mask_epoch, include=include,
                         exclude=exclude, scope=scope, selection=selection, seed=seed,
                         calibration_samples=calibration_samples, keep_fisher=keep_fisher,
                         fisher_estimator=fisher_estimator, rewind_frozen=rewind_frozen,
                         sparse_optimizer_state=sparse_optimizer_state, strict=strict,
                         reselect_every_n_steps=reselect_every_n_steps, loss_reduction=loss_reduction,
                         mask_path=mask_path, kept=kept)  # fmt: skip
        super().__init__()
        if settings is not None:
            changed = {k: v for k, v in arguments.items() if v != getattr(FishSettings, k)}
            if changed:
                raise ValueError(f"FisherMaskCallback: pass settings= or keyword settings, not both (got {changed})")
        object.__setattr__(self, "masker", FishMasker(settings=settings or FishSettings(**arguments)))
        self.settings = self.masker.settings
        self._trainer: pl.Trainer | None = None
        self._fit_started = False  # on_fit_start ran and teardown did not yet

    # ``state_key`` stays Lightning's default (the class name): a key built from the settings would make a
    # resumed run with a changed setting silently skip load_state_dict; load_state_dict checks them instead.

    def __getattr__(self, name: str) -> Any:  # cb.sparsity, cb.warmup_steps, ...: the settings, read-only
        settings = self.__dict__.get("settings")
        if settings is not None and name in FishSettings.names():
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in FishSettings.names():
            raise AttributeError(f"FisherMaskCallback.{name} is read-only: the settings are validated once")
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ public, read-only (MaskerView + these)
    @property
    def calibration_examples(self) -> int:
        """Examples in the calibration Fisher (``calibration_samples``)."""
        return self.masker.calibration_examples or int(self.masker._pending("fisher_examples", 0))

    @property
    def sharded(self) -> frozenset[str]:
        """Candidates split across ranks (FSDP2 shards): their masks and Fisher are this rank's rows."""
        return frozenset(self.masker.sharded)

    @property
    def estimator_in_use(self) -> str:
        """The warmup estimator in effect: ``fisher_estimator``, or ``"batch_grad"`` after a fallback."""
        return self.masker.estimator_in_use

    @property
    def candidates(self) -> list[str] | None:
        return self.masker.candidates

    @property
    def warmup(self) -> Any:
        return self.masker.warmup

    @property
    def mask(self) -> Any:
        return self.masker.mask

    @property
    def enforcer(self) -> Any:
        return self.masker.enforcer

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_fit(self.settings, trainer, pl_module)
        self._trainer, m = trainer, self.masker
        restored = m.restored
        m.calibration_source = self._calibration_source(trainer)
        m.bind(pl_module, trainer)
        sharded = check_strategy(self.settings, trainer, m.params)
        given = None
        if self.mask_path is not None and m.mask is None:
            given = load_given_masks(self.mask_path, m.params)
        elif m.mask is None and (restored is None or restored.get("masks") is None) and self.mask_path is None:
            check_budget(self.settings, m.params)
        m.start(sharded, given, restored)
        self._fit_started = True
        budget = f"kept={self.kept:,}" if self.kept is not None else f"sparsity {self.sparsity:g}"
        how = f"from mask_path={self.mask_path}" if m.given_masks is not None else \
            f"({budget}, {self.selection}, {self.scope})"  # fmt: skip
        rank_zero_info(f"FISH: {len(m.candidates)} candidate tensors, {m.num_candidates:,} entries; "
                       f"keeping {m.num_kept:,} {how}")  # fmt: skip

    @staticmethod
    def _calibration_source(trainer: pl.Trainer) -> Any:
        def source(model: nn.Module, reduction: str) -> tuple[Any, Any, Any]:
            return trainer.train_dataloader, per_example_loss_fn(model, reduction), trainer.strategy.batch_to_device

        return source

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.masker.frozen:
            warn_short_warmup(self.settings, trainer)
        self.masker.begin_training(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.masker.freeze_if_due(pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.masker.start_batch(pl_module, batch)  # (freezes first when due: a resume may skip the epoch start)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.masker.after_backward(manual=not pl_module.automatic_optimization)  # before the user's clipping

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:  # (Lightning's own gradient clipping comes right after this hook)
        self.masker.before_step(optimizer, pl_module.automatic_optimization, inverse_loss_scale(trainer, optimizer))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        warmup = self.masker.warmup
        if not self.masker.frozen and warmup is not None and not warmup.reduction_checked and warmup.hooks is not None:
            warmup.check_reduction(trainer, pl_module, outputs, batch)
        self.masker.end_batch(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips Callback.teardown on an exception

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = self.masker
        if m.mask is None:
            msg = (f"FISH: training ended before the mask was frozen (warmup steps done: {m.warmup_steps_done}, "
                   f"mask_epoch={self.mask_epoch}): every candidate trained densely")  # fmt: skip
            if self.strict:
                raise RuntimeError(msg)
            rank_zero_warn(msg)
            return
        if m.mask.digests is not None:
            report_verify(trainer, self.verify(pl_module), self.strict)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit_started = False
        self.masker.end()

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.masker.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fit_started and self._trainer is not None:  # restored after on_fit_start (FSDP2, DeepSpeed)
            ckpt.check_settings(state_dict, self.settings)
            self.masker.apply_restored(state_dict)
            return
        self.masker.load_state_dict(state_dict)  # applied to the candidates at fit start
