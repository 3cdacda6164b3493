"""The Hydra app's configs: every group option composes and instantiates, the fish group is the callback's
parameters, a budget matches its reference rank exactly."""

import inspect
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from fish_lightning import FisherMaskCallback
from fish_lightning.adapters.models import ADDED_TENSORS
from fish_lightning.app.train import build_fish, is_decoder_peft
from fish_lightning.core.candidates import find_candidates

CONF = Path(__file__).resolve().parents[2] / "src" / "fish_lightning" / "conf"
HUB_MODELS = {"bert_base", "roberta_base", "gpt2", "tinyllama"}  # need the network: composed and resolved, not loaded


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# instruction data for causal LMs (fish_lightning.app.instruction_data): run in tests/adapters/test_causal_lm.py
INSTRUCTION_DATA = {o for o in options("data") if "InstructionData" in (CONF / "data" / f"{o}.yaml").read_text()}


def composed(overrides, tmp_path):
    with initialize_config_module("fish_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.cache_dir={tmp_path}/cache", *overrides])
    # ${hydra:...} only resolves inside a Hydra run; pin those paths for instantiation here
    OmegaConf.update(cfg, "trainer.default_root_dir", str(tmp_path))
    for lg in (cfg.get("logger") or {}).values():
        lg.save_dir = str(tmp_path)
    return cfg


def test_group_options_exist():
    assert {"minilm", "tiny_bert", "bert_base", "roberta_base"} <= set(options("model"))
    assert {"lora", "dora", "none"} <= set(options("peft"))
    assert {"off", "fisher", "random", "reverse"} <= set(options("fish"))
    assert {"sst2", "cola", "mrpc", "rte", "stsb", "qnli", "tweets"} <= set(options("data"))
    assert {"csv", "tensorboard"} <= set(options("logger"))
    assert {"smoke", "tiny", "sst2_lora_fish", "budget_matched"} <= set(options("experiment"))


@pytest.mark.parametrize("opt", options("model"))
def test_model_options_instantiate(opt, tmp_path):
    cfg = composed([f"model={opt}"], tmp_path)
    if opt in HUB_MODELS:
        assert callable(get_method(cfg.model.net._target_)) and "/" in cfg.model.net.name_or_path
        return
    model = instantiate(cfg.model.net)
    if cfg.model.get("kind") == "causal_lm":
        assert model.get_output_embeddings() is not None  # an LM head, no classifier
        return
    assert model.config.num_labels == cfg.data.num_labels


@pytest.mark.parametrize("opt", options("peft"))
def test_peft_options_instantiate(opt, tmp_path):
    cfg = composed(["model=tiny_bert", f"peft={opt}"], tmp_path)
    if is_decoder_peft(cfg):  # decoder peft configs (task_type: CAUSAL_LM): on a tiny GPT-2
        cfg = composed(["model=tiny_gpt2", f"peft={opt}"], tmp_path)
    model = instantiate(cfg.peft)(instantiate(cfg.model.net))
    names = find_candidates(model)
    pattern = ADDED_TENSORS[cfg.peft.method]
    if pattern is None:  # full fine-tuning: every weight
        assert any("encoder" in n for n in names)
    else:
        assert names and all(re.search(pattern, n) for n in names)


@pytest.mark.parametrize("opt", options("fish"))
def test_fish_options_instantiate(opt, tmp_path):
    cfg = composed(["model=tiny_bert", f"fish={opt}"], tmp_path)
    fish, _ = build_fish(cfg, instantiate(cfg.peft)(instantiate(cfg.model.net)))
    if opt == "off":
        assert fish is None
    else:
        assert isinstance(fish, FisherMaskCallback) and fish.selection == opt


def test_fish_config_keys_are_the_callback_parameters(tmp_path):
    params = [n for n, p in inspect.signature(FisherMaskCallback.__init__).parameters.items()
              if n != "self" and p.kind != p.KEYWORD_ONLY]  # (settings=: the keywords as one object)
    for opt in sorted(set(options("fish")) - {"off"}):
        keys = set(composed(["model=tiny_bert", f"fish={opt}"], tmp_path).fish) - {"_target_"}
        assert keys == set(params), (opt, keys ^ set(params))
    for opt in ("random", "reverse", "magnitude"):  # baselines extend fisher.yaml instead of copying it
        text = (CONF / "fish" / f"{opt}.yaml").read_text()
        assert "- fisher" in text and "sparsity" not in text


@pytest.mark.parametrize("opt", sorted(set(options("data")) - INSTRUCTION_DATA))
def test_data_options_instantiate(opt, tmp_path, glue_dir):
    path = {"tweets": ["data.path=null"], "csv": [f"data.path={glue_dir}/SST-2/train.tsv", "data.text_column=sentence",
                                                  f"data.val_path={glue_dir}/SST-2/dev.tsv"]}  # fmt: skip
    cfg = composed(["model=tiny_bert", f"data={opt}", *path.get(opt, [f"data.path={glue_dir}"]),
                    "data.train_samples=8", "data.val_samples=4"], tmp_path)  # fmt: skip
    dm = instantiate(cfg.data)
    dm.setup()
    assert len(dm.splits["train"]) == 4 if opt != "tweets" else 8
    assert dm.num_labels == cfg.data.num_labels == cfg.model.net.num_labels


@pytest.mark.parametrize("group", ["trainer", "logger"])
def test_trainer_and_logger_options_instantiate(group, tmp_path):
    for opt in options(group):
        cfg = composed([f"{group}={opt}"], tmp_path)
        if group == "trainer":
            trainer = instantiate(cfg.trainer, devices=1, strategy="auto", logger=False)
            assert trainer.max_epochs == cfg.trainer.max_epochs
        else:
            loggers = [instantiate(lg) for lg in (cfg.logger or {}).values()]
            assert len(loggers) == (0 if opt == "none" else 1)


@pytest.mark.parametrize("opt", options("experiment"))
def test_experiments_compose(opt, tmp_path):
    cfg = composed([f"experiment={opt}"], tmp_path)
    assert cfg.fish and cfg.data.task


def test_budget_matches_reference_rank_exactly(tmp_path):
    cfg = composed(["model=tiny_bert", "peft.r=8", "budget.r=2"], tmp_path)
    model = instantiate(cfg.peft)(instantiate(cfg.model.net))
    fish, info = build_fish(cfg, model)
    ref = instantiate(OmegaConf.merge(cfg.peft, {"r": 2}))(instantiate(cfg.model.net))
    ref_count = sum(p.numel() for n, p in ref.named_parameters() if "lora_" in n)
    n = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    assert info["budget_kept"] == ref_count and round((1 - fish.sparsity) * n) == ref_count


