"""fish_lightning.app.freeze.TrainOnly: only the matching parameters stay trainable, before the optimizer exists."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fish_lightning.app.freeze import TrainOnly


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)


def test_keeps_only_matching_parameters():
    module = Tiny()
    TrainOnly(["classifier"]).setup(None, module, "fit")
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    assert isinstance(module.encoder.weight, torch.Tensor) and not module.encoder.weight.requires_grad


def test_bad_patterns_are_named():
    with pytest.raises(ValueError, match="at least one pattern"):
        TrainOnly([])
    with pytest.raises(ValueError, match="not a regular expression"):
        TrainOnly(["("])
    with pytest.raises(ValueError, match="'head' matches no trainable parameter"):
        TrainOnly("head").setup(None, Tiny(), "fit")
