"""``FishTrainerCallback``: FISH-Tuning in Hugging Face's ``transformers.Trainer`` (and trainers built on it).

A thin adapter over :class:`~fish_lightning.masker.masker.FishMasker`, which owns the lifecycle (warmup Fisher,
freeze, enforcement, checkpoint state). Where it hooks, relative to the Trainer's loop:

* a forward pre-hook on the model starts each micro-batch of the warmup (the per-example hooks learn the batch
  size and how the Trainer weighs each example in the loss it backpropagates);
* a hook at the end of each backward finishes the warmup's per-example squares, and after the freeze (at the last
  micro-batch of a step) zeroes the frozen entries' gradients: the Trainer's ``max_grad_norm`` clipping, which
  follows that backward, sees only kept entries;
* step hooks on the torch optimizer inside accelerate's ``AcceleratedOptimizer`` count warmup steps and write
  frozen entries back after each step (bit-identical with any torch optimizer, weight decay included);
* ``on_step_end`` (after the Trainer counted the step) freezes when due, ``on_save`` writes the FISH state into
  the checkpoint folder, and ``train(resume_from_checkpoint=folder)`` restores it from that folder.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fish_lightning.core.fisher import batch_size
from fish_lightning.core.masking import mask_gradients
from fish_lightning.integrations.trainer_host import (
    STATE_FILE,
    ItemsSeen,
    TrainerHost,
    check_trainer,
    find_trainer,
    load_checkpoint_state,
)
from fish_lightning.masker.backward_end import AtBackwardEnd
from fish_lightning.masker.checks import check_budget, load_given_masks
from fish_lightning.masker.masker import FishMasker
from fish_lightning.masker.settings import FishSettings
from fish_lightning.masker.view import MaskerView

IGNORE_INDEX = -100


class FishTrainerCallback(MaskerView, TrainerCallback):
    """Train only the top-Fisher fraction of a model's (PEFT) parameters in a ``transformers.Trainer``.

    Takes :class:`~fish_lightning.callback.FisherMaskCallback`'s settings (``sparsity``, ``warmup_steps``,
    ``mask_epoch``, ``include``/``exclude``, ``scope``, ``selection``, ``seed``, ``keep_fisher``,
    ``fisher_estimator``, ``rewind_frozen``, ``strict``, ``mask_path``, ...; documented there) as keywords, or a
    :class:`~fish_lightning.masker.settings.FishSettings` as ``settings=``. ``mask_epoch`` counts the Trainer's
    epochs; ``warmup_steps`` its optimizer steps (``global_step``).

    The warmup Fisher is the sum over the warmup's examples of each example's own loss gradient squared, whatever
    the Trainer did to the loss: the division by ``gradient_accumulation_steps`` or the normalisation by
    ``num_items_in_batch`` (token-level labels: one example is one sequence, its loss the mean NLL over its label
    tokens), accelerate's fp16 loss scale. Without ``labels`` among the model's inputs (a custom
    ``compute_loss``), the loss is taken to be the ``loss_reduction`` (mean or sum) of one loss per example.

    Refused at train start, with what to use instead: DeepSpeed, FSDP (``TrainingArguments.fsdp``),
    ``DataParallel`` over several GPUs, LOMO optimizers, ``label_smoothing_factor`` and ``compute_loss_func``,
    ``calibration_samples``, ``reselect_every_n_steps`` and ``sparse_optimizer_state``.

    After the freeze, ``masks`` maps parameter names to bool masks (True = trained); the lifecycle is
    ``self.masker``.
    """

    def __init__(self, settings: FishSettings | None = None, **kwargs: Any) -> None:
        self.masker = FishMasker(settings=settings, **kwargs)
        self.settings = self.masker.settings
        self._trainer: Trainer | None = None
        self._model: nn.Module | None = None
        self._handles: list[Any] = []
        self._end = AtBackwardEnd(self._backward_done)
        self._probing = False
        self._honors_num_items: bool | None = None  # decided from the first warmup batch that passes it
        self._seen: ItemsSeen | None = None
        self._pending: tuple | None = None  # (forward kwargs, batch size[, output]) until compute_loss returns

    # ------------------------------------------------------------------ public, read-only: MaskerView

    def state_dict(self) -> dict[str, Any]:
        return self.masker.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masker.load_state_dict(state_dict)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:  # fmt: skip
        self._remove_hooks()
        trainer, folder = find_trainer()
        if trainer is None or model is None:
            raise RuntimeError("FishTrainerCallback: train() must be called on a transformers.Trainer that holds "
                               "this callback (Trainer(..., callbacks=[FishTrainerCallback(...)]))")  # fmt: skip
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        check_trainer(self.settings, trainer, inner)
        m = self.masker
        if folder is not None:
            m.load_state_dict(load_checkpoint_state(folder))
        restored = m.restored
        self._trainer, self._model = trainer, model
        self._honors_num_items = None
        host = TrainerHost(trainer, inner)
        m.probe_runner = self._probe_forward
        m.bind(model, host)
        held = {id(p) for g in inner.param_groups for p in g["params"]}
        if not any(id(p) in held for p in m.params.values()):
            raise ValueError(f"FishTrainerCallback: the optimizer holds none of the {len(m.params)} FISH candidates "
                             f"(e.g. {next(iter(m.params), None)!r}): build it from model.parameters()")  # fmt: skip
        given = None
        if self.settings.mask_path is not None and m.mask is None and restored is None:
            given = load_given_masks(self.settings.mask_path, m.params)
        elif m.mask is None and (restored is None or restored.get("masks") is None) and self.settings.mask_path is None:
            check_budget(self.settings, m.params)
        m.start(set(), given, restored)
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
            inner.register_step_pre_hook(self._before_step),
        ]
        self._handles += self._end.attach(m.params.values())
        self._pending = None
        self._seen = ItemsSeen(trainer, self._after_loss)
        self._handles.append(self._seen)
        m.begin_training(model)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:  # fmt: skip
        if self._model is not None:
            self.masker.freeze_if_due(self._model)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._model is not None:
            self.masker.end_batch(self._model)  # global_step counts this step already: freeze_step is exact

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trainer is None:
            return
        fish = self.masker.state_dict()  # (every rank: collectives)
        fish["global_step"] = int(state.global_step)
        if not args.should_save:
            return
        run_dir = self._trainer._get_output_dir(trial=None) if hasattr(self._trainer, "_get_output_dir") \
            else args.output_dir  # fmt: skip
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"FISH: the checkpoint folder {folder!r} does not exist: the FISH state is not saved",
                          stacklevel=2)
            return
        torch.save(fish, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:  # fmt: skip
        m = self.masker
        self.close()
        if m.mask is None:
            msg = (f"FISH: training ended before the mask was frozen (warmup steps done: {m.warmup_steps_done}, "
                   f"mask_epoch={self.settings.mask_epoch}): every candidate trained densely")  # fmt: skip
            if self.settings.strict:
                raise RuntimeError(msg)
            warnings.warn(msg, stacklevel=2)
            return
        if m.mask.digests is not None:
            result = self.verify(model)
            if not result["frozen_unchanged"]:
                msg = f"FISH verify: frozen entries moved in {result['moved'][:4]}"
                if self.settings.strict:
                    raise RuntimeError(msg)
                warnings.warn(msg, stacklevel=2)

    # ------------------------------------------------------------------ hooks
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        m = self.masker
        if m.mask is not None or self._probing or not module.training or not torch.is_grad_enabled():
            return
        inputs = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
        batch = (args, inputs)
        try:
            n = batch_size(batch)
        except (TypeError, IndexError):
            m.freeze_if_due(module)
            return
        if self._honors_num_items is None and m.warmup is not None and m.warmup.hooks is not None:
            self._pending = (kwargs, n)  # decided after compute_loss (:meth:`_after_loss`)
        m.start_batch(module, batch, self.example_weights(kwargs, n))

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._pending is not None:
            self._pending = (*self._pending[:2], output)

    def _after_loss(self, loss: Any) -> None:
        """After ``compute_loss``, before the backward, once on the first warmup batch with ``num_items_in_batch``
        and token labels: whether the loss the Trainer backpropagates is normalised by ``num_items_in_batch`` (a
        model's ``loss_function``, or a Trainer subclass's own loss) or is the micro-batch's own mean over tokens (a
        model that ignores it), read from the loss and the forward's logits; a mean re-weights this batch."""
        pending, self._pending = self._pending, None
        if pending is None or len(pending) < 3 or self._honors_num_items is not None:
            return
        kwargs, n, output = pending
        labels, items = kwargs.get("labels"), self._num_items(kwargs)
        loss = loss[0] if isinstance(loss, tuple) else loss
        if items is None or not isinstance(labels, Tensor) or labels.dim() < 2 or not isinstance(loss, Tensor):
            return
        lab = self._scored_labels(labels)
        tokens, n_items = float((lab != IGNORE_INDEX).sum()), float(items)
        if tokens == 0 or math.isclose(tokens, n_items):
            return  # the two readings agree on this batch: decide on a later one
        logits = getattr(output, "logits", None)
        if not isinstance(logits, Tensor) or logits.shape[:-1] != labels.shape:
            self._honors_num_items = True  # nothing to compare (e.g. a fused head): the Trainer's own reading
            return
        with torch.no_grad():
            lg = logits[..., :-1, :] if lab.shape != labels.shape else logits
            nll = float(torch.nn.functional.cross_entropy(lg.float().flatten(0, -2), lab.flatten(), reduction="sum",
                                                          ignore_index=IGNORE_INDEX))  # fmt: skip
        value = float(loss.detach().float()) / self._token_multiplier(items)
        self._honors_num_items = abs(value - nll / n_items) <= abs(value - nll / tokens)
        if not self._honors_num_items:
            warnings.warn("FISH: the model's loss ignores num_items_in_batch (it is a mean over the micro-batch's "
                          "own tokens) while the Trainer does not divide it by gradient_accumulation_steps; the "
                          "per-example Fisher follows the loss as computed", stacklevel=2)  # fmt: skip
            m = self.masker
            if m.warmup is not None and m.warmup.hooks is not None:
                m.warmup.hooks.reweight(self.example_weights(kwargs, n))

    def _token_multiplier(self, items: Any) -> float:
        """The factor ``compute_loss`` applies when it averages tokens across devices (1 on one process)."""
        trainer = self._trainer
        accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
        custom = getattr(trainer, "compute_loss_func", None) is not None
        if trainer.args.average_tokens_across_devices and (accepts or custom) and items is not None:
            return float(trainer.accelerator.num_processes // max(1, trainer.get_tp_size()))
        return 1.0

    def _num_items(self, kwargs: Mapping[str, Any]) -> Any:
        """The step's ``num_items_in_batch``: passed to the model, or else handed to ``compute_loss`` (a Trainer
        subclass such as TRL's ``SFTTrainer`` may normalise its own loss by it without passing it on)."""
        items = kwargs.get("num_items_in_batch")
        return items if items is not None or self._seen is None else self._seen.items

    def _scored_labels(self, labels: Tensor) -> Tensor:
        """The labels the loss scores: shifted by one for a causal LM (position 0 is never a target)."""
        return labels[..., 1:] if getattr(self._trainer, "_loss_shifts_labels", False) else labels

    def example_weights(self, kwargs: Mapping[str, Any], n: int) -> Tensor:
        """Per example ``i``, the factor that turns the square of its gradient in the loss the Trainer
        backpropagates into the square of its own loss gradient: ``(1 / (c_i * loss_scale))**2`` with ``c_i =
        d(trainer loss) / d(loss_i)``. Examples without a scored label weigh 0."""
        trainer = self._trainer
        labels, items = kwargs.get("labels"), self._num_items(kwargs)
        accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
        custom = getattr(trainer, "compute_loss_func", None) is not None
        if isinstance(labels, Tensor) and labels.dim() >= 2 and labels.shape[0] == n:  # token labels
            per = (self._scored_labels(labels) != IGNORE_INDEX).flatten(1).sum(1).to(torch.float64)
            honored = items is not None and self._honors_num_items is not False
            denominator = float(items) if honored else float(per.sum())
        elif isinstance(labels, Tensor):  # one label per example: the model's mean over the batch
            per, denominator = torch.ones(n, dtype=torch.float64), float(n)
        else:  # a custom compute_loss: loss_reduction over the examples
            per = torch.ones(n, dtype=torch.float64)
            denominator = float(n) if self.settings.loss_reduction == "mean" else 1.0
        multiplier = self._token_multiplier(items)
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (accepts and items is not None) or custom
        division = 1.0 if scaled else float(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1)
        scale = float(self.masker.host.scaler.get_scale()) if self.masker.host.scaler is not None else 1.0
        c = per * multiplier / (denominator * division) * scale
        weights = torch.where(c > 0, 1.0 / c.clamp_min(1e-300), torch.zeros_like(c)) ** 2
        return weights.float()

    def _probe_forward(self, batch: tuple[tuple, dict]) -> Any:
        args, kwargs = batch
        self._probing = True
        try:
            return self._model(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._probing = False

    def _backward_done(self) -> None:
        m = self.masker
        if m.mask is not None:
            accelerator = getattr(self._trainer, "accelerator", None)
            if accelerator is None or accelerator.sync_gradients:  # the step's last micro-batch: before the
                mask_gradients(m.params, m.mask.masks)  # Trainer's max_grad_norm clipping reads the gradients
        else:
            m.after_backward(manual=False)

    def _before_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        scaler = self.masker.host.scaler
        inv = 1.0
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            inv = 1.0 / float(scaler.get_scale())
        self.masker.before_step(optimizer, automatic=True, inv_scale=inv)

    def close(self) -> None:
        """Release every hook (done at ``on_train_end``; call it after an exception inside ``train()``)."""
        self._remove_hooks()
        self.masker.end()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
