"""The report's figures: mean metric vs trainable parameters (``metric_vs_params.png``) and the mask-anatomy panels
of the runs' ``mask_stats.json`` (``anatomy.png``), for :mod:`fish_lightning.app.report`. matplotlib only, no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fish_lightning.app.report_runs import UNKNOWN

PLOT = "metric_vs_params.png"
ANATOMY = "anatomy.png"
MASK_STATS = "mask_stats.json"


#: overrides that move a run along the budget axis: a curve joins runs that differ only in these (and the seed)
BUDGET_KEYS = ("fish.sparsity", "peft.r", "budget.r", "budget.kept")
#: overrides the line's name already says (``lora-r8+fisher``: the peft method and the selection)
NAMED_KEYS = ("peft", "fish", "fish.selection")
_VANILLA_RANK = re.compile(r"(?P<family>.+)-r(?P<r>\d+)")
_MARKERS = "osD^vP*Xhp<>"


def _tokens(group: str | None) -> list[str]:
    out = []
    for token in (group or "").split():
        key = token.lstrip("+~").split("=", 1)[0]
        if key not in BUDGET_KEYS and key not in NAMED_KEYS and key != "seed":
            out.append(token)
    return out


def curve_lines(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The lines of :func:`plot_metric_vs_params`, per task: ``{"label", "kind", "points"}``, points sorted by x.

    A line joins the summary rows of one method whose settings differ only along the budget axis
    (:data:`BUDGET_KEYS`): a ``fish.sparsity`` x ``fish.selection`` sweep gives one line per selection. Vanilla runs
    of one peft method at several ranks (``lora-r1``, ``lora-r8``: no ``+selection``) form one line, ``lora (vanilla
    ranks)``, each point labelled with its rank (``kind`` "ranks"); a method named ``head...`` is a reference level
    (``kind`` "reference"). When two lines would share a label, the settings that tell them apart are appended.
    Each point: ``x`` (trainable parameters; the middle of the range when seeds disagree), ``mean``, ``std`` (0 for
    one seed), ``n`` and ``rank`` (vanilla lines) or ``None``. Rows without a positive parameter count are left out.
    """
    lines: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for row in rows:
        if not (row["trainable_params_min"] or 0) > 0:
            continue
        method = row["method"] or UNKNOWN
        vanilla = _VANILLA_RANK.fullmatch(method) if "+" not in method else None
        name, kind = (f"{vanilla['family']} (vanilla ranks)", "ranks") if vanilla else (method, "line")
        if method.startswith("head"):
            kind = "reference"
        if len({r["metric"] for r in rows if r["task"] == row["task"]}) > 1:
            name = f"{name} ({row['metric']})"
        setting = " ".join(sorted(_tokens(row["group"])))
        line = lines.setdefault(row["task"], {}).setdefault((name, setting), {"kind": kind, "points": []})
        line["points"].append({"x": (row["trainable_params_min"] + row["trainable_params_max"]) / 2,
                               "mean": row["mean"], "std": row["std"] or 0.0, "n": row["n"],
                               "rank": int(vanilla["r"]) if vanilla else None})  # fmt: skip
    out: dict[str, list[dict[str, Any]]] = {}
    for task, by_key in sorted(lines.items()):
        out[task] = []
        for (name, setting), line in sorted(by_key.items()):
            same = [s for n, s in by_key if n == name]
            if len(same) > 1:
                common = set.intersection(*(set(s.split()) for s in same))
                own = [t for t in setting.split() if t not in common]
                name = f"{name} · {' '.join(own) or 'default'}"
            line["points"].sort(key=lambda p: p["x"])
            out[task].append({"label": name, **line})
    return out


def _dodge(task_lines: list[dict[str, Any]]) -> list[list[float]]:
    """x of every point, spread by a few percent where several lines have a point at the same budget."""
    at: dict[float, list[int]] = {}
    for i, line in enumerate(task_lines):
        for x in {p["x"] for p in line["points"]}:
            at.setdefault(x, []).append(i)
    xs = []
    for i, line in enumerate(task_lines):
        row = []
        for p in line["points"]:
            k, pos = len(at[p["x"]]), at[p["x"]].index(i)
            row.append(p["x"] * 10 ** (0.02 * (pos - (k - 1) / 2)))
        xs.append(row)
    return xs


def _seeds(points: Sequence[dict[str, Any]]) -> str:
    ns = sorted({p["n"] for p in points})
    return f"{ns[0]} seed{'s' if ns[0] > 1 else ''}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]} seeds"


def plot_metric_vs_params(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> bool:
    """Plot the metric against trainable parameters (log x), one subplot per task, the lines of :func:`curve_lines`.

    Each point is the mean over seeds with the sample std as an error bar and a shaded band along the line; points
    of different lines at one budget are spread a little sideways so none hides another; vanilla ranks are one
    dashed line with each point's rank written next to it; a head-only reference is also a dotted level. The
    legend, beside the axes, names every line with its number of seeds. Returns ``False`` (nothing written) if no
    point remains.
    """
    by_task = curve_lines(rows)
    if not by_task:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = curve_figure(rows, by_task)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def curve_figure(rows: Sequence[dict[str, Any]], by_task: dict[str, list[dict[str, Any]]]) -> Any:
    """The matplotlib figure of :func:`plot_metric_vs_params` (the caller saves and closes it)."""
    import matplotlib.pyplot as plt

    tasks = list(by_task)
    ncols = min(len(tasks), 3)
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(9.5 * ncols, 4.8 * nrows), squeeze=False)  # + legend
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes.flat, tasks):
        task_lines = by_task[task]
        for i, (line, xs) in enumerate(zip(task_lines, _dodge(task_lines))):
            pts, color = line["points"], ("#555555" if line["kind"] != "line" else colors[i % len(colors)])
            ys, errs = [p["mean"] for p in pts], [p["std"] for p in pts]
            style = {"ranks": "--", "reference": ":"}.get(line["kind"], "-")
            ax.errorbar(xs, ys, yerr=errs, marker=_MARKERS[i % len(_MARKERS)], ls=style, color=color, capsize=3,
                        label=f"{line['label']} ({_seeds(pts)})")  # fmt: skip
            if len(pts) > 1:
                ax.fill_between(xs, [y - e for y, e in zip(ys, errs)], [y + e for y, e in zip(ys, errs)],
                                color=color, alpha=0.12, lw=0)  # fmt: skip
            if line["kind"] == "ranks":
                for x, p in zip(xs, pts):
                    ax.annotate(f"r={p['rank']}", (x, p["mean"]), textcoords="offset points", xytext=(4, -11),
                                fontsize=8, color=color)  # fmt: skip
            if line["kind"] == "reference" and len(pts) == 1:
                ax.axhline(ys[0], color=color, ls=":", lw=1)
        ax.set_xscale("log")
        ax.margins(x=0.06)  # room for the rank labels at the ends
        ax.set_xlabel("trainable parameters (log scale)")
        metrics = sorted({r["metric"] for r in rows if r["task"] == task})
        ax.set_ylabel(f"{metrics[0]} (mean ± std over seeds)" if len(metrics) == 1 else "metric (mean ± std)")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # off the data
    fig.tight_layout()
    return fig


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
