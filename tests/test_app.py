"""The Hydra app: every group option composes and instantiates; smoke run; sweep + report; bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from fish_lightning import FisherMaskCallback
from fish_lightning.adapters.models import ADDED_TENSORS
from fish_lightning.app.train import build_fish
from fish_lightning.core.candidates import find_candidates

CONF = Path(__file__).resolve().parents[1] / "src" / "fish_lightning" / "conf"
HUB_MODELS = {"bert_base", "roberta_base", "gpt2", "tinyllama"}  # need the network: composed and resolved, not loaded


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# instruction data for causal LMs (fish_lightning.app.instruction_data): instantiated and run in tests/test_causal_lm.py
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
    assert {"smoke", "sst2_lora_fish", "budget_matched"} <= set(options("experiment"))


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
    if cfg.peft._target_.startswith("fish_lightning.adapters.decoders."):  # decoder peft configs: on a tiny GPT-2
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


@pytest.mark.parametrize("opt", sorted(set(options("data")) - INSTRUCTION_DATA))
def test_data_options_instantiate(opt, tmp_path, glue_dir):
    cfg = composed(["model=tiny_bert", f"data={opt}", f"data.path={glue_dir}" if opt != "tweets" else "data.path=null",
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


def _cli(args, tmp_path, entry="fish-train"):
    env = dict(os.environ, FISH_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    exe = Path(sys.executable).parent / entry
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", f"fish_lightning.{entry.split('-')[1]}"]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_smoke_experiment_through_fish_train(tmp_path):
    proc = _cli(["experiment=smoke", "export=true", "fish.rewind_frozen=true", f"hydra.run.dir={tmp_path}/run"],
                tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (tmp_path / "run" / "adapter.fish.safetensors").is_file()
    assert res["export"]["dense_fallback"] == [] and res["export"]["ratio"] < 0.9
    assert res["status"] == "ok" and 0.0 <= res["metrics"]["val/accuracy"] <= 1.0
    assert (
        res["kept"] == round(0.5 * res["candidates"]) and res["trainable_params"] == res["kept"] + res["always_trained"]
    )
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "mask_stats.json").is_file()
    assert "val/accuracy" in proc.stdout


def test_two_by_two_multirun_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _cli(["-m", "experiment=smoke", "fish=fisher,random", "fish.sparsity=0.5,0.9", "trainer.max_epochs=2",
                 "data.train_samples=96", "data.val_samples=64", f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(sweep.glob("*/results.json"))) == 4
    rep = _cli([str(sweep)], tmp_path, entry="fish-report")
    assert rep.returncode == 0, rep.stderr[-3000:]
    table = (sweep / "summary.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| lora")]
    assert len(rows) == 4, table
    png = (sweep / "metric_vs_params.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _main(args, tmp_path, monkeypatch, capsys):
    from fish_lightning.app.train import main

    monkeypatch.setenv("FISH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["fish-train", "model=tiny_bert", f"hydra.run.dir={tmp_path}/run", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["fish.sparsity=1.5"], r"sparsity=1.5 is out of range"),
        (["data=sst2", "data.path=/does/not/exist"], r"data.path='/does/not/exist' does not exist"),
        (["data=sst2", "data.num_labels=3", "data.path=GLUE"], r"num_labels=3 does not match task 'sst2'"),
        (["budget.r=2", "budget.kept=10"], r"budget.r=2 and budget.kept=10 are both set"),
        (["fish=off", "budget.r=2"], r"needs a FISH mask, but fish=off"),
        (["fish.mask_epoch=5"], r"fish.mask_epoch=5 is past the run \(trainer.max_epochs=2\)"),
        (["fish.scope=layer"], r"scope='layer' is not valid"),
    ],
)
def test_bad_input_fails_fast_with_one_line(args, message, tmp_path, monkeypatch, capsys, glue_dir):
    args = [a.replace("GLUE", glue_dir) for a in args]
    code, err = _main(args, tmp_path, monkeypatch, capsys)
    assert code == 2
    line = [ln for ln in err.splitlines() if ln.startswith("fish-train: error:")]
    assert len(line) == 1 and __import__("re").search(message, line[0]), err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "failed" and "metrics" not in res  # failed before any training


def test_bad_columns_fail_fast(tmp_path, monkeypatch, capsys):
    d = tmp_path / "g" / "SST-2"
    d.mkdir(parents=True)
    for split in ("train", "dev"):
        (d / f"{split}.tsv").write_text("text\tstars\nok\t1\n")
    code, err = _main(["data=sst2", f"data.path={tmp_path / 'g'}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "missing column(s) ['sentence', 'label']" in err


def test_unknown_group_option_names_choices(tmp_path):
    proc = _cli(["peft=lorax", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode != 0
    assert "peft/lorax" in proc.stderr and "lora" in proc.stderr and "dora" in proc.stderr


def test_scripts_train_py_runs_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    env = dict(os.environ, FISH_CACHE_DIR=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), "experiment=smoke", "data.train_samples=64",
                           "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}/run"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "ok"
