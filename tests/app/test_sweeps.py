"""Sweeps beyond one process: joblib, submitit (local) and Optuna multiruns of fish-train, then fish-report.

Each sweep is 2 jobs of the tiny experiment on 64 tweets; the SLURM config is checked up to the sbatch script.
The Optuna sweep runs its 2 trials at once on the joblib workers the joblib test started (or starts them itself).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import optuna
import pytest
import submitit
from omegaconf import OmegaConf

from fish_lightning.app.report import build_report
from fish_lightning.app.sweeps import TorchThreads, available_cpus

TINY = ["experiment=tiny", "data.train_samples=64", "data.val_samples=32", "fish.warmup_steps=2",
        "trainer.enable_progress_bar=false", "logger=none"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _stop_joblib_workers():
    """Shut the joblib (loky) worker processes down after this module: no idle workers left behind."""
    yield
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(reuse=True).shutdown(wait=True, kill_workers=True)


def multirun(args: list[str], sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fish-train -m ARGS`` in this process (its jobs run where the launcher puts them)."""
    from fish_lightning.app.train import main

    monkeypatch.setenv("FISH_CACHE_DIR", str(sweep.parent / "cache"))
    monkeypatch.setattr(sys, "argv", ["fish-train", "-m", *TINY, *args, f"hydra.sweep.dir={sweep}"])
    main()


def results(sweep: Path) -> dict[str, dict]:
    """``{job dir name: results.json}`` of the job directories ``sweep/0``, ``sweep/1``, ..."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))}


def report_rows(sweep: Path, expected: int) -> list[list[str]]:
    """Run the report and return the ``summary.md`` table rows (checked against ``runs.csv``)."""
    report = build_report(sweep)
    assert [r["status"] for r in report.runs] == ["ok"] * expected, report.markdown
    csv_lines = report.paths["runs.csv"].read_text().strip().splitlines()
    assert len(csv_lines) == expected + 1  # header + one line per run
    rows = [ln for ln in report.paths["summary.md"].read_text().splitlines() if ln.startswith("| lora")]
    assert len(rows) == expected, report.markdown
    return rows


def test_joblib_sweep_two_jobs_in_parallel_then_report(tmp_path, monkeypatch):
    sweep = tmp_path / "joblib"
    multirun(["hydra/launcher=local_parallel", "fish.sparsity=0.5,0.9"], sweep, monkeypatch)
    res = results(sweep)
    assert sorted(res) == ["0", "1"] and all(r["status"] == "ok" for r in res.values())
    assert sorted(r["sparsity"] for r in res.values()) == [0.5, 0.9]
    n = res["0"]["candidates"]
    assert sorted(r["kept"] for r in res.values()) == [round(0.1 * n), round(0.5 * n)]
    threads = max(1, available_cpus() // 2)  # n_jobs=2 on this machine
    for job in ("0", "1"):  # TorchThreads ran in each job's worker process, not in this one
        found = re.search(r"torch threads per job: (\d+) \(pid (\d+)\)", (sweep / job / "train.log").read_text())
        assert found and int(found[1]) == threads and int(found[2]) != os.getpid()
    report_rows(sweep, 2)


def test_submitit_local_sweep_then_report(tmp_path, monkeypatch):
    sweep = tmp_path / "submitit"
    multirun(["hydra/launcher=submitit_local", "fish.sparsity=0.5,0.9"], sweep, monkeypatch)
    res = results(sweep)
    assert sorted(res) == ["0", "1"] and all(r["status"] == "ok" for r in res.values())
    job_logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(job_logs) == 2  # one submitit job (own process, own log) per run
    report_rows(sweep, 2)


def test_submitit_crash_points_to_the_job_log(tmp_path):
    """A job killed before results.json (e.g. by SLURM's time limit): the report names its submitit log."""
    run = tmp_path / "sweep" / "3"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: train\n    id: '77_3'\n    num: 3\n  run:\n"
                                                "    id: other\n")  # fmt: skip
    logs = tmp_path / "sweep" / ".submitit" / "77_3"
    logs.mkdir(parents=True)
    (logs / "77_3_0_log.err").write_text("epoch 1\nslurmstepd: error: *** JOB 77 CANCELLED DUE TO TIME LIMIT ***\n\n")
    (run.parent / "0").mkdir()
    ok = {"status": "ok", "task": "t", "method": "m", "metrics": {"val/a": 0.5}, "primary_metric": "val/a"}
    (run.parent / "0" / "results.json").write_text(json.dumps(ok))
    report = build_report(tmp_path / "sweep")
    crashed = [r for r in report.runs if r["status"] != "ok"]
    assert [r["run_dir"] for r in crashed] == ["3"]
    assert crashed[0]["error"].endswith(
        "submitit log .submitit/77_3/77_3_0_log.err: slurmstepd: error: *** JOB 77 CANCELLED DUE TO TIME LIMIT ***"
    )
    assert ".submitit" not in {Path(r["run_dir"]).parts[0] for r in report.runs}


def test_optuna_sweep_maximises_the_primary_metric_then_report(tmp_path, monkeypatch):
    sweep, db = tmp_path / "optuna", tmp_path / "optuna.db"
    optuna_args = ["hydra/sweeper=optuna_lr_sparsity", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                   f"hydra.sweeper.storage=sqlite:///{db}"]  # fmt: skip
    multirun([*optuna_args, "hydra/launcher=local_parallel"], sweep, monkeypatch)  # both trials at once
    res = results(sweep)
    assert sorted(res) == ["0", "1"] and all(r["status"] == "ok" for r in res.values())
    study = optuna.load_study(study_name="fish_lr_sparsity", storage=f"sqlite:///{db}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 2
    for trial, job in zip(sorted(trials, key=lambda t: t.number), ("0", "1")):
        record = res[job]
        assert trial.value == record["metrics"][record["primary_metric"]]  # the objective is main's return value
        assert 1e-5 <= trial.params["optim.lr"] <= 1e-2 and 0.5 <= trial.params["fish.sparsity"] <= 0.99
        assert record["sparsity"] == trial.params["fish.sparsity"]
        lr = OmegaConf.load(sweep / job / "config.yaml").optim.lr
        assert math.isclose(lr, trial.params["optim.lr"], rel_tol=1e-12)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == study.best_value
    rows = report_rows(sweep, 2)
    report = build_report(sweep)
    best_dir = str(study.best_trial.number)
    assert report.optuna["run_dirs"] == [best_dir] and report.optuna["best_value"] == study.best_value
    assert f"run `{best_dir}`" in report.markdown and len(rows) == 2


def test_slurm_config_makes_a_valid_sbatch_script(tmp_path, monkeypatch):
    """hydra/launcher=slurm through hydra-submitit-launcher up to the submission (no cluster here)."""
    from hydra import compose, initialize_config_module
    from hydra._internal.callbacks import Callbacks
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    fake_bin = tmp_path / "bin"  # submitit refuses to build a SLURM executor without srun on the PATH
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    submitted = {}

    def capture(executor, fn, *args):
        submitted.update(executor=executor, jobs=len(args[0]))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                 "hydra.launcher.account=proj", f"hydra.sweep.dir={tmp_path}/sweep"]  # fmt: skip
    with initialize_config_module("fish_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        callbacks = Callbacks(cfg)
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=HydraContext(config_loader=None, callbacks=callbacks), task_function=print, config=cfg
        )
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    assert submitted["jobs"] == 2
    script = submitted["executor"]._executor._make_submission_file_text("python -u -m submitit.core._submit", "x")
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB",
                 "--account=proj", f"--output={tmp_path}/sweep/.submitit/"):  # fmt: skip
        assert f"#SBATCH {line}" in script, script
    (threads,) = [c for c in callbacks.callbacks if isinstance(c, TorchThreads)]
    assert threads.resolve() == 8  # torch threads per job = cpus_per_task


@pytest.mark.parametrize(("threads", "jobs", "cpus", "expected"),
                         [(3, None, 16, 3), (None, 4, 16, 4), (None, 3, 2, 1), (None, -1, 8, 1), (None, -2, 8, 1),
                          (None, None, 8, None)])  # fmt: skip
def test_torch_threads_per_job(threads, jobs, cpus, expected):
    assert TorchThreads(threads, jobs).resolve(cpus) == expected


@pytest.mark.parametrize(("kwargs", "message"), [({"threads": 0}, r"threads=0 must be null or an integer >= 1"),
                                                 ({"jobs": 0}, r"jobs=0 is not valid"),
                                                 ({"threads": "2"}, r"threads='2' must be")])  # fmt: skip
def test_torch_threads_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TorchThreads(**kwargs)


def test_optuna_results_variants_in_the_report(tmp_path):
    """Several objectives (a Pareto front) and an unreadable optimization_results.yaml: reported, never fatal."""
    ok = {"status": "ok", "task": "t", "method": "m", "metrics": {"val/a": 0.5}, "primary_metric": "val/a"}
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text(json.dumps(ok))
    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nsolutions:\n- params: {optim.lr: 0.001}\n  values: [0.5, 10.0]\n"
    )
    report = build_report(tmp_path)
    assert "Pareto front (1 trial(s)" in report.markdown and "values [0.5, 10.0]: optim.lr=0.001" in report.markdown
    (tmp_path / "optimization_results.yaml").write_text("best_params: [unclosed\n")
    report = build_report(tmp_path)
    assert report.optuna["error"].startswith("cannot read optimization_results.yaml") and len(report.rows) == 1
