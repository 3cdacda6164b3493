"""``OUT/study.md`` for scripts/reproduce.py: per task, whether the vanilla baseline learned, the verdict
(FISH vs vanilla vs random, beyond the seed spread or not), the rates chosen on the holdout, the dev scores and
the anatomy of each mask. Reads only the runs' ``results.json`` and ``mask_stats.json`` (no torch)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

#: the vanilla budget baseline "learned" when its worst seed beats the trivial predictor by at least this
LEARNED_MARGIN = 0.05
#: two methods differ "beyond the seed spread" when |mean difference| > this many standard errors of it
SPREAD_SE = 2.0
PAIRS = (("+fisher", "-r2", "FISH vs vanilla (same budget)"), ("+fisher", "+random", "FISH vs random mask"),
         ("+normalized", "+fisher", "normalized vs global FISH"), ("+normalized", "-r2", "normalized FISH vs vanilla"),
         ("+fisher", "+reverse", "FISH vs reverse mask"))  # fmt: skip


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _scores(out: Path, task: str, metric: str) -> dict[str, dict[str, Any]]:
    """method -> {"values": [dev metric per seed], "lr", "trainable", "wall"} from the final runs."""
    table: dict[str, dict[str, Any]] = {}
    for res in sorted((out / "final" / task).glob("*/seed*/results.json")):
        rec = _load(res)
        if not rec or rec.get("status") != "ok":
            continue
        row = table.setdefault(res.parent.parent.name, {"values": [], "lr": None, "trainable": None, "wall": 0.0})
        row["values"].append(rec["metrics"].get(metric, float("nan")))
        lr = [o.split("=", 1)[1] for o in rec.get("overrides", []) if o.startswith("optim.lr=")]
        row["lr"], row["trainable"] = (lr[-1] if lr else None), rec.get("trainable_params")
        row["wall"] += rec.get("wall_time_s") or 0.0
    return table


def _grid(out: Path, task: str, metric: str) -> dict[str, dict[str, float]]:
    """method -> {lr: holdout metric} (nan for a failed run)."""
    grid: dict[str, dict[str, float]] = {}
    for res in sorted((out / "grid" / task).glob("*/lr*/results.json")):
        rec = _load(res) or {}
        value = rec.get("metrics", {}).get(metric, float("nan")) if rec.get("status") == "ok" else float("nan")
        grid.setdefault(res.parent.parent.name, {})[res.parent.name[2:]] = value
    return grid


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(a: list[float], b: list[float]) -> tuple[float, str]:
    """(mean(a) - mean(b), "better" | "worse" | "tie"): beyond :data:`SPREAD_SE` standard errors or not."""
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    diff = ma - mb
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if abs(diff) > SPREAD_SE * se and se > 0:
        return diff, "better" if diff > 0 else "worse"
    return diff, "tie"


def _anatomy(out: Path, task: str, method: str) -> str:
    """Density of the seed-0 mask per module kind, and the share of the kept entries in the top two layers."""
    stats = _load(out / "final" / task / method / "seed0" / "mask_stats.json")
    if not stats or "anatomy" not in stats:
        return ""
    kinds = ", ".join(f"{k.replace('attention.', '')} {v['density']:.0%}" for k, v in stats["by_kind"].items())
    an = stats["anatomy"]
    numbered = [i for i, layer in enumerate(an["layers"]) if layer is not None]
    top = numbered[-2:]
    kept_total = sum(sum(row) for row in an["kept"]) or 1
    share = sum(sum(an["kept"][i]) for i in top) / kept_total
    return f"{kinds}; top 2 layers hold {share:.0%} of the kept entries"


def task_section(out: Path, task: str, metric: str, trivial: float) -> tuple[list[str], str]:
    """Markdown lines for one task and its one-line verdict."""
    scores, grid = _scores(out, task, metric), _grid(out, task, metric)
    lines = [f"## {task} ({metric}, dev; trivial predictor {trivial:.3f})", ""]
    if not scores:
        return lines + ["No finished final run.", ""], f"**{task}**: not run"
    vanilla = next((m for m in scores if m.endswith("-r2")), None)
    learned = vanilla is not None and min(scores[vanilla]["values"]) >= trivial + LEARNED_MARGIN
    lines += ["| method | lr (holdout grid) | trainable | dev mean ± std | seeds | anatomy of the seed-0 mask |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for method, row in scores.items():
        m, s = _mean_std(row["values"])
        g = grid.get(method, {})
        chosen = float(row["lr"]) if row["lr"] is not None else None
        lrs = " / ".join(f"**{lr}: {v:.3f}**" if float(lr) == chosen else f"{lr}: {v:.3f}"
                         for lr, v in sorted(g.items(), key=lambda kv: float(kv[0])))  # fmt: skip
        lines.append(f"| {method} | {lrs} | {row['trainable']:,} | {m:.3f} ± {s:.3f} | {len(row['values'])} | "
                     f"{_anatomy(out, task, method)} |")  # fmt: skip
    lines.append("")
    if not learned:
        worst = min(scores[vanilla]["values"]) if vanilla else float("nan")
        verdict = (f"**{task}**: the vanilla budget baseline did not learn (worst seed {worst:.3f} vs trivial "
                   f"{trivial:.3f} + {LEARNED_MARGIN}); left out of the verdict")  # fmt: skip
        return lines + [verdict, ""], verdict
    parts = []
    for a_suffix, b_suffix, label in PAIRS:
        a = next((m for m in scores if m.endswith(a_suffix)), None)
        b = next((m for m in scores if m.endswith(b_suffix)), None)
        if a and b:
            diff, word = compare(scores[a]["values"], scores[b]["values"])
            parts.append(f"{label}: {diff:+.3f} ({word})")
    verdict = f"**{task}**: " + "; ".join(parts)
    return lines + [verdict, ""], verdict


def write_study(out: Path, args: argparse.Namespace, metric: dict[str, str], trivial: dict[str, float]) -> Path:
    """Write ``out/study.md``; returns its path."""
    sections, verdicts = [], []
    for task in args.tasks.split(","):
        lines, verdict = task_section(out, task, metric[task], trivial[task])
        sections += lines
        verdicts.append(f"- {verdict}")
    timing = _load(out / "study_time.json") or {}
    walls = [(_load(p) or {}).get("wall_time_s") or 0.0 for p in out.glob("*/*/*/*/results.json")]
    head = ["# FISH-Tuning study (scripts/reproduce.py)", "",
            f"Rule: a task counts when vanilla LoRA at the budget rank beats the trivial predictor by "
            f">= {LEARNED_MARGIN} on its worst seed; two methods differ when |mean difference| > {SPREAD_SE:g} "
            "standard errors of the difference (else: tie). Rates chosen on held-out training rows "
            f"(`data.holdout={args.holdout}`), bold in the tables.", "",
            *verdicts, "",
            f"Runs: {len(walls)}; their training wall times sum to {sum(walls) / 60:.0f} min; the study's wall time "
            f"(summed over invocations) was {timing.get('seconds', float('nan')) / 60:.0f} min.", ""]  # fmt: skip
    path = out / "study.md"
    path.write_text("\n".join(head + sections), encoding="utf-8")
    return path
