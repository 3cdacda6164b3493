"""The sweep report (``fish-report``) on synthetic Hydra multirun directories."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fish_lightning.app.report import CRASHED, collect_runs, main, summarize, write_report

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACC = {("lora+fisher", 0.5): 0.84, ("lora+fisher", 0.9): 0.80, ("lora+random", 0.5): 0.78, ("lora+random", 0.9): 0.70}


def make_run(root: Path, name: str, results: dict | str | None, overrides: list[str] = ()) -> Path:
    """A Hydra run dir: ``.hydra/config.yaml`` + ``overrides.yaml``, and ``results.json`` unless ``results`` is None."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (run / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return run


def results(method: str, sparsity: float | None, seed: int, acc: float, task: str = "sst2", **extra) -> dict:
    group = f"fish.sparsity={sparsity} peft=lora"
    params = round(100_000 * (1 - sparsity)) if sparsity is not None else 100_000
    out = {
        "status": "ok",
        "error": None,
        "task": task,
        "method": method,
        "group": group,
        "sparsity": sparsity,
        "seed": seed,
        "trainable_params": params,
        "candidates": 100_000,
        "kept": params,
        "metrics": {"val/accuracy": acc, "val/loss": 1 - acc},
        "primary_metric": "val/accuracy",
        "wall_time_s": 10.0 + seed,
        "overrides": [*group.split(), f"seed={seed}"],
    }
    out.update(extra)
    return out


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 methods x 2 sparsities x 2 seeds = 8 runs in ``multirun/0`` .. ``multirun/7``; seed 1 adds 0.02 accuracy."""
    root = tmp_path / "multirun"
    i = 0
    for (method, sparsity), acc in ACC.items():
        for seed in (0, 1):
            make_run(root, str(i), results(method, sparsity, seed, acc + 0.02 * seed))
            i += 1
    return root


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row] for row in rows[1:]]  # drop the header


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_2x2(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep)]) == 0
    stdout = capsys.readouterr().out
    summary = (sweep / "summary.md").read_text()
    assert summary in stdout and f"wrote {sweep / 'runs.csv'}" in stdout and "failed run(s)" not in stdout

    rows = table_rows(summary)
    assert len(rows) == 4
    # Sorted by method, then trainable params (sparsity 0.9 -> 10,000 before 0.5 -> 50,000).
    assert [(r[0], r[2]) for r in rows] == [
        ("lora+fisher", "10,000"),
        ("lora+fisher", "50,000"),
        ("lora+random", "10,000"),
        ("lora+random", "50,000"),
    ]
    assert "val/accuracy (mean ± std)" in summary
    std = statistics.stdev([0.80, 0.82])
    assert rows[0] == ["lora+fisher", "fish.sparsity=0.9 peft=lora", "10,000", "2", f"0.8100 ± {std:.4f}", "10.5"]
    assert "## Failed runs\n\nnone" in summary

    agg = read_csv(sweep / "summary.csv")
    assert len(agg) == 4 and agg[0]["task"] == "sst2" and agg[0]["trainable_params"] == "10000"
    assert float(agg[0]["mean"]) == pytest.approx(0.81) and float(agg[0]["std"]) == pytest.approx(std)

    runs = read_csv(sweep / "runs.csv")
    assert len(runs) == 8 and {r["status"] for r in runs} == {"ok"}
    assert [r["run_dir"] for r in runs] == [str(i) for i in range(8)]
    assert list(runs[0])[-3:] == ["wall_time_s", "val/accuracy", "val/loss"]
    assert float(runs[1]["metric_value"]) == pytest.approx(0.86) == float(runs[1]["val/accuracy"])

    png = (sweep / "metric_vs_params.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_failed_and_crashed_runs_are_listed(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(sweep, "8", results("lora+fisher", 0.9, 2, 0.0, status="failed", error="ValueError: boom", metrics=None))
    make_run(sweep, "9", None, overrides=["fish.sparsity=0.5", "seed=3"])
    make_run(sweep, "10", "{not json")
    make_run(sweep, "11", results("lora+fisher", 0.9, 4, float("nan")))  # diverged: ok but NaN metric
    assert main([str(sweep)]) == 0
    stdout = capsys.readouterr().out
    assert "3 failed run(s): see summary.md" in stdout

    summary = (sweep / "summary.md").read_text()
    assert len(table_rows(summary)) == 4  # the NaN run does not enter the mean
    failed = summary.split("## Failed runs")[1]
    assert "`8` (`fish.sparsity=0.9 peft=lora seed=2`): ValueError: boom" in failed
    assert f"`9` (`fish.sparsity=0.5 seed=3`): {CRASHED}" in failed
    assert "`10`: invalid results.json: JSONDecodeError" in failed
    assert "`11`" in failed.split("## Ok runs without a usable metric value")[1]

    runs = {r["run_dir"]: r for r in read_csv(sweep / "runs.csv")}
    assert len(runs) == 12
    assert (runs["8"]["status"], runs["8"]["error"], runs["8"]["metric_value"]) == ("failed", "ValueError: boom", "")
    assert (runs["9"]["status"], runs["9"]["error"]) == ("failed", CRASHED)
    assert runs["10"]["status"] == "failed" and runs["11"]["status"] == "ok"


def test_all_failed_writes_report_but_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path, "0", {"status": "failed", "error": "RuntimeError: CUDA OOM"})
    make_run(tmp_path, "1", None)
    assert main([str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "skipped metric_vs_params.png" in captured.out and "2 failed run(s)" in captured.out
    assert "no successful run" in captured.err
    summary = (tmp_path / "summary.md").read_text()
    assert "`0`: RuntimeError: CUDA OOM" in summary and CRASHED in summary
    assert not (tmp_path / "metric_vs_params.png").exists()
    assert len(read_csv(tmp_path / "runs.csv")) == 2 and read_csv(tmp_path / "summary.csv") == []


def test_missing_and_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main([str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main([str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no runs found" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "empty" / "summary.md").exists()


def test_metric_option(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep), "--metric", "val/f1"]) == 1
    err = capsys.readouterr().err
    assert "'val/f1'" in err and "val/accuracy, val/loss" in err

    out = tmp_path / "report"
    assert main([str(sweep), "--metric", "val/loss", "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "val/loss (mean ± std)" in summary and not (sweep / "summary.md").exists()
    assert table_rows(summary)[0][4] == f"0.1900 ± {statistics.stdev([0.20, 0.18]):.4f}"


def test_single_seed_tasks_and_nested_dirs(tmp_path: Path) -> None:
    """One point per method, n=1 (std n/a), two tasks, runs at different depths, no params -> still reported."""
    make_run(tmp_path, "2024-01-01/12-00-00/0", results("lora", None, 0, 0.9))
    make_run(tmp_path, "2024-01-01/12-00-00/1", results("lora+fisher", 0.9, 0, 0.8))
    make_run(tmp_path, "other/0", results("full", None, 0, 0.5, task="rte", trainable_params=None))
    make_run(tmp_path, "other/1", results("lora", None, 0, 0.6, task="rte"))
    runs = collect_runs(tmp_path)
    assert [r["run_dir"] for r in runs] == ["2024-01-01/12-00-00/0", "2024-01-01/12-00-00/1", "other/0", "other/1"]
    rows = summarize(runs)
    assert [(r["task"], r["method"], r["n"], r["std"]) for r in rows] == [
        ("rte", "full", 1, None),
        ("rte", "lora", 1, None),
        ("sst2", "lora", 1, None),
        ("sst2", "lora+fisher", 1, None),
    ]
    paths = write_report(tmp_path)
    summary = paths["summary.md"].read_text()
    assert "## rte" in summary and "## sst2" in summary and "0.9000 ± n/a" in summary
    assert "| full | fish.sparsity=None peft=lora | n/a | 1 |" in summary
    assert paths["metric_vs_params.png"].read_bytes().startswith(PNG_SIGNATURE)


def test_script_wrapper(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), str(sweep), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| lora+fisher |" in proc.stdout and f"wrote {out / 'summary.md'}" in proc.stdout
    assert (out / "metric_vs_params.png").read_bytes().startswith(PNG_SIGNATURE)


# ------------------------------------------------------------------ mask anatomy panels
def _anatomy(kept_per_cell: list[list[int]], total: int = 100) -> dict:
    layers = [*range(len(kept_per_cell) - 1), None]
    kinds = ["attention.query.lora_A", "attention.value.lora_B"]
    totals = [[total] * len(kinds) for _ in layers]
    density = [[k / total for k in row] for row in kept_per_cell]
    return {"layers": layers, "kinds": kinds, "kept": kept_per_cell, "total": totals, "density": density}


def test_anatomy_panel_per_method_and_sparsity_from_mask_stats(sweep: Path, tmp_path: Path) -> None:
    from fish_lightning.app.report import ANATOMY, anatomy_panels

    runs = collect_runs(sweep)
    for run in runs:  # seed s keeps s more entries in the first cell: a panel sums its seeds
        grid = [[10 + run["seed"], 50], [0, 90], [5, 5]]
        (sweep / run["run_dir"] / "mask_stats.json").write_text(json.dumps({"kept": 0, "anatomy": _anatomy(grid)}))
    (sweep / "0" / "mask_stats.json").unlink()  # a run without one (fish=off, an old run) is left out
    panels = anatomy_panels(sweep, runs)
    assert [[title.splitlines()[0] for title, _ in row] for row in panels] == [
        [f"sst2 · {m} · sparsity {s}" for s in (0.5, 0.9)] for m in ("lora+fisher", "lora+random")
    ]
    (_, first), (_, second) = panels[0]
    assert first["n"] == 1 and second["n"] == 2 and second["kept"][0] == [21, 100] and second["total"][0] == [200, 200]
    assert second["density"][0][0] == pytest.approx(21 / 200) and "2 seeds" in panels[0][1][0]
    paths = write_report(sweep, tmp_path / "out")
    png = paths[ANATOMY].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_report_without_mask_stats_writes_no_anatomy(sweep: Path) -> None:
    assert "anatomy.png" not in write_report(sweep) and not (sweep / "anatomy.png").exists()


def test_anatomy_plot_needs_no_torch(sweep: Path, tmp_path: Path) -> None:
    for run in collect_runs(sweep):
        (sweep / run["run_dir"] / "mask_stats.json").write_text(json.dumps({"anatomy": _anatomy([[1, 2], [3, 4]])}))
    code = (
        "import sys; from fish_lightning.app.report import main; rc = main([sys.argv[1], '--out', sys.argv[2]]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(sweep), str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "o" / "anatomy.png").read_bytes().startswith(PNG_SIGNATURE)
