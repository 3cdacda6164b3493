"""Collecting and summarising the runs of a sweep directory for :mod:`fish_lightning.app.report`.

Finds the run directories (``results.json`` or ``.hydra/config.yaml``), reads each run into a flat dict, explains
crashed runs (submitit logs), and aggregates the seeds of one setting (:func:`summarize`). No YAML or torch needed.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = "results.json"
SUBMITIT = ".submitit"
CRASHED = "no results.json: the run crashed before writing results"
UNKNOWN = "(unknown)"
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
