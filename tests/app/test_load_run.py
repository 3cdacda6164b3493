"""``fish_lightning.load_run``: a run's trained model (base, adapter, head, pooling) rebuilt from its directory,
with the run's outputs; the adapter folder is portable (hub id, head size, pooling, a model card)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_module

from fish_lightning import RunLoadError, load_run

pytestmark = pytest.mark.usefixtures("one_thread")


def probe_inputs() -> dict[str, torch.Tensor]:
    """Three fixed token sequences, the last two padded."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1000, 2000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**probe_inputs()).logits


class RecordOutputs(pl.Callback):
    """Saves the trained model's eval-mode outputs on :func:`probe_inputs` at the end of fit."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        was_training = model.training
        model.eval()
        torch.save(outputs_of(model), self.path)
        model.train(was_training)


def train_run(tmp_path: Path, *overrides: str) -> Path:
    """A fish-train run in-process; returns its directory (``D/expected.pt``: the final model's outputs)."""
    from fish_lightning.app.train import run

    run_dir = tmp_path / "run"
    args = [f"paths.cache_dir={tmp_path}/cache", "logger=none", "checkpoint.every_n_train_steps=null",
            f"trainer.default_root_dir={tmp_path}", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
            "data.train_samples=32", "data.val_samples=16", "data.batch_size=16", "data.max_length=16",
            *([] if "fish=off" in overrides else ["fish.warmup_steps=1", "fish.mask_epoch=null"]),
            "+callbacks.record._target_=test_load_run.RecordOutputs", f"+callbacks.record.path={run_dir}/expected.pt",
            *overrides]  # fmt: skip
    with initialize_config_module("fish_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=args)
    record = run(cfg, run_dir, list(overrides))
    assert record["status"] == "ok"
    return run_dir


def assert_same_outputs(model: torch.nn.Module, run_dir: Path) -> None:
    assert not model.training
    expected = torch.load(run_dir / "expected.pt")
    assert torch.allclose(outputs_of(model), expected, atol=1e-6, rtol=0), (outputs_of(model) - expected).abs().max()


def strings_in(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings_in(v)
    elif isinstance(obj, str):
        yield obj


def test_minilm_mean_pooled_run_reloads_with_its_outputs_and_a_portable_adapter(tmp_path):
    from peft import PeftModel

    from fish_lightning.adapters.models import build_sequence_classifier

    run_dir = train_run(tmp_path, "model=minilm", "data=tweets")
    model = load_run(run_dir)
    assert_same_outputs(model, run_dir)

    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert not [s for s in strings_in(config) if s.startswith("/") or "site-packages" in s]
    meta = json.loads((adapter / "fish_lightning.json").read_text())
    assert (meta["num_labels"], meta["pooling"], meta["task"]) == (3, "mean", "sequence_classification")
    card = (adapter / "README.md").read_text()
    head = card.split("---")[2][:1200]  # the lines after the front matter
    assert "load_run" in head and "AutoPeftModelForSequenceClassification` cannot rebuild" in head
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card

    moved = tmp_path / "elsewhere" / "my_adapter"  # the adapter folder alone, copied anywhere
    shutil.copytree(adapter, moved)
    assert_same_outputs(load_run(moved), run_dir)

    base = build_sequence_classifier("minilm", num_labels=3, pooling="mean")  # the base the run used, as the card says
    assert_same_outputs(PeftModel.from_pretrained(base, adapter).eval(), run_dir)


def test_causal_lm_run_reloads_with_its_outputs(tmp_path, glue_dir):
    run_dir = train_run(tmp_path, "model=tiny_gpt2", "peft=lora_decoder", "data=sst2_instruct",
                        f"data.path={glue_dir}")  # fmt: skip
    model = load_run(run_dir)
    assert_same_outputs(model, run_dir)
    meta = json.loads((run_dir / "adapter" / "fish_lightning.json").read_text())
    assert meta["task"] == "causal_lm" and meta["num_labels"] is None and meta["base_model"] is None
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "cannot rebuild this model: its base was built from a config" in card
    for made_here in ("fish_lightning.json", "README.md"):  # a run folder saved before these files existed
        (run_dir / "adapter" / made_here).unlink()
    assert_same_outputs(load_run(run_dir), run_dir)


def test_full_fine_tuning_and_bottleneck_runs_reload(tmp_path):
    full = train_run(tmp_path / "full", "experiment=tiny", "peft=none", "fish=off", "data.train_samples=32")
    assert (full / "model").is_dir()
    assert_same_outputs(load_run(full), full)
    houlsby = train_run(tmp_path / "houlsby", "experiment=tiny", "peft=houlsby", "model.net.pooling=mean")
    assert (houlsby / "adapter" / "trainable.safetensors").is_file()
    assert_same_outputs(load_run(houlsby), houlsby)


def test_a_folder_that_is_not_a_run_gets_one_error_naming_what_is_missing(tmp_path):
    with pytest.raises(RunLoadError, match=r"is not a fish-train run: it has no config.yaml .* and no "
                                           r"fish_lightning.json"):  # fmt: skip
        load_run(tmp_path)
    with pytest.raises(RunLoadError, match=r"is not a directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "config.yaml").write_text("model:\n  net:\n    _target_: builtins.dict\n")
    (tmp_path / "results.json").write_text(json.dumps({"status": "failed", "error": "ValueError: boom"}))
    with pytest.raises(RunLoadError, match=r"holds no trained model: expected adapter/adapter_config.json, "
                                           r"adapter/trainable.safetensors or model/ \(results.json: status "
                                           r"'failed', ValueError: boom\)"):  # fmt: skip
        load_run(tmp_path)
