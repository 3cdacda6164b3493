"""fish-train as a user runs it: the smoke run, a sweep and its report, bad input in one line, scripts/train.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fish_train_runs import cli


def test_smoke_experiment_through_fish_train(tmp_path):
    proc = cli(["experiment=tiny", "export=true", "fish.rewind_frozen=true", f"hydra.run.dir={tmp_path}/run"],
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
    proc = cli(["-m", "experiment=tiny", "fish=fisher,random", "fish.sparsity=0.5,0.9", "trainer.max_epochs=2",
                 "data.train_samples=96", "data.val_samples=64", f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(sweep.glob("*/results.json"))) == 4
    rep = cli([str(sweep)], tmp_path, entry="fish-report")
    assert rep.returncode == 0, rep.stderr[-3000:]
    table = (sweep / "summary.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| lora")]
    assert len(rows) == 4, table
    png = (sweep / "metric_vs_params.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    from fish_lightning.app.report import anatomy_panels, collect_runs

    panels = anatomy_panels(sweep, collect_runs(sweep))  # from the runs' mask_stats.json: method × sparsity
    assert [[t.splitlines()[0].split(" · ", 1)[1] for t, _ in row] for row in panels] == [
        [f"lora-r8+{m} · sparsity {s}" for s in (0.5, 0.9)] for m in ("fisher", "random")
    ]
    assert (sweep / "anatomy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    proc = cli(["peft=lorax", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode != 0
    assert "peft/lorax" in proc.stderr and "lora" in proc.stderr and "dora" in proc.stderr


def test_scripts_train_py_runs_smoke(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
    env = dict(os.environ, FISH_CACHE_DIR=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), "experiment=tiny", "data.train_samples=64",
                           "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}/run"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "ok"
