"""optim.head_lr: the task head trains at its own rate in a second AdamW param group, on the same schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fish_lightning.app.classifier import SequenceClassifier, adamw_linear_warmup


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class Net(nn.Module):
    """An encoder plus a ``classifier`` head, as peft wraps them (the head under ``modules_to_save``)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {"num_labels": 2})()
        self.encoder = nn.Linear(4, 4)
        self.classifier = nn.ModuleDict({"modules_to_save": nn.Linear(4, 2)})

    def forward(self, input_ids: torch.Tensor) -> _Out:
        return _Out(self.classifier["modules_to_save"](self.encoder(input_ids)))


def test_the_head_gets_its_own_rate_and_the_rest_keeps_lr():
    module = SequenceClassifier(Net(), lr=1e-3, head_lr=0.1, warmup_ratio=None)
    opt = module.configure_optimizers()
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    head = {id(p) for p in module.model.classifier.parameters()}
    encoder = {id(p) for p in module.model.encoder.parameters()}
    assert by_lr == {1e-3: encoder, 0.1: head}


def test_without_head_lr_one_group_holds_every_trainable_parameter():
    module = SequenceClassifier(Net(), lr=1e-3, warmup_ratio=None)
    module.model.encoder.weight.requires_grad_(False)
    (group,) = module.configure_optimizers().param_groups
    assert group["lr"] == 1e-3
    assert {id(p) for p in group["params"]} == {id(p) for p in module.parameters() if p.requires_grad}


def test_a_head_only_run_has_one_group_at_head_lr():
    module = SequenceClassifier(Net(), lr=1e-3, head_lr=0.1, warmup_ratio=None)
    module.model.encoder.requires_grad_(False)
    (group,) = module.configure_optimizers().param_groups
    assert group["lr"] == 0.1


@pytest.mark.parametrize("bad", ["0.1", True, 0.0, -1e-3])
def test_bad_rates_are_named(bad):
    with pytest.raises(ValueError, match=r"optim\.head_lr=.* expected a positive number"):
        SequenceClassifier(Net(), head_lr=bad)
    with pytest.raises(ValueError, match=r"optim\.lr=.* expected a positive number"):
        SequenceClassifier(Net(), lr=bad)


def test_head_lr_without_a_trained_head_is_refused():
    module = SequenceClassifier(Net(), head_lr=0.1, warmup_ratio=None)
    module.model.classifier.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter is under a module named classifier or score"):
        adamw_linear_warmup(module, 1e-3, 0.0, None, head_lr=0.1)
