"""Tables, verdicts and curves of scripts/sparsity_study.py from its finished runs (``results.json`` and
``mask_stats.json`` only; no torch): ``study.md``, ``runs.csv`` (one row per run), ``anatomy.json`` (per-kind
density of the seed-0 masks) and ``curve_<task>.png`` (fish-report's metric_vs_params drawing)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from reproduce import METRIC, TRIVIAL, Run, _portable, chosen_lr
from study_report import SPREAD_SE, compare

R8_ENTRIES = 73_728


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _budget(method: str) -> str:
    """``lora-r8+fisher@1%-calibration`` -> ``1%``; vanilla and head-only -> ``""``."""
    return method.split("@", 1)[1].split("-", 1)[0] if "@" in method else ""


def collect(out: Path, runs: list[Run]) -> list[dict[str, Any]]:
    """One row per planned run: its state and, when finished, lr, metric, trainable count, wall time."""
    rows = []
    for r in runs:
        rec = _load(r.dir(out) / "results.json") or {}
        ok = rec.get("status") == "ok"
        lr = [o.split("=", 1)[1] for o in rec.get("overrides", []) if o.startswith("optim.lr=")]
        head_lr = [o.split("=", 1)[1] for o in rec.get("overrides", []) if o.startswith("optim.head_lr=")]
        rows.append({"stage": r.stage, "task": r.task, "method": r.method, "run": r.label, "seed": r.seed,
                     "status": rec.get("status", "not run"), "lr": lr[-1] if lr else "",
                     "head_lr": head_lr[-1] if head_lr else "",
                     "metric": METRIC[r.task], "value": rec.get("metrics", {}).get(METRIC[r.task]) if ok else None,
                     "trainable": rec.get("trainable_params"), "kept": rec.get("kept"),
                     "wall_s": rec.get("wall_time_s"), "reused": bool(rec.get("reused_from"))})  # fmt: skip
    return rows


def _finals(rows: list[dict[str, Any]], task: str) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["task"] != task or row["stage"] != "final":
            continue
        entry = table.setdefault(row["method"], {"values": [], "planned": 0, "lr": None, "trainable": None})
        entry["planned"] += 1
        if row["value"] is not None and math.isfinite(row["value"]):
            entry["values"].append(row["value"])
            entry["lr"], entry["trainable"] = row["lr"], row["trainable"]
    return table


def _grid_cell(rows: list[dict[str, Any]], task: str, method: str, chosen: str | None) -> str:
    cells = []
    for row in rows:
        if row["task"] == task and row["method"] == method and row["stage"] == "grid":
            lr = row["run"][2:]
            text = "…" if row["value"] is None else f"{row['value']:.3f}"
            bold = chosen is not None and float(lr) == float(chosen)
            cells.append(f"**{lr}: {text}**" if bold else f"{lr}: {text}")
    return " / ".join(cells)


def _ms(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _vs(table: dict[str, dict[str, Any]], a: str, b: str, seeds: int) -> str | None:
    """``a vs b: +0.012 (tie)`` when both have all their seeds, else ``None``."""
    va, vb = table.get(a, {}).get("values", []), table.get(b, {}).get("values", [])
    if len(va) < seeds or len(vb) < seeds:
        return None
    diff, word = compare(va, vb)
    return f"{a} vs {b}: {diff:+.3f} ({word})"


def anatomy(out: Path, runs: list[Run]) -> dict[str, dict[str, Any]]:
    """``task/method`` -> per-kind density of its seed-0 mask and the kept share of the top two layers."""
    result = {}
    for r in runs:
        if r.stage != "final" or r.seed != 0:
            continue
        stats = _load(r.dir(out) / "mask_stats.json")
        if not stats or "by_kind" not in stats:
            continue
        kinds = {k: round(v["density"], 4) for k, v in stats["by_kind"].items()}
        entry: dict[str, Any] = {"kept": stats.get("kept"), "candidates": stats.get("candidates"), "by_kind": kinds}
        an = stats.get("anatomy")
        if an:
            numbered = [i for i, layer in enumerate(an["layers"]) if layer is not None]
            kept = sum(sum(row) for row in an["kept"]) or 1
            entry["top2_layers_share"] = round(sum(sum(an["kept"][i]) for i in numbered[-2:]) / kept, 4)
        result[f"{r.task}/{r.method}"] = entry
    return result


def verdicts(table: dict[str, dict[str, Any]], seeds: int) -> list[str]:
    """Comparisons whose both sides have all their seeds: FISH vs random, reverse and vanilla at each budget, every
    method vs head-only (the adapter's gain), calibration vs warmup Fisher, the FISH Mask vs dense and random."""
    out = []
    for budget in ("25%", "6.25%", "1%", "0.1%"):
        fish = f"lora-r8+fisher@{budget}"
        for other in (f"lora-r8+random@{budget}", f"lora-r8+reverse@{budget}", "lora-r2" if budget == "25%" else ""):
            line = _vs(table, fish, other, seeds) if other else None
            if line:
                out.append(line)
    out += [line for m in table if m != "head-only" and (line := _vs(table, m, "head-only", seeds))]
    for a, b in (("lora-r8+fisher@1%-calibration", "lora-r8+fisher@1%"), ("full+fisher@0.5%-calibration", "full"),
                 ("full+fisher@0.5%-calibration", "full+random@0.5%"), ("full+fisher@0.5%", "full"),
                 ("full+fisher@0.5%", "full+random@0.5%"), ("full+random@0.5%", "full"),
                 ("full+fisher@0.1%-calibration", "full+random@0.1%"),
                 ("full+fisher@0.5%-calibration", "full+random@0.5%-nowarmup"),
                 ("full+random@0.5%-nowarmup", "full+random@0.5%"),
                 ("full+fisher@0.1%-calibration", "full+random@0.1%-nowarmup"),
                 ("full+random@0.1%-nowarmup", "full+random@0.1%")):  # fmt: skip
        line = _vs(table, a, b, seeds)
        if line:
            out.append(line)
    return out


def curve_rows(table: dict[str, dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Summary rows in fish-report's shape for :func:`fish_lightning.app.report_plots.plot_metric_vs_params`."""
    rows = []
    for method, entry in table.items():
        if not entry["values"] or not entry["trainable"]:
            continue
        name, _, rest = method.partition("@")
        budget, _, variant = rest.partition("-")
        group = " ".join(t for t in (f"fish.sparsity={budget}" if budget else "",
                                     "fish.calibration_samples=1024" if variant == "calibration" else "",
                                     "fish.warmup_steps=0" if variant == "nowarmup" else "") if t)
        values = entry["values"]
        rows.append({"task": task, "method": name, "group": group, "metric": METRIC[task],
                     "trainable_params_min": entry["trainable"], "trainable_params_max": entry["trainable"],
                     "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                     "n": len(values)})  # fmt: skip
    return rows


def task_section(rows: list[dict[str, Any]], task: str, seeds: int, anat: dict[str, Any]) -> list[str]:
    table = _finals(rows, task)
    lines = [f"## {task} ({METRIC[task]}, dev; trivial predictor {TRIVIAL[task]:.3f})", "",
             "| method | budget (% of r=8) | trainable | lr grid (holdout; chosen bold) | dev mean ± std | seeds done "
             "| seed-0 mask: density per kind; top-2-layer share |", "|---|---|---:|---|---|---|---|"]  # fmt: skip
    for method, entry in table.items():
        chosen = entry["lr"]
        if chosen is None:
            grid_rows = [r for r in rows if r["task"] == task and r["method"] == method and r["stage"] == "grid"]
            if grid_rows and all(r["value"] is not None for r in grid_rows):
                best = max(grid_rows, key=lambda r: (r["value"], -float(r["run"][2:])))
                chosen = best["run"][2:]
        a = anat.get(f"{task}/{method}")
        kinds = ""
        if a:
            kinds = ", ".join(f"{k.replace('attention.', '').replace('self.', '')} {v:.0%}"
                              for k, v in a["by_kind"].items() if v > 0.0005 or "lora" in k)  # fmt: skip
            kinds += f"; top 2 layers {a['top2_layers_share']:.0%}" if "top2_layers_share" in a else ""
        trainable = f"{entry['trainable']:,}" if entry["trainable"] else ""
        lines.append(f"| {method} | {_budget(method) or '—'} | {trainable} | {_grid_cell(rows, task, method, chosen)} "
                     f"| {_ms(entry['values'])} | {len(entry['values'])}/{entry['planned']} | {kinds} |")  # fmt: skip
    found = verdicts(table, seeds)
    lines += ["", f"Comparisons with every seed on both sides (|difference| > {SPREAD_SE:g} standard errors: better or "
              "worse, else tie):", "", *(f"- {v}" for v in found or ["(none complete yet)"]), ""]  # fmt: skip
    return lines


def _head_rate(rows: list[dict[str, Any]], task: str) -> str:
    rates = {r["head_lr"] for r in rows if r["task"] == task and r["head_lr"]}
    return "/".join(sorted(rates))


def write_all(out: Path, args: argparse.Namespace, runs: list[Run], publish: Path | None) -> Path:
    """Write ``study.md``, ``runs.csv``, ``anatomy.json`` and the curves to ``out`` (and copy them to ``publish``)."""
    from fish_lightning.app.report_plots import plot_metric_vs_params
    from sparsity_study import study_command

    rows = collect(out, runs)
    anat = anatomy(out, runs)
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["stage"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "anatomy.json").write_text(json.dumps(anat, indent=1))
    done = [r for r in rows if r["status"] == "ok"]
    fresh = [r for r in done if not r["reused"]]
    timing = _load(out / "study_time.json") or {}
    tasks = args.tasks.split(",")
    head = ["# When does FISH help? (scripts/sparsity_study.py)", "",
            f"Runs finished: {len(done)} of {len(rows)} planned ({len(done) - len(fresh)} reused from "
            f"scripts/reproduce.py's study); the new runs' training wall times sum to "
            f"{sum(r['wall_s'] or 0 for r in fresh) / 60:.0f} min, the study's wall time (summed over invocations) "
            f"was {timing.get('seconds', float('nan')) / 60:.0f} min. Resume: `{study_command(args)}"
            f"{' --reuse docs/results' if args.reuse else ''}`.", ""]  # fmt: skip
    if args.head_lr == "chosen":
        rates = ", ".join(f"{t}: {h}" for t in tasks if (h := _head_rate(rows, t)))
        head += ["Every method's classification head trains at its own rate (`optim.head_lr`): the rate head-only "
                 f"chose on the holdout for that task ({rates or 'not chosen yet'}); the grids below are the "
                 "adapter's (or encoder's) rate.", ""]  # fmt: skip
    body: list[str] = []
    for task in tasks:
        body += task_section(rows, task, args.seeds, anat)
        table = _finals(rows, task)
        if plot_metric_vs_params(curve_rows(table, task), out / f"curve_{task}.png"):
            body += [f"![{task}](curve_{task}.png)", ""]
    (out / "study.md").write_text(_portable("\n".join(head + body)), encoding="utf-8")
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        for name in ("study.md", "runs.csv", "anatomy.json", *(f"curve_{t}.png" for t in tasks)):
            if (out / name).is_file():
                shutil.copy2(out / name, publish / name)
    return out / "study.md"


__all__ = ["chosen_lr", "collect", "curve_rows", "verdicts", "write_all"]
