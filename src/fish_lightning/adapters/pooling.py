"""Sentence pooling for BERT-style sequence classifiers (no Lightning import).

Hugging Face's ``BertForSequenceClassification`` classifies ``pooler(hidden[:, 0])``: a dense + tanh layer on
the first token. Sentence-transformers checkpoints (e.g. all-MiniLM-L6-v2) were trained for the mean of the
token states instead and never trained that pooler (MiniLM's ``pooler.dense.weight`` has std 0.009), so a
classifier on it sees a near-degenerate projection of an untrained token unless the pooler is trained too.
:func:`use_mean_pooling` swaps the pooler for the attention-masked token mean the checkpoint was trained for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

POOLINGS = ("auto", "cls", "mean")


def checkpoint_pooling(path: str) -> str:
    """``"mean"`` when ``path`` is a local sentence-transformers checkpoint that pools by the token mean
    (``modules.json`` naming a ``Pooling`` module whose ``config.json`` has ``pooling_mode_mean_tokens``),
    else ``"cls"`` (also for hub ids, which are not looked up)."""
    root = Path(path)
    try:
        modules = json.loads((root / "modules.json").read_text())
        folder = next(m["path"] for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config = json.loads((root / folder / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return "cls"
    return "mean" if config.get("pooling_mode_mean_tokens") else "cls"


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


def has_pooler(model: nn.Module) -> bool:
    """Whether ``model``'s classification head reads its encoder's pooler (BERT-style)."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return encoder is not None and getattr(encoder, "pooler", None) is not None


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Replace the encoder's pooler of ``model`` (a ``*ForSequenceClassification`` whose head reads
    ``encoder.pooler``, e.g. BERT's) by a :class:`MeanPooler`; returns ``model``. The pooler's dense weights
    are dropped, so the head sees the checkpoint's own sentence embedding."""
    if not has_pooler(model):
        raise ValueError(
            f"pooling='mean' needs a classifier whose head reads the encoder's pooler (BERT-style); "
            f"{type(model).__name__} has none: use pooling='cls'"
        )
    encoder = getattr(model, model.base_model_prefix)
    pooler = MeanPooler()
    encoder.pooler = pooler

    def keep_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.attention_mask = mask if isinstance(mask, torch.Tensor) else None

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)
    return model
