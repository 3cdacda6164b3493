"""The report's figures: mean metric vs trainable parameters (``metric_vs_params.png``) and the mask-anatomy panels
of the runs' ``mask_stats.json`` (``anatomy.png``), for :mod:`fish_lightning.app.report`. matplotlib only, no torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fish_lightning.app.report_runs import UNKNOWN

PLOT = "metric_vs_params.png"
ANATOMY = "anatomy.png"
MASK_STATS = "mask_stats.json"


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


def anatomy_panels(
    root: Path, runs: Sequence[dict[str, Any]]
) -> list[list[tuple[str, dict[str, Any] | None]]]:
    """Mask-anatomy panels of the ok runs with a ``mask_stats.json`` anatomy, each titled with task, method,
    sparsity, the settings that tell it apart and the kept count; the seeds of a panel are summed.

    A sweep over sparsity: one row per task, method and setting (the group without ``fish.sparsity``), one column
    per sparsity. Runs with one sparsity each (e.g. a budget-matched study): one row per task, one column per
    method, so the panels form a grid instead of one long column."""
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
    common = set.intersection(*(set(rest.split()) for _, _, rest in cells)) if len(cells) > 1 else set()
    titled: dict[tuple[str, str, str], list[tuple[str, dict[str, Any] | None]]] = {}
    for task, method, rest in sorted(cells):
        row: list[tuple[str, dict[str, Any] | None]] = []
        by_sparsity = cells[(task, method, rest)]
        named = {f"data={task}", f"fish={method.rsplit('+', 1)[-1]}"}  # already in the title's first line
        setting = " ".join(t for t in rest.split() if t not in common and t not in named)
        for sparsity in sorted(by_sparsity, key=lambda s: (s is None, s or 0.0)):
            merged = _merge_anatomies(by_sparsity[sparsity])
            kept = sum(map(sum, merged["kept"]))
            total = sum(map(sum, merged["total"]))
            head = f"{task} · {method} · sparsity {'n/a' if sparsity is None else f'{sparsity:g}'}"
            density = f"{kept / total:.3g}" if total else "n/a"
            seeds = f", {merged['n']} seeds" if merged["n"] > 1 else ""
            lines = [head, setting, f"kept {kept:,} of {total:,} (density {density}){seeds}"]
            row.append(("\n".join(line for line in lines if line), merged))
        titled[(task, method, rest)] = row
    rows = list(titled.values())
    pairs = [(task, method) for task, method, _ in titled]
    if len(rows) > 1 and all(len(row) == 1 for row in rows) and len(set(pairs)) == len(pairs):
        tasks = sorted({t for t, _ in pairs})
        methods = sorted({m for _, m in pairs})
        by_pair = {pair: row[0] for pair, row in zip(pairs, rows)}
        rows = [[by_pair.get((t, m), ("", None)) for m in methods] for t in tasks]
    return rows


def plot_anatomy(root: Path, runs: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> bool:
    """Write :func:`anatomy_panels` side by side to ``path``; ``False`` (nothing written) when no run has one."""
    panels = anatomy_panels(root, runs)
    if not panels:
        return False
    from fish_lightning.app import anatomy_plot  # matplotlib only, no torch

    anatomy_plot.write_anatomy_panels(panels, path)
    return True
