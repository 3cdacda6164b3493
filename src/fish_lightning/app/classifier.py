"""A LightningModule for (peft-wrapped) Hugging Face sequence classifiers and regressors."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from fish_lightning.app.lean_checkpoint import LeanCheckpointMixin, model_from_run_config

_METRICS = {
    "accuracy": lambda n: torchmetrics.Accuracy(task="multiclass", num_classes=n),
    "f1": lambda n: (
        torchmetrics.F1Score(task="binary")
        if n == 2
        else torchmetrics.F1Score(task="multiclass", num_classes=n, average="macro")
    ),
    "matthews": lambda n: torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=n),
    "pearson": lambda n: torchmetrics.PearsonCorrCoef(),
    "spearman": lambda n: torchmetrics.SpearmanCorrCoef(),
}
METRICS = tuple(_METRICS)


class SequenceClassifier(LeanCheckpointMixin, pl.LightningModule):
    """Trains ``model`` (returns ``.logits``) on batches of tokenised inputs plus ``labels``.

    Checkpoints hold the trainable tensors only (:class:`~fish_lightning.app.lean_checkpoint.LeanCheckpointMixin`).

    Args:
        model: a Hugging Face (peft-wrapped) sequence classification model; ``None``: built from ``run_config``.
        num_labels: classes; ``1`` means regression (MSE loss, Pearson/Spearman metrics); ``None``: the model's.
        metrics: names from :data:`METRICS`, logged on the validation split as ``val/<name>``.
        lr, weight_decay: AdamW settings; ``warmup_ratio`` of steps with linear LR warmup,
            then linear decay to 0 (``warmup_ratio=None``: constant LR).
        head_lr: the classification head's own rate (``None``: ``lr``); the adapter or encoder keeps ``lr``.
        run_config: the resolved ``fish-train`` config: saved as the module's hyperparameters (what loggers record
            and ``load_from_checkpoint`` rebuilds the model from, :func:`~fish_lightning.app.lean_checkpoint.
            model_from_run_config`).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        num_labels: int | None = None,
        metrics: tuple[str, ...] | list[str] = ("accuracy",),
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float | None = 0.06,
        run_config: dict[str, Any] | None = None,
        head_lr: float | None = None,
    ) -> None:
        super().__init__()
        check_rate("optim.lr", lr)
        if head_lr is not None:
            check_rate("optim.head_lr", head_lr)
        unknown = [m for m in metrics if m not in _METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}: expected some of {METRICS}")
        if model is None:
            if run_config is None:
                raise ValueError("SequenceClassifier needs a model, or run_config to build it from")
            model = model_from_run_config(run_config)
        if run_config is not None:
            self.save_hyperparameters(ignore=["model"])
        if num_labels is None:
            num_labels = int(model.config.num_labels)
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as found
        self.num_labels = num_labels
        self.lr, self.weight_decay, self.warmup_ratio, self.head_lr = lr, weight_decay, warmup_ratio, head_lr
        self.val_metrics = nn.ModuleDict({m: _METRICS[m](num_labels) for m in metrics})

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = self.model(**inputs).logits
        return logits.squeeze(-1) if self.num_labels == 1 else logits

    def per_example_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.num_labels == 1:
            return F.mse_loss(logits.float(), labels.float(), reduction="none")
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def fisher_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-example negative log-likelihood, shape ``[batch]`` (used by FISH calibration)."""
        return self.per_example_loss(self(batch), batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.per_example_loss(self(batch), batch["labels"]).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch)
        labels = batch["labels"]
        self.log("val/loss", self.per_example_loss(logits, labels).mean(), batch_size=labels.shape[0])
        preds = logits.float() if self.num_labels == 1 else logits.argmax(-1)
        for name, metric in self.val_metrics.items():
            metric.update(preds, labels.float() if self.num_labels == 1 else labels)
            self.log(f"val/{name}", metric, prog_bar=True, batch_size=labels.shape[0])

    def configure_optimizers(self) -> Any:
        return adamw_linear_warmup(self, self.lr, self.weight_decay, self.warmup_ratio, self.head_lr)


#: module names of the task heads the classifiers train densely (BERT/MiniLM ``classifier``, GPT-2/LLaMA ``score``)
HEAD_NAMES = ("classifier", "score")


def adamw_linear_warmup(
    module: pl.LightningModule,
    lr: float,
    weight_decay: float,
    warmup_ratio: float | None,
    head_lr: float | None = None,
    head: tuple[str, ...] = HEAD_NAMES,
) -> Any:
    """AdamW over ``module``'s trainable parameters; with ``warmup_ratio``, a per-step schedule
    (``transformers.get_linear_schedule_with_warmup``): linear warmup from 0 over that fraction of the run's optimizer
    steps, then linear decay to 0 (``None``: constant LR).

    ``head_lr``: the task head's own rate (parameters under a module named in ``head``, e.g. peft's
    ``classifier.modules_to_save``) in a second param group, on the same schedule; ``None``: ``lr`` for all.
    """
    from transformers import get_linear_schedule_with_warmup

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if head_lr is None:
        groups: list[dict[str, Any]] = [{"params": [p for _, p in named]}]
    else:
        check_rate("optim.head_lr", head_lr)
        in_head = [any(part in head for part in n.split(".")) for n, _ in named]
        if not any(in_head):
            raise ValueError(f"optim.head_lr={head_lr!r} is set, but no trainable parameter is under a module named "
                             f"{' or '.join(head)}: unset it (null) or train the head")  # fmt: skip
        groups = [{"params": [p for (_, p), h in zip(named, in_head) if not h]},
                  {"params": [p for (_, p), h in zip(named, in_head) if h], "lr": head_lr}]  # fmt: skip
        groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if warmup_ratio is None:
        return opt
    total = max(1, int(module.trainer.estimated_stepping_batches))
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=int(warmup_ratio * total), num_training_steps=total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def check_rate(name: str, value: Any) -> None:
    """One line naming ``name`` unless ``value`` is a positive number (booleans and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} is not valid: expected a positive number (a learning rate)")
