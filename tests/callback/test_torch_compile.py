"""The per-example warmup Fisher under torch.compile equals the batch-size-1 loop (weights held by lr 0)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import TinyClassifier, make_loader, make_trainer
from fish_lightning import FisherMaskCallback
from fish_lightning.core.fisher import per_example_fisher


class Compiled(TinyClassifier):
    def __init__(self, backend: str):
        super().__init__()
        self.net = torch.compile(self.net, backend=backend, dynamic=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def fisher_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.net._orig_mod(x), y, reduction="none")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_per_example_fisher_under_torch_compile(backend, one_thread):
    model = Compiled(backend)
    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=4, mask_epoch=1, keep_fisher=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "FISH: per-example Fisher is not exact")
        make_trainer([cb], max_epochs=2).fit(model, make_loader())
    assert cb.estimator_in_use == "per_example"
    params = dict(model.named_parameters())
    ref = None
    for i, batch in enumerate(make_loader()):
        if i == 4:
            break
        ref, _ = per_example_fisher(model.fisher_loss, batch, params, ref)
    for n in ref:
        err = (cb.fisher[n] - ref[n]).abs().max() / ref[n].abs().max()
        assert err < 1e-5, (n, float(err))
