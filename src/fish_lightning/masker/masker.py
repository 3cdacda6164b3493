"""``FishMasker``: the whole FISH-Tuning lifecycle, framework-free.

Phases, in optimizer steps (:mod:`fish_lightning.masker.phases`):

1. **warmup** — all candidates train; the first ``warmup_steps`` steps feed the Fisher (exact per-example squares
   from the training backward, or squared mini-batch gradients).
2. **frozen** — exactly ``k`` entries are selected (or loaded from ``mask_path``; or scored by calibration) and
   enforced on the optimizers: frozen entries get zero gradient and stay bit-identical after every step.

The freeze is *due* from counters (``mask_epoch`` against the current epoch, or the warmup steps done), and
:meth:`FishMasker.freeze_if_due` is cheap, so adapters call it at every point where it could be due: a caller that
misses one notification still freezes on time.

A plain loop needs three lines (:meth:`FishMasker.wrap`); the Lightning and Hugging Face callbacks are adapters that
call the lifecycle methods from their hooks, with their trainer as the :class:`~fish_lightning.masker.host.Host`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fish_lightning.core.candidates import find_candidates
from fish_lightning.core.fisher import zeros_like_params
from fish_lightning.core.selection import get_scorer, num_kept, select_masks
from fish_lightning.masker import collectives as distributed
from fish_lightning.masker import state as ckpt
from fish_lightning.masker.calibration import calibrate_fisher
from fish_lightning.masker.enforcer import Enforcer, MaskEnforcer
from fish_lightning.masker.frozen import FrozenMask, log_anatomy
from fish_lightning.masker.log import info, warn
from fish_lightning.masker.phases import Phase
from fish_lightning.masker.settings import FishSettings
from fish_lightning.masker.step_gate import StepGate
from fish_lightning.masker.warmup import WarmupFisher, rewind_frozen_, snapshot


class FishMasker:
    """Train only the top-Fisher fraction of a model's candidate parameters.

    Args:
        model: the model (its trainable parameters are the candidates, see ``include``/``exclude``); ``None`` when
            an adapter binds it later (:meth:`bind`).
        settings: a :class:`~fish_lightning.masker.settings.FishSettings`; or pass its fields as keywords
            (``sparsity=0.9, warmup_steps=20, ...``; documented there).
        grad_accumulation: backwards per optimizer step whose losses were divided by this number (plain loops; the
            adapters read it from their trainer). The per-example Fisher undoes it.

    After the freeze, ``masks`` maps parameter names to bool masks (True = trained).
    """

    def __init__(self, model: nn.Module | None = None, settings: FishSettings | None = None, *,
                 grad_accumulation: int = 1, **kwargs: Any) -> None:  # fmt: skip
        if settings is not None and kwargs:
            raise ValueError(f"FishMasker: pass settings= or keyword settings, not both (got {sorted(kwargs)})")
        self.settings = settings if settings is not None else FishSettings(**kwargs)
        if not isinstance(self.settings, FishSettings):
            raise ValueError(f"settings={self.settings!r} must be a FishSettings")
        s = self.settings
        if s.unused_warmup:
            warn(f"warmup_steps={s.warmup_steps} is not used: with calibration_samples and mask_epoch={s.mask_epoch} "
                 "the Fisher is computed at the start of that epoch (pass warmup_steps=0 to say so, or "
                 "mask_epoch=None to freeze after warmup_steps dense steps)")  # fmt: skip
        self.phase = Phase.WARMUP
        self.candidates: list[str] | None = None
        self.warmup: WarmupFisher | None = None
        self.mask: FrozenMask | None = None
        self.enforcer: Enforcer = MaskEnforcer(s.sparse_optimizer_state)
        self.gate = StepGate(on_step_end=self._after_optimizer_step)
        self.params: dict[str, nn.Parameter] = {}
        self.sharded: set[str] = set()
        self.host: Any = None
        self.restored: dict[str, Any] | None = None  # checkpoint state waiting for the candidates
        self.init_state: dict[str, Tensor] | None = None  # fit-start values, for rewind_frozen
        self.kept_fisher: dict[str, Tensor] | None = None
        self.calibration_examples = 0
        self.given_masks: dict[str, Tensor] | None = None
        #: ``(model, loss_reduction) -> (loader, loss_fn(batch) -> Tensor[b], to_device)``: the adapter's data
        self.calibration_source: Callable[[nn.Module, str], tuple[Any, Any, Any]] | None = None
        #: ``batch -> None``: a forward of the batch the probe of the batch dimension may run (plain loops)
        self.probe_runner: Callable[[Any], Any] | None = None
        self._bound: list[weakref.ref] = []
        self._loop: Any = None  # the plain-loop driver (:class:`~fish_lightning.masker.loop.PlainLoop`)
        if model is not None:
            from fish_lightning.masker.loop import PlainLoop

            self._loop = PlainLoop(self, model, grad_accumulation)

    # ------------------------------------------------------------------ read-only view
    @property
    def frozen(self) -> bool:
        return self.mask is not None

    @property
    def masks(self) -> Mapping[str, Tensor] | None:
        """name -> bool mask (True = trained) after the freeze (this rank's part when sharded), else ``None``."""
        return self.mask.masks if self.mask is not None else None

    @property
    def fisher(self) -> dict[str, Tensor] | None:
        """The warmup Fisher before the freeze; after it, the Fisher of the selection on CPU (``keep_fisher``)."""
        if self.mask is None and self.warmup is not None:
            return self.warmup.fisher
        return self.kept_fisher

    @property
    def num_candidates(self) -> int:
        if self.params:
            return sum(p.numel() for p in self.params.values())
        return sum(m.numel() for m in self.mask.masks.values()) if self.mask is not None else 0

    @property
    def num_kept(self) -> int:
        """Kept candidate entries: exact after the freeze, the target ``k`` before it."""
        if self.mask is not None:
            return self.mask.num_kept
        if self.given_masks is not None:
            return sum(int(m.sum()) for m in self.given_masks.values())
        if self.settings.kept is not None:
            return self.settings.kept
        if self.settings.scope == "per_tensor" and self.params:
            return sum(num_kept(p.numel(), self.settings.sparsity) for p in self.params.values())
        return num_kept(self.num_candidates, self.settings.sparsity)

    def _pending(self, key: str, default: Any) -> Any:
        return default if self.restored is None else self.restored.get(key, default)

    @property
    def freeze_step(self) -> int | None:
        """Optimizer steps done (the trainer's global step) when the mask was (last) selected; ``None`` before."""
        if self.mask is not None:
            return self.mask.freeze_step
        value = self._pending("frozen_at_step", None)
        return None if value is None else int(value)

    @property
    def warmup_steps_done(self) -> int:
        """Optimizer steps in the warmup Fisher (non-finite ones and steps without a backward excluded)."""
        return self.warmup.steps_done if self.warmup is not None else int(self._pending("warmup_done", 0))

    @property
    def skipped_nonfinite_steps(self) -> int:
        return self.warmup.skipped_nonfinite if self.warmup is not None else int(self._pending("skipped_nonfinite", 0))

    @property
    def reselections(self) -> int:
        return self.mask.reselections if self.mask is not None else int(self._pending("reselections", 0))

    @property
    def estimator_in_use(self) -> str:
        """The warmup estimator in effect: ``fisher_estimator``, or ``"batch_grad"`` after a fallback."""
        return self.warmup.estimator if self.warmup is not None else self.settings.fisher_estimator

    # ------------------------------------------------------------------ plain loops
    def wrap(self, optimizer: Optimizer, scaler: torch.amp.GradScaler | None = None) -> Optimizer:
        """Enforce FISH on ``optimizer`` in a plain loop and return it (the same object, hooked): the warmup counts
        its steps, the freeze happens when due, and from then on frozen entries stay bit-identical. ``scaler``: the
        ``GradScaler`` that steps it under fp16 AMP (its loss scale is undone in the Fisher). Call once."""
        if self._loop is None:
            raise RuntimeError("FishMasker.wrap: this masker was built without a model (an adapter drives it); "
                               "build it as FishMasker(model, ...) for a plain loop")  # fmt: skip
        return self._loop.wrap(optimizer, scaler)

    def unwrap(self) -> None:
        """End a plain loop: remove every hook ``wrap`` installed (model, backward, optimizer, ``scaler.step``) and
        the enforcer's; the optimizer no longer guards frozen entries. The masks and ``verify`` stay usable."""
        if self._loop is None:
            raise RuntimeError("FishMasker.unwrap: the adapter releases its hooks at the end of training")
        self._loop.unwrap()

    def set_epoch(self, epoch: int) -> None:
        """The current epoch (0-based), for ``mask_epoch``: call at the start of each epoch of a plain loop."""
        if self._loop is None:
            raise RuntimeError("FishMasker.set_epoch: the adapter's trainer counts epochs")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be an integer >= 0")
        self._loop.host.current_epoch = epoch

    def calibrate(self, loader: Iterable[Any], loss_fn: Callable[[Any], Tensor]) -> None:
        """Plain loops with ``calibration_samples``: the Fisher of that many examples of ``loader`` with
        ``loss_fn(batch) -> Tensor[b]`` (one loss per example), before any update; freezes the mask when due."""
        if self._loop is None:
            raise RuntimeError("FishMasker.calibrate: the adapter calibrates from its trainer's data")
        self._loop.calibration = (loader, loss_fn)
        self.freeze_if_due(self._loop.model)

    # ------------------------------------------------------------------ lifecycle (called by adapters)
    def bind(self, model: nn.Module, host: Any) -> None:
        """Start of a fit: the candidates of ``model`` (or the checkpoint's), a fresh or restored state."""
        self.host = host
        named = dict(model.named_parameters())
        restored, self.restored = self.restored, None
        s = self.settings
        if restored is not None and restored.get("candidates") is not None:
            self.candidates = list(restored["candidates"])
            missing = [n for n in self.candidates if n not in named]
            if missing:
                raise ValueError(f"checkpointed FISH candidates are not parameters of this model: {missing[:4]}")
        else:
            self.candidates = find_candidates(model, s.include, s.exclude)
        params = {n: named[n] for n in self.candidates}
        if restored is None and not self._bound_to(params):
            self._start_over()
        self.params, self._bound = params, [weakref.ref(p) for p in params.values()]

    def start(self, sharded: set[str], given_masks: dict[str, Tensor] | None, restored: dict[str, Any] | None) -> None:
        """After the adapter's checks: the phase objects for this fit, the checkpoint's state applied."""
        s = self.settings
        self.sharded = sharded
        if given_masks is not None and self.mask is None:
            self.given_masks = given_masks
        if self.warmup is None or restored is not None:
            self.warmup = WarmupFisher(s, self.params, self.sharded, allocate=self.mask is None)
            self.warmup.runner = self.probe_runner
        if s.rewind_frozen and self.mask is None and self.init_state is None:
            self.init_state = snapshot(self.params)
        if restored is not None:
            self.apply_restored(restored)
        elif self.mask is not None:
            self.enforce()

    def _bound_to(self, params: dict[str, nn.Parameter]) -> bool:
        return len(self._bound) == len(params) and all(r() is p for r, p in zip(self._bound, params.values()))

    def _start_over(self) -> None:
        """A model other than the one this state belongs to: the previous Fisher/mask are not for it."""
        if self.mask is not None or (self.warmup is not None and self.warmup.steps_done):
            warn("FISH: this fit's model is not the one the callback's state belongs to (a new model, or other "
                 "candidate tensors): its mask/Fisher are discarded and a new warmup starts. Use one callback per "
                 "model, or a checkpoint (ckpt_path=...) to continue a run")  # fmt: skip
        self.warmup, self.mask, self.init_state, self.kept_fisher = None, None, None, None
        self.phase = Phase.WARMUP
        self.enforcer.remove()

    def apply_restored(self, restored: dict[str, Any]) -> None:
        """Checkpointed state onto this fit's candidates."""
        saved = restored.get("candidates")
        if saved is not None and list(saved) != list(self.candidates or []):
            raise ValueError(
                f"checkpointed FISH candidates ({len(saved)} tensors) differ from this model's "
                f"({len(self.candidates or [])}): resume with the same model, peft config and include/exclude"
            )
        self.warmup = WarmupFisher(self.settings, self.params, self.sharded, allocate=False)
        self.warmup.runner = self.probe_runner
        packed = restored.get("masks")
        self.warmup.restore(None if packed is not None else restored.get("fisher"), int(restored["warmup_done"]),
                            int(restored.get("skipped_nonfinite", 0)), restored.get("fisher_estimator"))  # fmt: skip
        self.calibration_examples = int(restored.get("fisher_examples", 0))
        self.mask = ckpt.restore_mask(restored, self.params, self.sharded)
        if self.mask is not None:
            self.phase = Phase.FROZEN
            self.init_state = None
            self.enforce()  # before the trainer loads the (compact) optimizer state
        else:
            self.phase = Phase.WARMUP
            if self.warmup.fisher is None and self.settings.accumulates_warmup:
                self.warmup.fisher = zeros_like_params(self.params)
            if self.init_state is not None and restored.get("init_state") is not None:
                self.init_state = ckpt.local_copies(restored["init_state"], self.params, self.sharded)

    def begin_training(self, model: nn.Module) -> None:
        """Training starts (after the optimizers exist and any checkpoint is loaded): watch the optimizers' steps,
        re-enforce the mask or attach the warmup hooks, and freeze if it is due already."""
        host = self.host
        self.gate.watch(host.optimizers)
        if self.mask is not None:
            if not self.enforcer.covers(host.optimizers):
                self.enforce()
            self.check_enforced()
            return
        s = self.settings
        if s.mask_epoch is None and s.warmup_steps == 0:  # calibration or mask_path: the mask before any step
            self.freeze(model)
            return
        self.warmup.attach(model, host)  # type: ignore[union-attr]
        self.freeze_if_due(model)

    def start_batch(self, model: nn.Module, batch: Any, weights: Tensor | None = None) -> None:
        """Before a batch's forward (the batch tells the per-example hooks its size; ``weights``: optional
        ``[batch]`` multipliers of each example's squared gradient, for adapters whose trainer weighs examples
        unequally in the loss)."""
        self.gate.reopen()
        self.freeze_if_due(model)
        if self.mask is None and self.warmup is not None:
            self.warmup.start_batch(self.host, batch, weights)

    def after_backward(self, manual: bool) -> None:
        """Right after a backward, before anyone reads the gradients (clipping)."""
        if self.mask is not None and manual:
            if self.settings.reselect_every_n_steps is not None:  # (manual optimization: each backward's squares)
                self.mask.add_squares(self.params, 1.0)
            self.enforcer.after_backward(self.params, self.mask.masks)
        elif self.mask is None and self.warmup is not None:
            self.warmup.finish_batch()

    def before_step(self, optimizer: Optimizer, automatic: bool = True, inv_scale: float = 1.0) -> None:
        """Right before ``optimizer.step()`` (once per step, see :class:`StepGate`)."""
        if self.mask is not None:
            self.check_enforced()
            if self.settings.reselect_every_n_steps is not None and self.gate.take():
                if automatic:
                    self.mask.add_squares(self.params, inv_scale)
                self.mask.steps_since_select += 1
            self.enforcer.before_step(self.params, self.mask.masks)
        elif self.warmup is not None and self.warmup.active and self.gate.take():
            self.warmup.take_step(self.host, optimizer)

    def _after_optimizer_step(self) -> None:
        if self.mask is None and self.warmup is not None:
            self.warmup.rearm()

    def end_batch(self, model: nn.Module) -> None:
        """After a batch's optimizer step: freeze when due; re-select when due."""
        if self.mask is None:
            self.freeze_if_due(model)
        elif self.settings.reselect_every_n_steps is not None \
                and self.mask.steps_since_select >= self.settings.reselect_every_n_steps:  # fmt: skip
            self.reselect()

    def freeze_due(self) -> bool:
        """Whether the freeze is due, from the host's epoch (``mask_epoch``) or the warmup's step count."""
        if self.mask is not None or self.warmup is None:
            return False
        if self.settings.mask_epoch is not None:
            return self.host.current_epoch >= self.settings.mask_epoch
        return not self.warmup.active

    def freeze_if_due(self, model: nn.Module) -> None:
        if self.freeze_due():
            self.freeze(model)

    # ------------------------------------------------------------------ freeze and re-selection
    def freeze(self, model: nn.Module) -> None:
        """warmup -> frozen: score, select exactly k (or take ``mask_path``'s), enforce."""
        host, warmup, s = self.host, self.warmup, self.settings
        warmup.detach()  # type: ignore[union-attr]
        fisher = None
        if s.needs_fisher:
            if s.calibration_samples is not None:
                loader, loss_fn, to_device = self._calibration_source(model)
                fisher, self.calibration_examples = calibrate_fisher(
                    loader, model, self.params, s.calibration_samples, loss_fn, to_device
                )
                fisher = distributed.reduce_mean_(host, fisher, skip=self.sharded)
            else:
                fisher = warmup.reduced_fisher(host)  # type: ignore[union-attr]
        if self.given_masks is None:
            masks, kept = self.select(fisher)
        else:  # mask_path: this rank's rows, on the parameters' devices
            given, self.given_masks = self.given_masks, None
            masks, kept = ckpt.local_copies(given, self.params, self.sharded), ckpt.counts(given)
        if self.init_state is not None:  # rewind_frozen
            rewind_frozen_(self.params, masks, self.init_state)
            self.init_state = None
        self.mask = FrozenMask.select(masks, kept, self.params, host.global_step)
        self.phase = Phase.FROZEN
        self.kept_fisher = {n: f.detach().cpu() for n, f in fisher.items()} if s.keep_fisher and fisher else None
        self.mask.log(host, self.params)
        log_anatomy(host, self.mask, self.params, fisher)
        warmup.fisher = None  # type: ignore[union-attr]
        self.enforce()

    def _calibration_source(self, model: nn.Module) -> tuple[Any, Callable[[Any], Tensor], Callable[[Any], Any]]:
        if self.calibration_source is None:
            raise RuntimeError("FISH: calibration_samples is set but nothing provides calibration data: in a plain "
                               "loop call masker.calibrate(loader, loss_fn) before training")  # fmt: skip
        return self.calibration_source(model, self.settings.loss_reduction)

    def select(self, fisher: dict[str, Tensor] | None) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Exactly k entries scored from ``fisher`` (already reduced across ranks), identical on every rank; with
        the kept count per tensor over all ranks."""
        s, host = self.settings, self.host
        scores = get_scorer(s.selection).score(fisher, self.params, s.seed)
        if self.sharded:
            masks = distributed.select_sharded(host, scores, self.params, self.sharded, s.sparsity, s.scope, s.kept)
        else:
            masks = select_masks(scores, s.sparsity, s.scope, k=s.kept)
        del scores
        masks = distributed.broadcast_masks(host, masks, [n for n in masks if n not in self.sharded])
        masks = {n: m.to(self.params[n].device) for n, m in masks.items()}
        return masks, distributed.kept_counts(host, masks, self.sharded)

    def enforce(self) -> None:
        """Enforce the mask on the host's optimizers; with compact ones, ``masks`` becomes a view of their indices
        (the bool masks are released). No optimizer yet (a plain loop restored before ``wrap``): nothing to guard;
        ``begin_training`` enforces once there is one."""
        if not self.host.optimizers:
            return
        masks = dict(self.mask.masks)  # type: ignore[union-attr]
        self.enforcer.install(self.host.optimizers, self.params, masks)
        self.mask.masks = self.enforcer.mask_view(self.params, masks)  # type: ignore[union-attr]

    def check_enforced(self) -> None:
        """Every step: the optimizers still hold what the enforcer installed (another callback may have rebuilt
        their param groups); if not, enforce again (dense) or refuse (compact state mid-training)."""
        if self.enforcer.installed and not self.enforcer.intact():
            info("FISH: the optimizer's param groups changed since the mask was installed; enforcing again")
            self.enforcer.repair(self.mask.masks)  # type: ignore[union-attr]

    def reselect(self) -> None:
        """Re-select k entries from the Fisher accumulated since the last selection."""
        mask, host = self.mask, self.host
        fisher = distributed.reduce_mean_(host, mask.refisher) if self.settings.needs_fisher else None  # type: ignore[union-attr,arg-type]
        new, kept = self.select(fisher)
        self.enforcer.reselect(host.optimizers, self.params, dict(mask.masks), new)  # type: ignore[union-attr]
        mask.replace(new, kept, self.params)  # type: ignore[union-attr]
        mask.masks = self.enforcer.mask_view(self.params, new)  # type: ignore[union-attr]
        mask.log(host, self.params)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ verify, end
    def verify(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Check, against hashes taken at the freeze, that no frozen entry moved.

        Returns ``{"frozen_unchanged": bool, "kept": int, "candidates": int, "moved": [names], "untrained":
        [names]}``: ``moved`` lists tensors whose frozen entries changed, ``untrained`` tensors with kept entries
        that no optimizer trains (while the mask is enforced)."""
        named = dict(model.named_parameters()) if model is not None else {}
        if self.mask is None and self.restored is not None and self.restored.get("candidates") and named:
            self.mask = ckpt.preview_mask(self.restored, {n: named[n].shape for n in self.restored["candidates"]})
        if self.mask is None:
            raise RuntimeError("FISH verify: no mask has been frozen yet")
        params = self.params if model is None else {n: named[n] for n in self.mask.masks}
        moved = self.mask.moved(params)
        untrained = self.enforcer.untrained(self.params, self.mask.masks) if self.params else []
        return {"frozen_unchanged": not moved, "kept": self.num_kept, "candidates": self.num_candidates,
                "moved": moved, "untrained": untrained}  # fmt: skip

    def end(self) -> None:
        """Release every hook (the end of a fit, or an exception)."""
        self.enforcer.remove()
        self.gate.remove()
        if self.warmup is not None:
            self.warmup.detach()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything FISH keeps (tensors and plain Python values: ``torch.load(weights_only=True)`` reads it).
        Under a sharded host every rank must call it (collectives)."""
        mask, warmup, host = self.mask, self.warmup, self.host
        return {
            **ckpt.settings_state(self.settings),
            "candidates": list(self.candidates) if self.candidates is not None else None,
            "shapes": {n: list(p.shape) for n, p in self.params.items()} or None,
            "fisher": warmup.checkpoint_fisher(host) if warmup is not None and mask is None else None,
            "warmup_done": self.warmup_steps_done,
            "fisher_examples": self.calibration_examples or int(self._pending("fisher_examples", 0)),
            "skipped_nonfinite": self.skipped_nonfinite_steps,
            "frozen_at_step": self.freeze_step,
            "fisher_estimator": self.estimator_in_use,
            "reselections": self.reselections,
            **ckpt.mask_state(host, mask, self.params, self.sharded),
            "init_state": ckpt.whole_copies(self.init_state, self.params, self.sharded),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint's state: checked against the settings now, applied to the candidates when the model is bound
        (at once for a plain-loop masker)."""
        ckpt.check_settings(state_dict, self.settings)
        self.restored = dict(state_dict)
        self.candidates = list(state_dict["candidates"]) if state_dict.get("candidates") is not None else None
        self.mask = ckpt.preview_mask(state_dict, state_dict.get("shapes"))  # masks, verify(model) outside a fit
        if self._loop is not None:
            self._loop.restore()
