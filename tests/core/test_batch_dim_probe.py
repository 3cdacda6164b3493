"""The per-example rules take dim 0 of a module's output as the examples only where a probe confirmed it:
sequence-first activations ``[T, B, d]`` with ``T == B`` are not mistaken for batch-first ones."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_trainer
from fish_lightning import FisherMaskCallback
from fish_lightning.core.fisher import per_example_fisher, per_example_fisher_hooks, probe_batch_dim

B = T = 4


class SeqModel(pl.LightningModule):
    """Token features ``[B, T, 6]`` -> (``seq_first``: ``[T, B, 6]``) -> Linear -> tanh -> Linear -> mean over T."""

    def __init__(self, seq_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.seq_first = seq_first
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = x.transpose(0, 1) if self.seq_first else x
        out = self.b(torch.tanh(self.a(h)))
        return out.mean(0 if self.seq_first else 1)

    def fisher_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        return self.fisher_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, T, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("seq_first", [True, False])
def test_probe_flags_sequence_first_outputs_only(seq_first):
    model = SeqModel(seq_first)
    params = dict(model.named_parameters())
    x, y = data(B)
    flagged = probe_batch_dim(model.fisher_loss, (x, y), model, params)
    assert sorted(flagged) == (sorted(params) if seq_first else [])
    if seq_first:
        assert flagged["a.weight"] == ["a", "[4, 4, 5]", "[4, 3, 5]"]


@pytest.mark.parametrize("seq_first", [True, False])
def test_exact_fisher_with_t_equal_b_matches_the_loop(seq_first):
    model = SeqModel(seq_first)
    params = dict(model.named_parameters())
    batch = data(B)
    loop = set(probe_batch_dim(model.fisher_loss, batch, model, params))
    fast, _ = per_example_fisher_hooks(model.fisher_loss, batch, model, params, loop=loop)
    ref, _ = per_example_fisher(model.fisher_loss, batch, params)
    for n in params:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-5, atol=1e-8)


def test_warmup_on_a_sequence_first_model_falls_back_with_a_warning(one_thread):
    model = SeqModel(seq_first=True)
    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=2, mask_epoch=None)
    with pytest.warns(UserWarning, match=r"the examples are not dim 0 of 'a'.*\[4, 4, 5\] for 4 examples"):
        make_trainer([cb], max_epochs=1).fit(model, DataLoader(TensorDataset(*data()), batch_size=B))
    assert cb.estimator_in_use == "batch_grad"


def test_calibration_on_a_sequence_first_model_is_exact(one_thread):
    model = SeqModel(seq_first=True)
    x, y = data(8)
    ref, _ = per_example_fisher(model.fisher_loss, (x, y), dict(model.named_parameters()))
    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=0, mask_epoch=None, calibration_samples=8, keep_fisher=True)
    with pytest.warns(UserWarning, match=r"do not carry the examples on dim 0"):
        make_trainer([cb], max_epochs=1).fit(model, DataLoader(TensorDataset(x, y), batch_size=B))
    for n, f in ref.items():
        torch.testing.assert_close(cb.fisher[n], f, rtol=1e-5, atol=1e-8)
