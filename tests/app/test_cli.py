"""``fish-cli``: LightningCLI with FisherMaskCallback configured in YAML (``trainer.callbacks``, class_path)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fish_lightning import FisherMaskCallback
from fish_lightning.app.cli import EXAMPLES_DIR, PeftSequenceClassifier, cli_main, main

EXAMPLES = EXAMPLES_DIR  # shipped in the package
TINY = EXAMPLES / "tiny_smoke.yaml"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when sys.argv holds arguments besides ``args``: show it a bare command."""
    monkeypatch.setattr(sys, "argv", ["fish-cli"])


def fish_callback(cli) -> FisherMaskCallback:
    (fish,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, FisherMaskCallback)]
    return fish


def test_fit_with_fish_from_yaml(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    cli = cli_main(["fit", "--config", str(TINY), f"--trainer.default_root_dir={tmp_path}"])

    fish = fish_callback(cli)
    given = config["trainer"]["callbacks"][0]["init_args"]
    assert {k: getattr(fish, k) for k in given} == given  # sparsity 0.5, warmup 3, mask_epoch 1, seed 3, rewind
    steps_per_epoch = config["data"]["train_samples"] // config["data"]["batch_size"]
    assert cli.trainer.global_step == config["trainer"]["max_epochs"] * steps_per_epoch
    assert cli.model.num_labels == 3 and list(cli.model.val_metrics) == ["accuracy", "f1"]  # linked from data=tweets
    assert "val/accuracy" in cli.trainer.callback_metrics

    masks = fish.masks
    n = sum(m.numel() for m in masks.values())
    assert n == fish.num_candidates and all("lora_" in name for name in masks)
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - 0.5) * n) == fish.num_kept

    # rewind_frozen: frozen entries end exactly at their initial values, i.e. those of a fresh model with the same
    # settings (seeded tiny BERT and adapter init); the kept entries trained
    final = dict(cli.model.named_parameters())
    settings = {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}  # no LightningCLI internals
    initial = dict(PeftSequenceClassifier(**settings).named_parameters())
    for name, mask in masks.items():
        assert torch.equal(final[name].detach()[~mask], initial[name].detach()[~mask]), name
    moved = sum(int((final[k].detach()[m] != initial[k].detach()[m]).sum()) for k, m in masks.items())
    assert moved > 0.5 * fish.num_kept
    assert fish.verify(cli.model)["frozen_unchanged"]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # LightningCLI's record of the run
    assert saved["trainer"]["callbacks"][0]["init_args"]["sparsity"] == 0.5


def test_sst2_example_builds_offline(glue_dir, tmp_path):
    """The shipped example (MiniLM, GLUE TSVs): model, data and FISH callback instantiate from it."""
    cli = cli_main(["--config", str(EXAMPLES / "sst2_lora_fish.yaml"), f"--data.path={glue_dir}",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)  # fmt: skip
    fish = fish_callback(cli)
    assert (fish.sparsity, fish.warmup_steps, fish.mask_epoch, fish.selection) == (0.75, 50, 1, "fisher")
    assert cli.datamodule.spec.name == "sst2" and cli.datamodule.path == glue_dir
    lora = [name for name, p in cli.model.named_parameters() if "lora_" in name and p.requires_grad]
    assert len(lora) == 6 * 2 * 2  # MiniLM-L6: A and B on query and value in 6 layers
    assert cli.model.model.peft_config["default"].r == 8


def _with(section: str, key: str, value, tmp_path: Path) -> Path:
    config = yaml.safe_load(TINY.read_text())
    target = config["trainer"]["callbacks"][0]["init_args"] if section == "fish" else config[section]
    target[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("fish", "sparsity", 1.5, "sparsity=1.5 is out of range: expected a number with 0 <= sparsity < 1"),
        ("fish", "scope", "layer", "scope='layer' is not valid: expected one of"),
        ("model", "peft", "lorax", "peft method 'lorax' is not supported: expected one of"),
        ("data", "task", "imdb", "task 'imdb' is not known: expected one of"),
    ],
)
def test_bad_value_fails_with_one_clear_line(section, key, value, message, tmp_path, capsys):
    args = ["fit", "--config", str(_with(section, key, value, tmp_path)), f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(ValueError, match=re.escape(message)):
        cli_main(args)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fish-cli: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "config.yaml").exists()  # failed before any training
