"""Sweep report for a Hydra multirun: ``fish-report DIR``.

Every training run writes ``results.json`` into its run directory. This module finds them (recursively), aggregates the
seeds of one setting (same task, method and group) and writes ``runs.csv``, ``summary.md``, ``summary.csv``,
``metric_vs_params.png`` and ``anatomy.png`` (one mask-anatomy panel per method × sparsity, from the runs'
``mask_stats.json``). Runs that failed, crashed before writing results, or lack a finite value of the reported
metric are always listed, never dropped. No Hydra, pandas or torch needed.

Layouts read: Hydra's basic and joblib launchers (``DIR/<job num>/``), submitit (the same, plus ``DIR/.submitit/<job
id>/``, whose log files are named for runs that crashed without ``results.json``) and the Optuna sweeper (plus
``DIR/optimization_results.yaml``, whose best trial ``summary.md`` reports).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = "results.json"
OPTUNA_RESULTS = "optimization_results.yaml"
SUBMITIT = ".submitit"
CRASHED = "no results.json: the run crashed before writing results"
UNKNOWN = "(unknown)"
PLOT = "metric_vs_params.png"
ANATOMY = "anatomy.png"
MASK_STATS = "mask_stats.json"
RUN_COLUMNS = [
    "run_dir",
    "status",
    "error",
    "task",
    "method",
    "group",
    "sparsity",
    "seed",
    "trainable_params",
    "candidates",
    "kept",
    "primary_metric",
    "metric_value",
    "wall_time_s",
]
SUMMARY_COLUMNS = [
    "task",
    "method",
    "group",
    "metric",
    "trainable_params",
    "trainable_params_min",
    "trainable_params_max",
    "n",
    "mean",
    "std",
    "wall_time_mean",
]


class ReportError(ValueError):
    """A sweep directory that cannot be reported on (no runs, unknown metric)."""


# ---------------------------------------------------------------------------------------------------------------------
# Collecting runs


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _as_int(value: Any) -> int | None:
    number = _as_float(value)
    return int(number) if number is not None and number.is_integer() else None


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _natural_key(text: str) -> list[tuple[int, int, str]]:
    """Sort key putting ``2`` before ``10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def _read_overrides(run_dir: Path) -> list[str]:
    """The overrides Hydra saved in ``.hydra/overrides.yaml`` (a YAML list of strings), parsed without YAML."""
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    items = [line[2:].strip() for line in lines if line.startswith("- ")]
    return [s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s for s in items]


def _find_run_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding ``results.json`` or ``.hydra/config.yaml``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".hydra", SUBMITIT)]
        here = Path(dirpath)
        if RESULTS in filenames or (here / ".hydra" / "config.yaml").is_file():
            found.append(here)
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def _load_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One run as a flat dict (``RUN_COLUMNS`` plus ``metrics`` and ``overrides``); problems become ``failed``."""
    run: dict[str, Any] = dict.fromkeys(RUN_COLUMNS)
    run.update(run_dir=run_dir.relative_to(root).as_posix(), metrics={}, overrides=_read_overrides(run_dir))
    path = run_dir / RESULTS
    if not path.is_file():
        return {**run, "status": "failed", "error": CRASHED + _submitit_hint(run_dir, root)}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return {**run, "status": "failed", "error": f"invalid results.json: {type(e).__name__}: {e}"}
    if not isinstance(data, dict):
        return {**run, "status": "failed", "error": f"invalid results.json: not an object but {type(data).__name__}"}

    metrics = data.get("metrics")
    metrics = {str(k): _as_float(v) for k, v in metrics.items()} if isinstance(metrics, dict) else {}
    overrides = data.get("overrides")
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else run["overrides"]
    group = _as_str(data.get("group"))
    if group is None and overrides:
        group = " ".join(sorted(o for o in overrides if not o.lstrip("+~").startswith("seed=")))
    status = "ok" if data.get("status") == "ok" else "failed"
    error = _as_str(data.get("error"))
    if status == "failed" and not error:
        error = f"status {data.get('status')!r} without an error message"
    primary = _as_str(data.get("primary_metric"))
    run.update(
        status=status,
        error=error,
        task=_as_str(data.get("task")),
        method=_as_str(data.get("method")),
        group=group,
        sparsity=_as_float(data.get("sparsity")),
        seed=_as_int(data.get("seed")),
        trainable_params=_as_int(data.get("trainable_params")),
        candidates=_as_int(data.get("candidates")),
        kept=_as_int(data.get("kept")),
        primary_metric=primary,
        metric_value=metrics.get(primary) if primary else None,
        wall_time_s=_as_float(data.get("wall_time_s")),
        metrics=metrics,
        overrides=overrides,
    )
    return run


def _hydra_job_id(run_dir: Path) -> str | None:
    """``hydra.job.id`` from ``.hydra/hydra.yaml`` (the submitit job id under the submitit launchers), without YAML."""
    try:
        lines = (run_dir / ".hydra" / "hydra.yaml").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    in_job = False
    for line in lines:
        if line.startswith("  ") and not line.startswith("   "):  # a key of the `hydra:` mapping
            in_job = line.rstrip() == "  job:"
        elif in_job and line.startswith("    id:"):
            value = line.split(":", 1)[1].strip().strip("'\"")
            return value if re.fullmatch(r"[\w.\-]+", value) else None
    return None


def _submitit_hint(run_dir: Path, root: Path) -> str:
    """``"; submitit log <path>: <last line>"`` for a run launched by submitit, else ``""``."""
    job_id = _hydra_job_id(run_dir)
    if job_id is None:
        return ""
    for base in (run_dir, *run_dir.parents):
        folder = base / SUBMITIT / job_id
        if folder.is_dir():
            logs = sorted(folder.glob("*_log.err")) or sorted(folder.glob("*_log.out"))
            if not logs:
                return f"; submitit job {job_id}: no log file in {folder}"
            try:
                text = logs[0].read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "(empty)")
            shown = logs[0].relative_to(root) if logs[0].is_relative_to(root) else logs[0]
            return f"; submitit log {shown.as_posix()}: {last[:300]}"
        if base == root:
            break
    return ""


def _override_dict(overrides: Sequence[str]) -> dict[str, str]:
    return {k.lstrip("+~"): v for k, _, v in (o.partition("=") for o in overrides)}


def _same_value(a: Any, b: Any) -> bool:
    fa, fb = _as_float(a), _as_float(b)
    if fa is not None and fb is not None:
        return math.isclose(fa, fb, rel_tol=1e-9, abs_tol=0.0)
    return str(a) == str(b)


def read_optuna_results(dir: str | os.PathLike[str], runs: Sequence[dict[str, Any]] = ()) -> dict[str, Any] | None:
    """The Optuna sweeper's ``optimization_results.yaml`` in ``dir``, or ``None`` when there is none.

    Single objective: ``{"best_value": float, "best_params": {name: value}, "run_dirs": [...]}``, ``run_dirs`` being
    the ``runs`` whose overrides hold exactly these values. Several objectives: ``{"solutions": [{"values": [...],
    "params": {...}}, ...]}``. An unreadable file gives ``{"error": message}``.
    """
    path = Path(dir) / OPTUNA_RESULTS
    if not path.is_file():
        return None
    try:
        import yaml  # PyYAML, installed with hydra-core/omegaconf

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as e:  # a missing PyYAML, bad YAML or encoding: reported, never fatal
        return {"error": f"cannot read {OPTUNA_RESULTS}: {type(e).__name__}: {e}"}
    if not isinstance(data, dict):
        return {"error": f"{OPTUNA_RESULTS} is not a mapping"}
    if isinstance(data.get("best_params"), dict):
        best = {str(k): v for k, v in data["best_params"].items()}
        matched = [
            r["run_dir"]
            for r in runs
            if all(k in (ov := _override_dict(r.get("overrides") or [])) and _same_value(ov[k], v)
                   for k, v in best.items())
        ]  # fmt: skip
        return {"best_value": _as_float(data.get("best_value")), "best_params": best, "run_dirs": matched}
    if isinstance(data.get("solutions"), list):
        return {"solutions": [s for s in data["solutions"] if isinstance(s, dict)]}
    return {"error": f"{OPTUNA_RESULTS} has neither best_params nor solutions"}


def _optuna_markdown(optuna: dict[str, Any]) -> list[str]:
    lines = ["## Optuna", ""]
    if "error" in optuna:
        return [*lines, optuna["error"], ""]
    if "solutions" in optuna:
        lines.append(f"Pareto front ({len(optuna['solutions'])} trial(s), from `{OPTUNA_RESULTS}`):")
        lines.append("")
        for sol in optuna["solutions"]:
            params = ", ".join(f"{k}={v}" for k, v in (sol.get("params") or {}).items())
            lines.append(f"- values {sol.get('values')}: {_cell(params)}")
        return [*lines, ""]
    value = optuna["best_value"]
    params = ", ".join(f"`{k}={v}`" for k, v in optuna["best_params"].items())
    where = ", ".join(f"`{d}`" for d in optuna["run_dirs"]) or "(no run directory with these overrides found)"
    shown = "n/a" if value is None else f"{value:.4f}"
    return [*lines, f"Best trial (from `{OPTUNA_RESULTS}`): value {shown} with {params}; run {where}.", ""]


def collect_runs(dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every run under ``dir`` (recursively, naturally sorted by path), ok and failed.

    A run is a directory holding ``results.json``, or a ``.hydra/config.yaml`` without one (a crashed run). Each run is
    a dict with the ``runs.csv`` columns (``RUN_COLUMNS``) plus ``metrics`` (name -> float) and ``overrides``; a
    missing or unparsable ``results.json`` gives ``status="failed"`` with the reason in ``error``.
    """
    root = Path(dir)
    if not root.exists():
        raise FileNotFoundError(f"directory does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    return [_load_run(run_dir, root) for run_dir in _find_run_dirs(root)]


# ---------------------------------------------------------------------------------------------------------------------
# Aggregating


def metric_value(run: dict[str, Any], metric: str | None = None) -> tuple[float | None, str | None]:
    """``(value, None)`` for ``metric`` (default: the run's primary metric), or ``(None, reason)`` if unusable."""
    name = metric or run.get("primary_metric")
    if not name:
        return None, "no primary_metric in results.json"
    value = run.get("metrics", {}).get(name)
    if value is None:
        return None, f"metric {name!r} missing from metrics"
    if not math.isfinite(value):
        return None, f"metric {name!r} is {value}"
    return value, None


def unusable_runs(runs: Sequence[dict[str, Any]], metric: str | None = None) -> list[tuple[dict[str, Any], str]]:
    """Runs with status ok but no finite value of ``metric``: ``(run, reason)`` pairs, left out of :func:`summarize`."""
    out = []
    for run in runs:
        if run["status"] == "ok":
            value, reason = metric_value(run, metric)
            if value is None:
                out.append((run, reason or "no value"))
    return out


def summarize(runs: Sequence[dict[str, Any]], metric: str | None = None) -> list[dict[str, Any]]:
    """Aggregate the seeds of each (task, method, group) setting over the ok runs with a finite metric value.

    Rows have the ``SUMMARY_COLUMNS`` keys (``trainable_params`` is ``None`` unless all seeds agree; ``std`` is the
    sample std, ``None`` for one seed) plus ``seeds``, ``run_dirs`` and ``notes``. Sorted by task, method, trainable
    parameters, group.
    """
    groups: dict[tuple[str, str, str, str], list[tuple[dict[str, Any], float]]] = {}
    for run in runs:
        value, _ = metric_value(run, metric) if run["status"] == "ok" else (None, None)
        if value is None:
            continue
        key = (run["task"] or UNKNOWN, run["method"] or UNKNOWN, run["group"] or "", metric or run["primary_metric"])
        groups.setdefault(key, []).append((run, value))

    rows = []
    for (task, method, group, name), members in groups.items():
        values = [v for _, v in members]
        params = sorted({r["trainable_params"] for r, _ in members if r["trainable_params"] is not None})
        walls = [
            r["wall_time_s"] for r, _ in members if r["wall_time_s"] is not None and math.isfinite(r["wall_time_s"])
        ]
        seeds = [r["seed"] for r, _ in members]
        notes = []
        if len(params) > 1:
            notes.append(f"trainable params differ across seeds ({params[0]:,}–{params[-1]:,})")
        n_missing = sum(r["trainable_params"] is None for r, _ in members)
        if n_missing:
            notes.append(f"trainable params missing in {n_missing} of {len(members)} run(s)")
        known = [s for s in seeds if s is not None]
        if len(set(known)) < len(known):
            dup = sorted({s for s in known if known.count(s) > 1})
            notes.append(f"duplicate seeds {dup}: the std is not over independent seeds")
        rows.append(
            {
                "task": task,
                "method": method,
                "group": group,
                "metric": name,
                "trainable_params": params[0] if len(params) == 1 else None,
                "trainable_params_min": params[0] if params else None,
                "trainable_params_max": params[-1] if params else None,
                "n": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "wall_time_mean": statistics.fmean(walls) if walls else None,
                "seeds": seeds,
                "run_dirs": [r["run_dir"] for r, _ in members],
                "notes": notes,
            }
        )
    rows.sort(
        key=lambda r: (
            r["task"],
            r["method"],
            r["trainable_params_min"] is None,
            r["trainable_params_min"] or 0,
            r["group"],
            r["metric"],
        )
    )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _params_cell(row: dict[str, Any]) -> str:
    if row["trainable_params"] is not None:
        return f"{row['trainable_params']:,}"
    if row["trainable_params_min"] is not None:
        return f"{row['trainable_params_min']:,}–{row['trainable_params_max']:,} †"
    return "n/a"


def _metric_cell(row: dict[str, Any]) -> str:
    std = "n/a" if row["std"] is None else f"{row['std']:.4f}"
    return f"{row['mean']:.4f} ± {std}"


def _run_label(run: dict[str, Any]) -> str:
    overrides = " ".join(run.get("overrides") or [])
    return f"`{run['run_dir']}`" + (f" (`{overrides}`)" if overrides else "")


def render_markdown(
    root: Path,
    runs: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    unusable: Sequence[tuple[dict[str, Any], str]] = (),
    optuna: dict[str, Any] | None = None,
) -> str:
    """The ``summary.md`` text: tables per task, notes, the Optuna best trial, then the failed (and unusable) runs."""
    failed = [r for r in runs if r["status"] != "ok"]
    head = f"{len(runs)} run(s): {len(runs) - len(failed)} ok, {len(failed)} failed"
    if unusable:
        head += f", {len(unusable)} ok without a usable metric value"
    lines = ["# Sweep report", "", f"Directory: `{root}`", "", head + ".", ""]
    if not rows:
        lines += ["No successful run with a metric value: nothing to summarize.", ""]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        names = sorted({r["metric"] for r in task_rows})
        header = f"{names[0]} (mean ± std)" if len(names) == 1 else "metric (mean ± std)"
        lines += [
            f"## {task}",
            "",
            f"| method | setting | trainable params | n seeds | {_cell(header)} | mean wall time (s) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        notes = []
        for r in task_rows:
            value = _metric_cell(r) if len(names) == 1 else f"{r['metric']}: {_metric_cell(r)}"
            wall = "n/a" if r["wall_time_mean"] is None else f"{r['wall_time_mean']:.1f}"
            setting = r["group"] or "(default)"
            lines.append(
                f"| {_cell(r['method'])} | {_cell(setting)} | {_params_cell(r)} | {r['n']} | {_cell(value)} | {wall} |"
            )
            notes += [f"- {r['method']} / {setting}: {note}" for note in r["notes"]]
        lines.append("")
        if notes:
            lines += ["Notes:", "", *notes, ""]

    if optuna is not None:
        lines += _optuna_markdown(optuna)
    lines += ["## Failed runs", ""]
    lines += [f"- {_run_label(r)}: {_cell(r['error'])}" for r in failed] or ["none"]
    lines.append("")
    if unusable:
        lines += ["## Ok runs without a usable metric value", ""]
        lines += [f"- {_run_label(r)}: {reason}" for r, reason in unusable]
        lines.append("")
    return "\n".join(lines)


def plot_metric_vs_params(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> bool:
    """Plot mean metric (± std over seeds) vs trainable parameters (log x), one subplot per task, one line per method.

    When seeds disagree on the parameter count the point sits at the middle of the range. Points without a positive
    parameter count cannot go on a log axis and are left out. Returns ``False`` (nothing written) if no point remains.
    """
    points = [r for r in rows if (r["trainable_params_min"] or 0) > 0]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in points})
    ncols = min(len(tasks), 3)
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        task_points = [r for r in points if r["task"] == task]
        names = sorted({r["metric"] for r in task_points})
        for method, name in sorted({(r["method"], r["metric"]) for r in task_points}):
            series = [r for r in task_points if r["method"] == method and r["metric"] == name]
            series.sort(key=lambda r: (r["trainable_params_min"] + r["trainable_params_max"]) / 2)
            xs = [(r["trainable_params_min"] + r["trainable_params_max"]) / 2 for r in series]
            ys = [r["mean"] for r in series]
            errs = [r["std"] or 0.0 for r in series]
            label = method if len(names) == 1 else f"{method} ({name})"
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"{names[0]} (mean ± std over seeds)" if len(names) == 1 else "metric (mean ± std over seeds)")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _read_anatomy(run_dir: Path) -> dict[str, Any] | None:
    """The ``anatomy`` grid of ``run_dir/mask_stats.json``, or ``None`` (no FISH mask, an older or unreadable file)."""
    try:
        anatomy = json.loads((run_dir / MASK_STATS).read_text(encoding="utf-8")).get("anatomy")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    keys = ("layers", "kinds", "kept", "total")
    return anatomy if isinstance(anatomy, dict) and all(isinstance(anatomy.get(k), list) for k in keys) else None


def _merge_anatomies(grids: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Kept and total summed over seeds (density = their ratio), when the grids agree on layers and kinds; else the
    first grid."""
    first = grids[0]
    same = [g for g in grids if g["layers"] == first["layers"] and g["kinds"] == first["kinds"]]
    shape = range(len(first["layers"])), range(len(first["kinds"]))
    kept, total = ([[sum(g[key][i][j] for g in same) for j in shape[1]] for i in shape[0]] for key in ("kept", "total"))
    density = [[k / t if t else None for k, t in zip(rk, rt)] for rk, rt in zip(kept, total)]
    return {"layers": first["layers"], "kinds": first["kinds"], "kept": kept, "total": total, "density": density,
            "n": len(same)}  # fmt: skip


def anatomy_panels(root: Path, runs: Sequence[dict[str, Any]]) -> list[list[tuple[str, dict[str, Any]]]]:
    """Mask-anatomy panels of the ok runs with a ``mask_stats.json`` anatomy: one row per task, method and setting
    (the group without ``fish.sparsity``), one column per sparsity; the seeds of a panel are summed."""
    cells: dict[tuple[str, str, str], dict[float | None, list[dict[str, Any]]]] = {}
    for run in runs:
        if run["status"] != "ok":
            continue
        anatomy = _read_anatomy(root / run["run_dir"])
        if anatomy is None:
            continue
        rest = " ".join(t for t in (run["group"] or "").split() if not t.lstrip("+~").startswith("fish.sparsity="))
        key = (run["task"] or UNKNOWN, run["method"] or UNKNOWN, rest)
        cells.setdefault(key, {}).setdefault(run["sparsity"], []).append(anatomy)
    rows = []
    for task, method, rest in sorted(cells):
        row = []
        by_sparsity = cells[(task, method, rest)]
        for sparsity in sorted(by_sparsity, key=lambda s: (s is None, s or 0.0)):
            merged = _merge_anatomies(by_sparsity[sparsity])
            kept = sum(map(sum, merged["kept"]))
            total = sum(map(sum, merged["total"]))
            head = f"{task} · {method} · sparsity {'n/a' if sparsity is None else f'{sparsity:g}'}"
            setting = f"\n{rest}" if rest else ""
            density = f"{kept / total:.3g}" if total else "n/a"
            row.append((f"{head}{setting}\nkept {kept:,} of {total:,} (density {density}), {merged['n']} seed(s)",
                        merged))  # fmt: skip
        rows.append(row)
    return rows


def plot_anatomy(root: Path, runs: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> bool:
    """Write :func:`anatomy_panels` side by side to ``path``; ``False`` (nothing written) when no run has one."""
    panels = anatomy_panels(root, runs)
    if not panels:
        return False
    from fish_lightning.app import anatomy_plot  # matplotlib only, no torch

    anatomy_plot.write_anatomy_panels(panels, path)
    return True


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------------------------------
# Entry points


@dataclass
class Report:
    """Everything :func:`build_report` produced."""

    root: Path
    runs: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    unusable: list[tuple[dict[str, Any], str]]
    markdown: str
    paths: dict[str, Path] = field(default_factory=dict)
    plot_skipped: str | None = None
    optuna: dict[str, Any] | None = None


def build_report(
    dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, metric: str | None = None
) -> Report:
    """Collect, summarize and write all report files into ``out`` (default ``dir``).

    Raises ``FileNotFoundError``/``NotADirectoryError`` for a bad ``dir`` and :class:`ReportError` when ``dir`` holds no
    run or ``metric`` is not a metric of any ok run. Nothing is written in those cases.
    """
    root = Path(dir)
    runs = collect_runs(root)
    if not runs:
        raise ReportError(f"no runs found in {root}: no results.json or .hydra/config.yaml anywhere under it")
    if metric is not None:
        valid = sorted({k for r in runs if r["status"] == "ok" for k in r["metrics"]})
        if metric not in valid:
            raise ReportError(
                f"metric {metric!r} is not reported by any ok run in {root}; "
                f"valid metrics: {', '.join(valid) if valid else '(none: no run succeeded)'}"
            )
    rows = summarize(runs, metric)
    unusable = unusable_runs(runs, metric)
    optuna = read_optuna_results(root, runs)
    markdown = render_markdown(root, runs, rows, unusable, optuna)

    out_dir = Path(out) if out is not None else root
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_keys = sorted({k for r in runs for k in r["metrics"]})
    columns = RUN_COLUMNS + [f"metrics.{k}" if k in RUN_COLUMNS else k for k in metric_keys]
    csv_rows = [
        {**r, **{(f"metrics.{k}" if k in RUN_COLUMNS else k): v for k, v in r["metrics"].items()}} for r in runs
    ]
    report = Report(root, runs, rows, unusable, markdown, optuna=optuna)
    report.paths["runs.csv"] = out_dir / "runs.csv"
    _write_csv(report.paths["runs.csv"], columns, csv_rows)
    report.paths["summary.md"] = out_dir / "summary.md"
    report.paths["summary.md"].write_text(markdown, encoding="utf-8")
    report.paths["summary.csv"] = out_dir / "summary.csv"
    _write_csv(report.paths["summary.csv"], SUMMARY_COLUMNS, rows)
    if not rows:
        report.plot_skipped = "no successful run with a metric value"
    elif plot_metric_vs_params(rows, out_dir / PLOT):
        report.paths[PLOT] = out_dir / PLOT
    else:
        report.plot_skipped = "no successful run reports trainable_params"
    if plot_anatomy(root, runs, out_dir / ANATOMY):
        report.paths[ANATOMY] = out_dir / ANATOMY
    return report


def write_report(
    dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, metric: str | None = None
) -> dict[str, Path]:
    """Write ``runs.csv``, ``summary.md``, ``summary.csv`` and (when plottable) the plot; return name -> path."""
    return build_report(dir, out, metric).paths


def main(argv: list[str] | None = None) -> int:
    """``fish-report DIR [--out OUTDIR] [--metric NAME]``: 0 if some run could be summarized, else 1."""
    parser = argparse.ArgumentParser(
        prog="fish-report", description="Summarize a Hydra multirun of FISH-Tuning runs (results.json per run)."
    )
    parser.add_argument("dir", help="sweep directory, searched recursively for run directories")
    parser.add_argument("--out", default=None, help="directory for the report files (default: DIR)")
    parser.add_argument("--metric", default=None, help="metric to report instead of each run's primary_metric")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.dir, args.out, args.metric)
    except (ReportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    print(report.markdown)
    for path in report.paths.values():
        print(f"wrote {path}")
    if report.plot_skipped:
        print(f"skipped {PLOT}: {report.plot_skipped}")
    n_failed = sum(r["status"] != "ok" for r in report.runs)
    if n_failed:
        print(f"{n_failed} failed run(s): see summary.md")
    if report.unusable:
        print(f"{len(report.unusable)} ok run(s) without a usable metric value: see summary.md")
    if not report.rows:
        print(f"error: no successful run with a metric value in {report.root}", file=sys.stderr)
        return 1
    return 0
