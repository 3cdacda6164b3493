"""Sentence pooling for BERT-style sequence classifiers (no Lightning import).

Hugging Face's ``BertForSequenceClassification`` classifies ``pooler(hidden[:, 0])``: a dense + tanh layer on
the first token. Sentence-transformers checkpoints (e.g. all-MiniLM-L6-v2) were trained for the mean of the
token states instead and never trained that pooler (MiniLM's ``pooler.dense.weight`` has std 0.009), so a
classifier on it sees a near-degenerate projection of an untrained token unless the pooler is trained too.
:func:`use_mean_pooling` swaps the pooler for the attention-masked token mean the checkpoint was trained for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

POOLINGS = ("cls", "mean")


class MeanPooler(nn.Module):
    """Mean of the token states over the non-padding positions: ``[B, T, H] -> [B, H]`` (no parameters).

    The attention mask ``[B, T]`` of the current forward is set by a pre-hook on the encoder
    (:func:`use_mean_pooling`); without one every position counts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        mask = self.attention_mask
        if mask is None:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Replace the encoder's pooler of ``model`` (a ``*ForSequenceClassification`` whose head reads
    ``encoder.pooler``, e.g. BERT's) by a :class:`MeanPooler`; returns ``model``. The pooler's dense weights
    are dropped, so the head sees the checkpoint's own sentence embedding."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ValueError(
            f"pooling='mean' needs a classifier whose head reads the encoder's pooler (BERT-style); "
            f"{type(model).__name__} has none: use pooling='cls'"
        )
    pooler = MeanPooler()
    encoder.pooler = pooler

    def keep_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.attention_mask = mask if isinstance(mask, torch.Tensor) else None

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)
    return model
