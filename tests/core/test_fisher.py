"""Per-example Fisher: hooks == batch-size-1 loop (the oracle) for every covered layer kind."""

import pytest
import torch
import torch.nn.functional as F
from test_peft_e2e import TINY
from torch import nn

from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.core.fisher import (
    PerExampleSquaredGrads,
    per_example_fisher,
    per_example_fisher_hooks,
    slice_batch,
)


def _compare(model, loss_fn, batch, params, tol=1e-5):
    loop, n1 = per_example_fisher(loss_fn, batch, params)
    fast, n2 = per_example_fisher_hooks(loss_fn, batch, model, params)
    assert n1 == n2
    # relative to each tensor's scale, floored at 1e-6 of the largest score: tensors whose exact gradient
    # is 0 (e.g. attention key biases: softmax is shift-invariant) carry only float noise on both sides
    floor = 1e-6 * max(float(f.max()) for f in loop.values())
    for name in params:
        err = float((fast[name] - loop[name]).abs().max()) / max(float(loop[name].abs().max()), floor)
        assert err < tol, (name, err)
    return fast


def test_mlp_linear_layernorm_embedding_and_tied_weights():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.ln = nn.LayerNorm(6)
            self.lin = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, ids):
            h = self.ln(self.emb(ids))
            h = torch.tanh(self.lin(torch.tanh(self.lin(h))))  # `lin` used twice: tied weights
            return self.head(h.mean(1))

    net = Net()
    ids = torch.randint(0, 20, (5, 7))
    ids[0, :3] = 4  # repeated token within one example
    y = torch.tensor([0, 1, 2, 1, 0])
    loss_fn = lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none")  # noqa: E731
    params = dict(net.named_parameters())
    hooks = PerExampleSquaredGrads(net, params)
    assert hooks.uncovered == []
    _compare(net, loss_fn, (ids, y), params)


@pytest.mark.parametrize("method", ["lora", "dora", "none"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_peft_bert_hooks_match_loop(method, dropout):
    torch.manual_seed(0)
    model = build_sequence_classifier(num_labels=2, tiny_config=TINY)
    kw = {} if method == "none" else dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=dropout)
    model = apply_peft(model, method, **kw).eval()  # eval: dropout off, as in FISH calibration
    with torch.no_grad():  # B != 0 so A gets gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(1, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}

    def loss_fn(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits, b["labels"], reduction="none")

    params = {n: p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n}
    hooks = PerExampleSquaredGrads(model, params)
    assert hooks.uncovered == [], hooks.uncovered  # every BERT/LoRA/DoRA tensor has a rule
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in hooks.covered)
    _compare(model, loss_fn, batch, params)
    hooks.attach().start_batch(4)
    torch.autograd.grad(loss_fn(batch).sum(), list(params.values()))
    hooks.detach()
    # BERT's position ids are one [1, T] row shared by the batch: exact all the same (expanded output)
    assert hooks.missed == set() and hooks.fallback_modules == []


def test_a_module_without_a_rule_gets_the_general_rule():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x * self.s)

    net = Scale()
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    loss_fn = lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none")  # noqa: E731
    params = dict(net.named_parameters())
    hooks = PerExampleSquaredGrads(net, params)
    assert hooks.uncovered == [] and hooks.fallback_modules == ["Scale"]  # the root module: torch.func rule
    _compare(net, loss_fn, (x, y), params)


def test_slice_batch_structures():
    b = {"a": torch.arange(4), "b": [torch.arange(8).view(4, 2), "keep"]}
    s = slice_batch(b, 1, 3)
    assert s["a"].tolist() == [1, 2] and s["b"][0].tolist() == [[2, 3], [4, 5]] and s["b"][1] == "keep"


def test_tied_weights_across_modules_mha_and_padding_idx_are_exact():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4, padding_idx=0)
            self.mha = nn.MultiheadAttention(4, 1, batch_first=True)  # uses out_proj.weight without out_proj()
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.emb.weight  # one parameter, two modules

        def forward(self, ids):
            h = self.emb(ids)
            h = self.mha(h, h, h, need_weights=False)[0] + h
            return self.head(h.mean(1))

    net = Tied()
    ids = torch.randint(0, 11, (5, 6))
    ids[:, -2:] = 0  # padding
    y = torch.randint(0, 11, (5,))
    loss_fn = lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none")  # noqa: E731
    params = dict(net.named_parameters())
    fast = _compare(net, loss_fn, (ids, y), params)
    assert float(fast["mha.out_proj.weight"].abs().max()) > 0  # recovered by the loop, not a silent 0
