"""A LightningModule for (peft-wrapped) Hugging Face causal LMs trained on instruction/response text.

The loss is on response tokens only (``labels == -100`` marks prompt and padding positions, aligned
with ``input_ids``; position ``t`` predicts ``labels[t + 1]``). One example = one sequence: its loss
is the **mean** NLL over its response tokens, and the training loss is the batch mean of those, so
per-example gradients, and hence FISH's per-example Fisher, are those of each sequence's loss.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from fish_lightning.app.classifier import adamw_linear_warmup
from fish_lightning.app.lean_checkpoint import LeanCheckpointMixin, model_from_run_config

IGNORE_INDEX = -100


def response_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token NLL over the labelled (response) positions, per sequence.

    Args:
        logits: ``[B, T, V]`` (any float dtype; the NLL is computed in fp32).
        labels: ``[B, T]`` token ids aligned with the inputs, ``-100`` where not scored.

    Returns:
        ``(nll_sum [B] fp32, n_tokens [B] int64, all_correct [B] bool)``: summed NLL (nats) and
        number of scored tokens per sequence, and whether the argmax prediction is right at every
        scored position (teacher-forced; equivalent to greedy decoding reproducing the response).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: expected [B, T, V] and [B, T]"
        )
    logits, target = logits[:, :-1], labels[:, 1:]
    scored = target != IGNORE_INDEX
    rows = scored.nonzero(as_tuple=True)[0]
    picked = logits[scored]  # [N, V]: only scored positions go through the fp32 log-softmax
    nll = F.cross_entropy(picked.float(), target[scored], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, nll)
    wrong = (picked.argmax(-1) != target[scored]).long()
    n_wrong = torch.zeros(labels.shape[0], dtype=torch.long, device=logits.device).index_add(0, rows, wrong)
    counts = scored.sum(1)
    return sums, counts, (n_wrong == 0) & (counts > 0)


def scored_predictions(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(preds [1, N, V] fp32, target [1, N])`` of the N scored (response) positions, next-token aligned: the input
    of ``torchmetrics.text.Perplexity`` without the unscored positions' vocabulary-wide rows."""
    target = labels[:, 1:]
    scored = target != IGNORE_INDEX
    return logits[:, :-1][scored].float().unsqueeze(0), target[scored].unsqueeze(0)


class CausalLM(LeanCheckpointMixin, pl.LightningModule):
    """Trains a causal LM on batches of ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` =
    not scored), as built by :class:`fish_lightning.app.instruction_data.InstructionData`.

    Validation logs ``val/loss`` (mean over sequences of their mean response-token NLL, the training
    objective), ``val/perplexity`` (exp of the mean NLL over all response tokens; ``torchmetrics.text.Perplexity``) and
    ``val/exact_match`` (fraction of sequences whose every response token is the argmax prediction).

    Checkpoints hold the trainable tensors only (:class:`~fish_lightning.app.lean_checkpoint.LeanCheckpointMixin`).

    Args:
        model: a Hugging Face (peft-wrapped) ``AutoModelForCausalLM``; ``None``: built from ``run_config``.
        lr, weight_decay: AdamW settings; ``warmup_ratio`` of steps with linear LR warmup, then
            linear decay to 0 (``warmup_ratio=None``: constant LR).
        head_lr: a trained ``score``/``classifier`` head's own rate (``None``: ``lr``).
        run_config: the resolved ``fish-train`` config, saved as hyperparameters (as
            :class:`~fish_lightning.app.classifier.SequenceClassifier`).
    """

    metrics = ("loss", "perplexity", "exact_match")

    def __init__(
        self,
        model: nn.Module | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float | None = 0.06,
        run_config: dict[str, Any] | None = None,
        head_lr: float | None = None,
    ) -> None:
        super().__init__()
        if model is None:
            if run_config is None:
                raise ValueError("CausalLM needs a model, or run_config to build it from")
            model = model_from_run_config(run_config)
        if run_config is not None:
            self.save_hyperparameters(ignore=["model"])
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as found
        self.lr, self.weight_decay, self.warmup_ratio, self.head_lr = lr, weight_decay, warmup_ratio, head_lr
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.val_exact_match = torchmetrics.MeanMetric()

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits ``[B, T, V]``."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits

    def per_example_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Each sequence's mean NLL over its response tokens, shape ``[B]`` (0 for a sequence without any)."""
        sums, counts, _ = response_nll(self(batch), batch["labels"])
        return sums / counts.clamp(min=1)

    def fisher_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-example (per-sequence) loss ``[B]``, used by FISH calibration."""
        return self.per_example_loss(batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.per_example_loss(batch).mean()  # a batch mean: what the per-example Fisher hooks assume
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch)
        sums, counts, correct = response_nll(logits, batch["labels"])
        b = batch["input_ids"].shape[0]
        self.log("val/loss", (sums / counts.clamp(min=1)).mean(), prog_bar=True, batch_size=b)
        if int(counts.sum()) > 0:
            self.val_perplexity.update(*scored_predictions(logits, batch["labels"]))
        self.val_exact_match.update(correct.float())
        self.log("val/perplexity", self.val_perplexity, batch_size=b)
        self.log("val/exact_match", self.val_exact_match, prog_bar=True, batch_size=b)

    def configure_optimizers(self) -> Any:
        return adamw_linear_warmup(self, self.lr, self.weight_decay, self.warmup_ratio, self.head_lr)
