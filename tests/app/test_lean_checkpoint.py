"""Checkpoints hold the trainable state only, load back with ``load_from_checkpoint`` and ``ckpt_path=``; a best
checkpoint beside ``last.ckpt``; loggers get the resolved config and the learning rate."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module

from fish_lightning import load_run
from fish_lightning.app.errors import ConfigError
from fish_lightning.app.lean_checkpoint import FROZEN_KEY

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ["experiment=tiny", "data.train_samples=64", "data.val_samples=32", "data.batch_size=16",
        "checkpoint.every_n_train_steps=3", "trainer.deterministic=true",
        "trainer.enable_progress_bar=false"]  # fmt: skip


def run_in(tmp_path, *extra):
    from fish_lightning.app.train import run

    run_dir = tmp_path / "run"
    logger = [] if any(e.startswith("logger=") for e in extra) else [f"logger.csv.save_dir={run_dir}"]
    with initialize_config_module("fish_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.cache_dir={tmp_path}/cache", *logger,
                                          f"trainer.default_root_dir={run_dir}", *ARGS, *extra])  # fmt: skip
    return run_dir, run(cfg, run_dir, list(extra)), cfg


@pytest.fixture(scope="module")
def lean_run(tmp_path_factory):
    return run_in(tmp_path_factory.mktemp("lean"))


def test_checkpoint_holds_no_frozen_base_weight(lean_run):
    from fish_lightning.app.classifier import SequenceClassifier

    run_dir, _, _ = lean_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    module = SequenceClassifier.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    stored = set(ckpt["state_dict"])
    assert not stored & frozen and trainable <= stored and set(ckpt[FROZEN_KEY]) == frozen
    total = sum(p.numel() for p in module.parameters())
    assert sum(t.numel() for t in ckpt["state_dict"].values()) < 0.1 * total  # tiny BERT: the embeddings dominate
    # load_from_checkpoint needs no arguments and gives the run's final model (last.ckpt is written at the end)
    probe = {"input_ids": torch.randint(1000, 2000, (2, 9), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        got = module.eval().model(**probe).logits
        want = load_run(run_dir)(**probe).logits
    assert torch.equal(got, want)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()


def test_a_checkpoint_onto_another_base_is_refused(lean_run, tmp_path):
    from fish_lightning.app.classifier import SequenceClassifier

    run_dir, _, _ = lean_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["run_config"]["seed"] = 1  # another random base
    ckpt["hyper_parameters"]["run_config"]["model"]["net"]["seed"] = 1
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"frozen tensor .* of the model built now differs from the one trained"):
        SequenceClassifier.load_from_checkpoint(tmp_path / "other.ckpt")


def test_loggers_get_the_config_and_the_learning_rate(lean_run):
    run_dir, _, _ = lean_run
    (version,) = (run_dir / "csv").glob("version_*")
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["run_config"]["model"]["name"] == "tiny_bert" and hparams["run_config"]["fish"]["sparsity"] == 0.5
    with open(version / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    # the schedule is transformers' linear warmup/decay: 8 steps (2 epochs x 4 batches), warmup int(0.06 * 8) = 0
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=8)
    want = []
    for _ in range(8):
        want.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert logged == pytest.approx(want, rel=1e-12)


def test_ckpt_path_starts_from_any_checkpoint_and_bad_values_are_refused(lean_run, tmp_path):
    run_dir, ref, _ = lean_run
    again, record, _ = run_in(tmp_path, f"ckpt_path={run_dir}/checkpoints/last.ckpt")
    assert record["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert record["metrics"] == ref["metrics"]  # the finished run's checkpoint: nothing left to train
    with pytest.raises(ConfigError, match=r"ckpt_path='nope.ckpt' is not a file"):
        run_in(tmp_path / "a", "ckpt_path=nope.ckpt")
    with pytest.raises(ConfigError, match=r"and resume=true are both set"):
        run_in(tmp_path / "b", f"ckpt_path={run_dir}/checkpoints/last.ckpt", "resume=true")
    assert json.loads((tmp_path / "b" / "run" / "results.json").read_text())["status"] == "failed"


def test_tensorboard_gets_the_hparams_and_the_labelled_anatomy_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fish_lightning.masker.anatomy_image import anatomy_figure

    run_dir = tmp_path / "run"
    _, record, _ = run_in(tmp_path, "logger=tensorboard", f"logger.tensorboard.save_dir={run_dir}",
                          "checkpoint.every_n_train_steps=null")  # fmt: skip
    (version,) = (run_dir / "tensorboard").glob("version_*")
    assert yaml.safe_load((version / "hparams.yaml").read_text())["run_config"]["peft"]["method"] == "lora"
    acc = EventAccumulator(str(version), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    hparams = {v.tag: v.metadata.plugin_data for f in version.glob("events.*") for ev in EventFileLoader(str(f)).Load()
               for v in ev.summary.value if v.tag.startswith("_hparams_/")}  # fmt: skip
    start = hparams["_hparams_/session_start_info"]
    assert start.plugin_name == "hparams" and b"run_config/model/name" in start.content
    assert b"tiny_bert" in start.content
    (image,) = acc.Images("fish/mask_anatomy")
    stats = json.loads((run_dir / "mask_stats.json").read_text())
    fig = anatomy_figure(stats["anatomy"])
    width, height = fig.get_size_inches() * fig.dpi
    assert image.width >= int(width) and image.height >= int(height)
    assert "lr-AdamW" in tags["scalars"] and "fish/density/layer_0/attention.query.lora_A" in tags["scalars"]
    assert not [t for t in tags["scalars"] if t.startswith("fish/density/base_model")]  # no per-tensor series
