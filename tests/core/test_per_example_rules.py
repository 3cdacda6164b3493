"""Per-module rules of the per-example Fisher (fish_lightning.core.per_example): every peft method of
conf/peft/, full fine-tuning of tiny BERT and LLaMA, LoRA under HF gradient checkpointing (both reentrant
modes), and the general torch.func rule, each against the batch-size-1 loop (relative error < 1e-4)."""

import logging

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_causal_lm import CONFIGS, lm_batch
from test_peft_e2e import TINY
from test_peft_methods import CONF, EXPECTED
from torch import nn

from fish_lightning.adapters.decoders import apply_decoder_peft, build_causal_lm
from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.core.fisher import PerExampleSquaredGrads, per_example_fisher, per_example_fisher_hooks
from fish_lightning.core.per_example import Rule, register_rule

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


def rel_errs(got, ref):
    # per tensor, floored at 1e-6 of the largest score (tensors whose exact gradient is 0 carry float noise)
    floor = 1e-6 * max(float(f.abs().max()) for f in ref.values())
    return {n: float((got[n] - ref[n]).abs().max()) / max(float(ref[n].abs().max()), floor) for n in ref}


def randomize_zeros(model, seed=1):
    """Zero-initialised factors (LoRA B, hada_w2_b, lokr_w1, vera_lambda_b, adapter up) make the others'
    gradients exactly 0: give every trainable tensor nonzero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not bool(p.ne(0).any()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def run_hooks(model, loss_fn, batch, params, use_backward=False):
    """One forward + backward through the engine (as the callback's warmup does); returns the engine."""
    hooks = PerExampleSquaredGrads(model, params).attach()
    n = batch["input_ids"].shape[0]
    hooks.start_batch(n)
    loss = loss_fn(batch).sum()
    if use_backward:  # reentrant checkpointing does not support autograd.grad
        loss.backward()
        grads = {k: p.grad for k, p in params.items()}
    else:
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    hooks.buffered = dict(hooks._pending)  # multi-call buffers at the end of the backward
    hooks.finish_batch()
    hooks.detach()
    hooks.missed.update(hooks.unseen(grads))
    return hooks


def bert_batch(b=4, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0][:b])}


def bert_loss(model):
    def loss_fn(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits, b["labels"], reduction="none")

    return loss_fn


def peft_config(method):
    cfg = yaml.safe_load((CONF / f"{method}.yaml").read_text())
    cfg.pop("_target_"), cfg.pop("_partial_")
    return cfg


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_every_peft_method_is_exact_from_its_rules(method):
    torch.manual_seed(0)
    model = apply_peft(build_sequence_classifier(num_labels=2, tiny_config=TINY), **peft_config(method)).eval()
    randomize_zeros(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # head included
    batch, loss_fn = bert_batch(), bert_loss(model)
    ref, _ = per_example_fisher(loss_fn, batch, params)
    hooks = run_hooks(model, loss_fn, batch, params)
    assert hooks.uncovered == [] and hooks.missed == set() and hooks.failures == {}
    assert hooks.fallback_modules == []  # a dedicated rule for every layer type of every method
    assert hooks.buffered == {}  # one call per module: squared in place
    errs = rel_errs(hooks.sums, ref)
    assert max(errs.values()) < TOL, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    got, _ = per_example_fisher_hooks(loss_fn, batch, model, params)  # calibration's path
    assert max(rel_errs(got, ref).values()) < TOL


def test_ia3_covers_both_placements():
    model = apply_peft(build_sequence_classifier(num_labels=2, tiny_config=TINY), **peft_config("ia3"))
    kinds = {m.is_feedforward for m in model.modules() if hasattr(m, "ia3_l") and hasattr(m, "is_feedforward")}
    assert kinds == {True, False}  # output scaling (key, value) and input scaling (output.dense)


def test_dora_identity_probe_is_not_a_call_when_batch_equals_width():
    """peft's DoRA runs lora_B(lora_A(eye(in))) and detaches it: with batch == in (32 here) that probe
    looks batched; it must not count as a second call (which would buffer [B, *shape] per tensor)."""
    torch.manual_seed(0)
    model = apply_peft(build_sequence_classifier(num_labels=2, tiny_config=TINY), **peft_config("dora")).eval()
    randomize_zeros(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (TINY["hidden_size"], 5), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (ids.shape[0],), generator=g),
    }
    loss_fn = bert_loss(model)
    ref, _ = per_example_fisher(loss_fn, batch, params)
    hooks = run_hooks(model, loss_fn, batch, params)
    assert hooks.buffered == {} and hooks.missed == set()
    assert max(rel_errs(hooks.sums, ref).values()) < TOL


def test_lokr_with_low_rank_factors():
    """Both Kronecker factors low-rank (``lokr_w1_a/_b``, ``lokr_w2_a/_b``): the chain rule through them."""
    torch.manual_seed(0)
    wide = {**TINY, "hidden_size": 128, "intermediate_size": 128}
    model = apply_peft(build_sequence_classifier(num_labels=2, tiny_config=wide), method="lokr", r=2, alpha=4,
                       decompose_both=True, target_modules=["query", "value"]).eval()  # fmt: skip
    randomize_zeros(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[-2] for n in params if "lokr" in n} == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    batch, loss_fn = bert_batch(), bert_loss(model)
    ref, _ = per_example_fisher(loss_fn, batch, params)
    hooks = run_hooks(model, loss_fn, batch, params)
    assert hooks.fallback_modules == [] and hooks.missed == set() and hooks.buffered == {}
    assert max(rel_errs(hooks.sums, ref).values()) < TOL


def llama(lora=False, **cfg):
    model = build_causal_lm(tiny_config={**CONFIGS["llama"], **cfg})
    if lora:
        model = apply_decoder_peft(model, r=4, lora_alpha=8)
        randomize_zeros(model)
    return model


def lm_loss(model):
    from fish_lightning.app.causal_lm import response_nll

    def loss_fn(b):
        sums, counts, _ = response_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                       b["labels"])  # fmt: skip
        return sums / counts.clamp(min=1)

    return loss_fn


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_finetuning_of_tiny_decoders_is_exact(arch, caplog):
    """LLaMA: RMSNorm by the general rule; GPT-2: Conv1D by the general rule and the batch-shared
    position embedding (``wpe``) by the embedding rule; tied input/output embeddings on both."""
    model = build_causal_lm(tiny_config={**CONFIGS[arch], "tie_word_embeddings": True}).eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch, loss_fn = lm_batch(), lm_loss(model)
    ref, _ = per_example_fisher(loss_fn, batch, params)
    with caplog.at_level(logging.INFO, logger="fish_lightning.per_example"):
        hooks = run_hooks(model, loss_fn, batch, params)
    assert hooks.uncovered == [] and hooks.missed == set() and hooks.failures == {}
    if arch == "llama":
        expected = {n.rsplit(".", 1)[0] for n in params if "norm" in n}  # LlamaRMSNorm
    else:
        expected = {n.rsplit(".", 1)[0] for n in params if ".h." in n and ".ln_" not in n}  # Conv1D
    assert set(hooks.fallback_modules) == expected and "general torch.func rule" in caplog.text
    errs = rel_errs(hooks.sums, ref)
    assert max(errs.values()) < TOL, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_lora_with_gradient_checkpointing_squares_in_place(arch, reentrant):
    torch.manual_seed(0)
    if arch == "bert":
        model = apply_peft(build_sequence_classifier(num_labels=2, tiny_config=TINY), **peft_config("lora"))
        randomize_zeros(model)
        batch, loss_fn = bert_batch(), bert_loss(model)
    else:
        model = llama(lora=True)
        batch, loss_fn = lm_batch(), lm_loss(model)
    model.train()  # HF checkpoints only in training mode (dropout is 0 in these configs)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref, _ = per_example_fisher(loss_fn, batch, params)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    recomputed = []
    first = next(m for n, m in model.named_modules() if (".layer.0." in n or ".layers.0." in n) and "lora_A" in n
                 and isinstance(m, nn.Linear))  # fmt: skip
    handle = first.register_forward_hook(lambda *a: recomputed.append(torch._C._current_graph_task_id() != -1))
    hooks = run_hooks(model, loss_fn, batch, params, use_backward=True)
    handle.remove()
    assert True in recomputed  # the layer's forward really ran again in the backward
    assert hooks.uncovered == [] and hooks.missed == set() and hooks.failures == {}
    assert hooks.buffered == {}  # recognised as one logical call: no [B, *shape] buffers
    errs = rel_errs(hooks.sums, ref)
    assert max(errs.values()) < TOL, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("reentrant", [False, True])
def test_full_finetuning_with_gradient_checkpointing_general_rule_inside_checkpointed_layers(reentrant):
    model = llama().train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch, loss_fn = lm_batch(), lm_loss(model)
    ref, _ = per_example_fisher(loss_fn, batch, params)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    hooks = run_hooks(model, loss_fn, batch, params, use_backward=True)
    assert hooks.fallback_modules and hooks.missed == set() and hooks.failures == {} and hooks.buffered == {}
    assert max(rel_errs(hooks.sums, ref).values()) < TOL


# ---------------------------------------------------------------------------------- the general rule
class Gate(nn.Module):
    """No rule knows it: a parameter of its own used in forward, plus a child Linear."""

    def __init__(self, d):
        super().__init__()
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.extra = nn.ParameterDict({"bias": nn.Parameter(torch.randn(d) * 0.1)})
        self.proj = nn.Linear(d, d)

    def forward(self, x, scale=None):
        h = torch.sigmoid(self.proj(x)) * self.gate + self.extra["bias"]
        return h if scale is None else h * scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 6)
        self.gate = Gate(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.gate(torch.tanh(self.inp(x)), scale=torch.tensor(2.0))  # a non-batched keyword argument
        return self.head(h.mean(1))


def _net_problem():
    net = Net()
    x, y = torch.randn(5, 4, 5), torch.tensor([0, 1, 2, 1, 0])
    return (
        net,
        (lambda b: F.cross_entropy(net(b["input_ids"]), b["labels"], reduction="none")),
        {"input_ids": x, "labels": y},
    )


def test_custom_module_is_exact_through_the_general_rule():
    net, loss_fn, batch = _net_problem()
    params = dict(net.named_parameters())
    ref, _ = per_example_fisher(loss_fn, batch, params)
    hooks = run_hooks(net, loss_fn, batch, params)
    assert hooks.fallback_modules == ["gate"] and hooks.uncovered == [] and hooks.missed == set()
    assert max(rel_errs(hooks.sums, ref).values()) < TOL
    assert float(ref["gate.gate"].min()) > 0


def test_a_registered_rule_replaces_the_general_one():
    class GateRule(Rule):
        def claim(self, module):
            return {"gate": module.gate}

        def save(self, module, args, kwargs, output, batch):
            return torch.sigmoid(module.proj(args[0])).detach() * (kwargs.get("scale") or 1.0)

        def grads(self, module, s, g, attrs, dense):
            yield {"gate": (g * s).sum(1)}

    register_rule(Gate)(GateRule)
    try:
        net, loss_fn, batch = _net_problem()
        params = dict(net.named_parameters())
        ref, _ = per_example_fisher(loss_fn, batch, params)
        hooks = run_hooks(net, loss_fn, batch, params)
        # the rule claims only `gate`; the ParameterDict's bias has no user and is uncovered: the loop's
        assert hooks.fallback_modules == [] and hooks.uncovered == ["gate.extra.bias"]
        assert max(rel_errs(hooks.sums, {k: ref[k] for k in hooks.covered}).values()) < TOL
        got, _ = per_example_fisher_hooks(loss_fn, batch, net, params)
        assert max(rel_errs(got, ref).values()) < TOL
    finally:
        from fish_lightning.core.per_example import registry

        registry._RULES[:] = [(p, r) for p, r in registry._RULES if not isinstance(r, GateRule)]


def test_a_failing_replay_is_missed_and_redone_by_the_loop():
    class Pair(nn.Module):  # tuple output: the general rule cannot take it
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

        def forward(self, x):
            return x * self.w, x.sum(-1)

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, s = self.pair(x)
            return a.sum(-1) + s

    net, x = Top(), torch.randn(4, 3)
    loss_fn = lambda b: net(b["input_ids"]) ** 2  # noqa: E731
    params = dict(net.named_parameters())
    ref, _ = per_example_fisher(loss_fn, {"input_ids": x}, params)
    hooks = run_hooks(net, loss_fn, {"input_ids": x}, params)
    assert hooks.missed == {"pair.w"}  # unseen: its output was not a tensor
    got, _ = per_example_fisher_hooks(loss_fn, {"input_ids": x}, net, params)
    assert max(rel_errs(got, ref).values()) < TOL


def test_scatter_reduces_each_module_call_into_shard_shaped_accumulators():
    """FSDP2's path without processes: ``attach(into=shards, scatter=...)`` hands every module call's
    whole-shaped sum (tied weights: the batch's, after the backward) to the scatter function at once and
    adds its part; the shard accumulators then equal the rows of the unsharded sums, and no whole-shaped
    buffer is kept between calls."""
    model = build_causal_lm(tiny_config={**CONFIGS["gpt2"], "tie_word_embeddings": True}).eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch, loss_fn = lm_batch(), lm_loss(model)
    ref = run_hooks(model, loss_fn, batch, params).sums
    rows = {n: slice(0, max(1, p.shape[0] // 2)) for n, p in params.items()}  # "this rank's" first rows
    calls: dict[str, int] = {}

    def part(name):
        def scatter(whole):
            assert whole.shape == params[name].shape  # whole-shaped in, own rows out
            calls[name] = calls.get(name, 0) + 1
            return whole[rows[name]]

        return scatter

    shards = {n: torch.zeros_like(p[rows[n]], dtype=torch.float32) for n, p in params.items()}
    hooks = PerExampleSquaredGrads(model, params).attach(into=shards, scatter={n: part(n) for n in params})
    hooks.start_batch(batch["input_ids"].shape[0])
    loss = loss_fn(batch).sum()
    torch.autograd.grad(loss, list(params.values()))
    tied = set(hooks._pending)
    hooks.finish_batch()
    hooks.detach()
    assert tied and all(calls[n] == 1 for n in tied)  # the tied embedding: once, the sum over its calls
    assert set(calls) == set(params) and hooks.missed == set()
    for n in params:
        torch.testing.assert_close(shards[n], ref[n][rows[n]], rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match=r"scatter needs into="):
        PerExampleSquaredGrads(model, params).attach(scatter={n: part(n) for n in params})
