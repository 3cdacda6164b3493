"""Sweep report for a Hydra multirun: ``fish-report DIR``.

Every training run writes ``results.json`` into its run directory. This module finds them (recursively), aggregates the
seeds of one setting (same task, method and group) and writes ``runs.csv``, ``summary.md``, ``summary.csv``,
``metric_vs_params.png`` and ``anatomy.png`` (one mask-anatomy panel per method × sparsity, from the runs'
``mask_stats.json``). Runs that failed, crashed before writing results, or lack a finite value of the reported
metric are always listed, never dropped. No Hydra, pandas or torch needed.

Layouts read: Hydra's basic and joblib launchers (``DIR/<job num>/``), submitit (the same, plus ``DIR/.submitit/<job
id>/``, whose log files are named for runs that crashed without ``results.json``) and the Optuna sweeper (plus
``DIR/optimization_results.yaml``, whose best trial ``summary.md`` reports).

The parts: :mod:`~fish_lightning.app.report_runs` (collecting and summarising runs),
:mod:`~fish_lightning.app.report_optuna`, :mod:`~fish_lightning.app.report_render` (``summary.md``, CSV) and
:mod:`~fish_lightning.app.report_plots` (figures); their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fish_lightning.app.report_optuna import OPTUNA_RESULTS, read_optuna_results
from fish_lightning.app.report_plots import (
    ANATOMY,
    MASK_STATS,
    PLOT,
    anatomy_panels,
    plot_anatomy,
    plot_metric_vs_params,
)
from fish_lightning.app.report_render import _write_csv, render_markdown
from fish_lightning.app.report_runs import (
    CRASHED,
    RESULTS,
    RUN_COLUMNS,
    SUBMITIT,
    SUMMARY_COLUMNS,
    UNKNOWN,
    collect_runs,
    metric_value,
    summarize,
    unusable_runs,
)

__all__ = [
    "ANATOMY",
    "CRASHED",
    "MASK_STATS",
    "OPTUNA_RESULTS",
    "PLOT",
    "RESULTS",
    "RUN_COLUMNS",
    "SUBMITIT",
    "SUMMARY_COLUMNS",
    "UNKNOWN",
    "Report",
    "ReportError",
    "anatomy_panels",
    "build_report",
    "collect_runs",
    "main",
    "metric_value",
    "plot_anatomy",
    "plot_metric_vs_params",
    "read_optuna_results",
    "render_markdown",
    "summarize",
    "unusable_runs",
    "write_report",
]


class ReportError(ValueError):
    """A sweep directory that cannot be reported on (no runs, unknown metric)."""


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
