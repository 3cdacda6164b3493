"""Every PEFT method of conf/peft/*.yaml on a tiny BERT, end to end through lightning.Trainer:
default candidates are exactly the method's added tensors, exactly k kept, the head trains whole,
frozen entries stay bit-identical. Plus AdaLoRA's refusal and the bottleneck adapters themselves."""

import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from test_peft_e2e import TINY, token_batches
from torch import nn

from conftest import SnapshotAtFreeze, make_trainer, params_of
from fish_lightning import FisherMaskCallback
from fish_lightning.adapters.bottleneck import BottleneckAdapter, add_adapters
from fish_lightning.adapters.models import ADDED_TENSORS, PEFT_METHODS, apply_peft, build_sequence_classifier
from fish_lightning.app.classifier import SequenceClassifier
from fish_lightning.core.candidates import ALWAYS_TRAINED_ATTR, check_supported, find_candidates

CONF = Path(__file__).resolve().parents[2] / "src" / "fish_lightning" / "conf" / "peft"
LAYERS = range(TINY["num_hidden_layers"])
PEFT_PREFIX, PLAIN_PREFIX = "model.base_model.model.bert.encoder.layer", "model.bert.encoder.layer"
PEFT_HEAD = {f"model.base_model.model.classifier.modules_to_save.default.{p}" for p in ("weight", "bias")}
PLAIN_HEAD = {f"model.classifier.{p}" for p in ("weight", "bias")}


def _names(prefix: str, tails: list[str]) -> set[str]:
    return {f"{prefix}.{i}.{t}" for i in LAYERS for t in tails}


def _qv(fmt: str, parts: tuple[str, ...]) -> list[str]:
    return [f"attention.self.{m}.{fmt.format(p)}" for m in ("query", "value") for p in parts]


_IA3_MODULES = ("attention.self.key", "attention.self.value", "attention.output.dense", "output.dense")
_ADAPTER = [f"adapter.{p}.{w}" for p in ("down", "up") for w in ("weight", "bias")]
# method -> (candidate names in the SequenceClassifier, always-trained head names), written out by hand
EXPECTED = {
    "lora": (_names(PEFT_PREFIX, _qv("lora_{}.default.weight", ("A", "B"))), PEFT_HEAD),
    "rslora": (_names(PEFT_PREFIX, _qv("lora_{}.default.weight", ("A", "B"))), PEFT_HEAD),
    "pissa": (_names(PEFT_PREFIX, _qv("lora_{}.default.weight", ("A", "B"))), PEFT_HEAD),
    "dora": (_names(PEFT_PREFIX, _qv("lora_{}.default.weight", ("A", "B", "magnitude_vector"))), PEFT_HEAD),
    "ia3": (_names(PEFT_PREFIX, [f"{m}.ia3_l.default" for m in _IA3_MODULES]), PEFT_HEAD),
    "loha": (_names(PEFT_PREFIX, _qv("hada_{}.default", ("w1_a", "w1_b", "w2_a", "w2_b"))), PEFT_HEAD),
    "lokr": (_names(PEFT_PREFIX, _qv("lokr_{}.default", ("w1", "w2"))), PEFT_HEAD),  # 32x32: full factors
    "vera": (_names(PEFT_PREFIX, _qv("vera_lambda_{}.default", ("b", "d"))), PEFT_HEAD),
    "houlsby": (
        _names(PLAIN_PREFIX, [f"{s}.dense.{a}" for s in ("attention.output", "output") for a in _ADAPTER]),
        PLAIN_HEAD,
    ),
    "pfeiffer": (_names(PLAIN_PREFIX, [f"output.dense.{a}" for a in _ADAPTER]), PLAIN_HEAD),
    "none": (None, set()),  # every weight, head included
}


def config_of(method: str) -> dict:
    cfg = yaml.safe_load((CONF / f"{method}.yaml").read_text())
    assert cfg.pop("_target_") == "fish_lightning.adapters.models.apply_peft" and cfg.pop("_partial_") is True
    return cfg


def tiny_module(method: str, **overrides) -> SequenceClassifier:
    model = build_sequence_classifier(num_labels=2, tiny_config=TINY)
    model = apply_peft(model, **{**config_of(method), **overrides})
    return SequenceClassifier(model, num_labels=2, lr=1e-2, warmup_ratio=None)


def test_every_method_has_a_config():
    # decoder configs (fish_lightning.adapters.decoders.apply_decoder_peft, e.g. lora_decoder): test_causal_lm.py
    stems = {p.stem for p in CONF.glob("*.yaml") if "fish_lightning.adapters.decoders." not in p.read_text()}
    assert stems == set(PEFT_METHODS) and "adalora" not in PEFT_METHODS  # adalora: refused by FISH
    assert set(EXPECTED) == stems


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_method_end_to_end(method):
    module = tiny_module(method)
    params = dict(module.named_parameters())
    expected, head = EXPECTED[method]
    if expected is None:
        expected = set(params)
    cb = FisherMaskCallback(sparsity=0.9, warmup_steps=3, mask_epoch=1)
    snap = SnapshotAtFreeze(cb)
    before = params_of(module)
    make_trainer([cb, snap], max_epochs=2, limit_val_batches=0).fit(module, token_batches(n=32))

    assert set(cb.candidates) == set(cb.masks) == expected
    pattern = ADDED_TENSORS[method]
    assert pattern is None or all(re.search(pattern, n) for n in expected)
    n = sum(params[name].numel() for name in expected)
    assert cb.num_candidates == n and cb.num_kept == round(0.1 * n)
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert trainable - expected == head  # the head: trainable, never a candidate

    final = params_of(module)
    for name, m in cb.masks.items():
        assert torch.equal(final[name][~m], snap.at_freeze[name][~m]), name
    assert any(not torch.equal(final[k][m], snap.at_freeze[k][m]) for k, m in cb.masks.items())  # kept ones train
    for name in head:  # trains whole, after the freeze too
        assert not torch.equal(final[name], snap.at_freeze[name]), name
    for name in set(params) - trainable:  # the base stays put
        assert torch.equal(final[name], before[name]), name


def test_hydra_configs_reach_peft_as_plain_lists():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(yaml.safe_load((CONF / "ia3.yaml").read_text()))
    model = instantiate(cfg)(build_sequence_classifier(num_labels=2, tiny_config=TINY))
    peft_cfg = model.peft_config["default"]
    assert peft_cfg.target_modules == {"key", "value", "output.dense"} and peft_cfg.feedforward_modules == {
        "output.dense"
    }
    cfg.feedforward_modules = ["intermediate.dense"]
    with pytest.raises(ValueError, match="subset"):  # peft's own check runs (it skips ListConfig)
        instantiate(cfg)(build_sequence_classifier(num_labels=2, tiny_config=TINY))


def test_vera_shared_projections_are_frozen_buffers():
    model = tiny_module("vera", r=4).model
    assert not any("vera_A" in n or "vera_B" in n for n, _ in model.named_parameters())
    buffers = dict(model.named_buffers())
    assert any(n.endswith("vera_A.default") for n in buffers) and any(n.endswith("vera_B.default") for n in buffers)


def test_pissa_and_adapters_leave_the_function_unchanged_at_init():
    ids = next(iter(token_batches(n=8)))
    inputs = {k: v for k, v in ids.items() if k != "labels"}
    base = build_sequence_classifier(num_labels=2, tiny_config=TINY).eval()
    with torch.no_grad():
        ref = base(**inputs).logits
        for method in ("pissa", "houlsby", "pfeiffer"):
            model = apply_peft(copy.deepcopy(base), **config_of(method)).eval()
            out = model(**inputs).logits
            if method == "pissa":  # base weight replaced by the SVD residual: equal up to rounding
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
            else:  # up-projection starts at zero: exactly the identity
                assert torch.equal(out, ref), method


def test_adalora_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="peft method 'adalora' is not supported with FISH.*use one of none, lora"):
        apply_peft(build_sequence_classifier(num_labels=2, tiny_config=TINY), "adalora", total_step=100)
    import peft  # built by hand, as code that runs AdaLoRA's schedule itself would

    config = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=100, target_modules=["query", "value"],
                                task_type="SEQ_CLS")  # fmt: skip
    model = peft.get_peft_model(build_sequence_classifier(num_labels=2, tiny_config=TINY), config)
    names = find_candidates(model)  # lora_A, lora_B and the singular values lora_E
    assert names and all(re.search(ADDED_TENSORS["adalora"], n) for n in names)
    assert any("lora_E" in n for n in names)
    with pytest.raises(ValueError, match="AdaLoRA.*'lora' or 'dora'"):
        check_supported(model)
    with pytest.raises(ValueError, match="AdaLoRA"):
        check_supported(SequenceClassifier(model, num_labels=2))
    for method in sorted(EXPECTED):
        check_supported(tiny_module(method).model)  # everything else is fine
    with pytest.raises(ValueError, match="AdaLoRA"):  # and the callback refuses it at fit start
        make_trainer([FisherMaskCallback(warmup_steps=1, mask_epoch=None)], max_epochs=1).fit(
            SequenceClassifier(model, num_labels=2, warmup_ratio=None), token_batches()
        )


def test_apply_peft_rejects_bad_options():
    def fresh():
        return build_sequence_classifier(num_labels=2, tiny_config=TINY)

    with pytest.raises(ValueError, match="'prefix'.*expected one of"):
        apply_peft(fresh(), "prefix")
    with pytest.raises(ValueError, match="'none'.*no options"):
        apply_peft(fresh(), "none", r=8)
    with pytest.raises(ValueError, match="use_dora=True; got use_dora=False"):
        apply_peft(fresh(), "dora", use_dora=False, target_modules=["query"])
    with pytest.raises(ValueError, match="pissa_niter_<k>"):
        apply_peft(fresh(), "pissa", init_lora_weights=True, target_modules=["query"])
    with pytest.raises(ValueError, match="subset"):
        apply_peft(fresh(), "ia3", target_modules=["key"], feedforward_modules=["output.dense"])
    with pytest.raises(ValueError, match="adapter style 'bogus'"):
        add_adapters(fresh(), "bogus")
    with pytest.raises(ValueError, match="non_linearity='sigmoid'"):
        apply_peft(fresh(), "houlsby", non_linearity="sigmoid")
    with pytest.raises(ValueError, match="no BERT/RoBERTa-style"):
        apply_peft(nn.Sequential(nn.Linear(2, 2)), "pfeiffer")
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        apply_peft(fresh(), "houlsby", modules_to_save=["head"])
    with pytest.raises(ValueError, match="applied twice"):
        apply_peft(apply_peft(fresh(), "houlsby"), "houlsby")


def test_adapters_on_roberta_and_deepcopy():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(**{**TINY, "max_position_embeddings": 80}, num_labels=2, pad_token_id=1)
    model = add_adapters(RobertaForSequenceClassification(cfg), "pfeiffer", bottleneck=3)
    names = find_candidates(model)
    assert len(names) == 4 * TINY["num_hidden_layers"] and all(".output.dense.adapter." in n for n in names)
    assert not any("attention" in n for n in names)
    head = {n for n, p in model.named_parameters() if p.requires_grad} - set(names)
    assert head == {f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}
    assert getattr(model.classifier, ALWAYS_TRAINED_ATTR) is True
    assert model.roberta.encoder.layer[0].output.dense.adapter.down.out_features == 3

    clone = copy.deepcopy(model).eval()  # the hook finds the clone's own adapter
    ids = torch.randint(3, 100, (2, 8))
    with torch.no_grad():
        ref = model.eval()(input_ids=ids).logits
        for m in clone.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.bias.fill_(1.0)
        assert not torch.equal(clone(input_ids=ids).logits, ref)
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_always_trained_marker_and_plain_model_default():
    model = build_sequence_classifier(num_labels=2, tiny_config=TINY)
    assert "classifier.weight" in find_candidates(model)  # full fine-tuning: the head is a candidate
    setattr(model.classifier, ALWAYS_TRAINED_ATTR, True)
    names = find_candidates(model)
    assert "classifier.weight" not in names and "bert.pooler.dense.weight" in names
    assert "classifier.weight" in find_candidates(model, include=["classifier"])  # include overrides


def test_one_registration_per_method_and_one_config_each():
    from fish_lightning.adapters.peft_methods import REGISTRY

    configs = {}
    for path in CONF.glob("*.yaml"):
        text = path.read_text()
        method = re.search(r"^method: (\w+)", text, re.M).group(1)
        configs.setdefault(method, []).append(path.stem)
    offered = {n for n, m in REGISTRY.items() if m.refused is None}
    assert set(configs) == offered  # every config has an entry, every offered entry a config
    assert "adalora" in REGISTRY and "adalora" not in PEFT_METHODS
    with pytest.raises(ValueError, match=r"peft method 'lorra' is not supported: expected one of \('none', 'lora'"):
        apply_peft(build_sequence_classifier(num_labels=2, tiny_config=TINY), "lorra")
