"""Rendering a sweep report: the ``summary.md`` text (tables per task, Optuna best trial, failed runs) and the CSV
files, for :mod:`fish_lightning.app.report`."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fish_lightning.app.report_optuna import OPTUNA_RESULTS


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


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
