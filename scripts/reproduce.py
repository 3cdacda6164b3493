"""Reproduce FISH-Tuning's claim on GLUE with the offline MiniLM-L6: FISH vs vanilla PEFT vs random and
reverse masks at one matched trainable budget, several seeds, then a table and plots.

A thin driver over the Hydra app: every run is ``fish-train`` with overrides (composed in this one
process, so the model code is imported once), writing ``results.json`` into
``OUT/<task>/<method>/seed<k>/``; finished runs are skipped, so an interrupted study resumes.
At the end ``fish-report`` writes ``OUT/summary.md``/``runs.csv``/``summary.csv`` and this script
writes ``OUT/results_<task>.png`` (metric per method, mean ± std over seeds).

Methods at the budget of rank 2 (``budget.r=2``: the mask keeps exactly rank-2's candidate count):
``lora-r2``, ``lora-r8`` (vanilla), ``lora-r8+fisher``, ``lora-r8+random``, ``lora-r8+reverse``;
and for DoRA ``dora-r2`` plus the three masks at rank 8. The warmup ablation (``--ablation``)
compares, for FISH-LoRA on one task, a mask
from calibration before any update (original FISH; LoRA's B = 0 makes every A score 0) with masks
after 10 (the main study) and 50 dense warmup steps, and with re-selection every 20 steps.

Usage:
    python scripts/reproduce.py                    # the full study (about an hour on 2 CPU cores)
    python scripts/reproduce.py --quick            # one task, LoRA methods, 1 seed, small: < 3 min
    python scripts/reproduce.py --ablation --tasks sst2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sst2", "cola", "rte", "stsb")
METRIC = {"sst2": "val/accuracy", "cola": "val/matthews", "rte": "val/accuracy", "stsb": "val/pearson"}
# per-task settings (they replace the common ones): sentence-pair tasks train on length-grouped batches (RTE's
# pairs average 70 tokens with a long tail to 128; padding each batch to its longest example doubles the CPU
# time), and RTE trains on 800 pairs (50 steps) to fit the study into the 2-core machine's budget
TASK_EXTRA = {"rte": ["data.group_by_length=true", "data.train_samples=800"], "stsb": ["data.group_by_length=true"]}


def methods(peft: str, budget_r: int = 2, rank: int = 8) -> dict[str, list[str]]:
    base = [f"peft={peft}"]
    out = {f"{peft}-r{budget_r}": [*base, f"peft.r={budget_r}", "fish=off"]}
    if peft == "lora":  # vanilla at the larger rank too (the DoRA group keeps only its budget reference)
        out[f"{peft}-r{rank}"] = [*base, f"peft.r={rank}", "fish=off"]
    for sel in ("fisher", "random", "reverse"):
        out[f"{peft}-r{rank}+{sel}"] = [*base, f"peft.r={rank}", f"fish={sel}", f"budget.r={budget_r}"]
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue"), help="GLUE TSV directory")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"), help="where runs and the report go")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--peft", default="lora,dora", help="comma list of lora,dora")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma list: only these methods (e.g. lora-r2,lora-r8+fisher)")
    ap.add_argument("--train-samples", type=int, default=1600, help="fixed-seed training subsample per task")
    ap.add_argument("--val-samples", type=int, default=400, help="fixed-seed validation subsample (null: all)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=10, help="dense steps feeding the Fisher before the freeze")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--ablation", action="store_true", help="warmup-length ablation for FISH-LoRA instead")
    ap.add_argument("--quick", action="store_true", help="sst2, LoRA methods, 1 seed, 640 examples, 1 epoch")
    ap.add_argument("--extra", nargs="*", default=[], help="more fish-train overrides for every run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (run 2 processes x 1 thread on 2 cores)")
    ap.add_argument("--no-report", action="store_true", help="skip the report (another process writes it)")
    ap.add_argument("--report-only", action="store_true", help="only tidy finished runs and write the report")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.peft, args.seeds = "sst2", "lora", 1
        args.train_samples, args.val_samples, args.epochs, args.warmup_steps = 640, 200, 1, 5
    return args


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every run of the study shares."""
    common = [f"model={args.model}", "logger=none", "trainer.enable_progress_bar=false",
              "checkpoint.every_n_train_steps=null", f"trainer.max_epochs={args.epochs}", f"optim.lr={args.lr}",
              f"data.path={args.data_dir}",
              f"data.train_samples={args.train_samples}", "data.subsample_seed=0", *args.extra]  # fmt: skip
    common.append("data.val_samples=null" if args.val_samples <= 0 else f"data.val_samples={args.val_samples}")
    return common


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, list[str]]]:
    """(task, method, seed, overrides) for every run."""
    common = common_overrides(args)
    fish_common = ["fish.mask_epoch=null", f"fish.warmup_steps={args.warmup_steps}"]
    tasks = args.tasks.split(",")
    for task in tasks:
        if task not in TASKS + ("mrpc", "qnli"):
            raise SystemExit(f"reproduce.py: unknown task {task!r}: expected some of {TASKS + ('mrpc', 'qnli')}")
    if args.ablation:
        table = {  # (warmup 10 without re-selection is the main study's lora-r8+fisher)
            "lora-r8+fisher@calibration": ["fish.warmup_steps=0", "fish.calibration_samples=256"],
            "lora-r8+fisher@warmup50": ["fish.warmup_steps=50"],
            "lora-r8+fisher@reselect20": ["fish.warmup_steps=10", "fish.reselect_every_n_steps=20"],
        }
        groups = [{k: ["peft=lora", "peft.r=8", "fish=fisher", "budget.r=2", "fish.mask_epoch=null", *v]
                   for k, v in table.items()}]  # fmt: skip
    else:
        groups = [methods(peft) for peft in args.peft.split(",")]
    if args.methods:
        wanted = args.methods.split(",")
        known = [m for table in groups for m in table]
        unknown = [m for m in wanted if m not in known]
        if unknown:
            raise SystemExit(f"reproduce.py: unknown method(s) {unknown}: expected some of {known}")
        groups = [{m: o for m, o in table.items() if m in wanted} for table in groups]
    runs = []  # group-major, then task: a study cut short still holds whole method groups
    for table in groups:
        for task in tasks:
            for method, overrides in table.items():
                for seed in range(args.seeds):
                    extra = fish_common if "fish=off" not in overrides and not args.ablation else []
                    task_keys = {o.split("=", 1)[0] for o in TASK_EXTRA.get(task, [])}
                    shared = [o for o in common if o.split("=", 1)[0] not in task_keys]
                    task_extra = TASK_EXTRA.get(task, [])
                    overrides_all = [f"data={task}", *shared, *task_extra, *overrides, *extra, f"seed={seed}"]
                    runs.append((task, method, seed, overrides_all))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not Path(args.data_dir).is_dir():
        print(
            f"reproduce.py: --data-dir {args.data_dir} does not exist (a directory of GLUE TSV files)", file=sys.stderr
        )
        return 2
    import torch
    from hydra import compose, initialize_config_module

    from fish_lightning.app.train import run

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.report_only:
        return report(out, args)
    runs = plan(args)
    print(f"{len(runs)} runs -> {out}")
    start = time.time()
    with initialize_config_module("fish_lightning.conf", version_base="1.3"):
        for i, (task, method, seed, overrides) in enumerate(runs, 1):
            run_dir = out / task / method / f"seed{seed}"
            done = run_dir / "results.json"
            if done.is_file() and json.loads(done.read_text()).get("status") == "ok":
                continue
            cfg = compose("train", overrides=[f"trainer.default_root_dir={run_dir}", *overrides])
            t0 = time.time()
            try:
                rec = run(cfg, run_dir, overrides)
                value = rec["metrics"].get(METRIC.get(task, rec["primary_metric"]), float("nan"))
                print(f"[{i}/{len(runs)}] {task} {method} seed {seed}: {value:.4f} "
                      f"(trainable {rec['trainable_params']:,}, {time.time() - t0:.0f} s)", flush=True)  # fmt: skip
            except Exception as err:  # recorded as failed in results.json by run(); keep going
                print(f"[{i}/{len(runs)}] {task} {method} seed {seed}: FAILED {type(err).__name__}: {err}", flush=True)
    print(f"study time {time.time() - start:.0f} s")
    return 0 if args.no_report else report(out, args)


def report(out: Path, args: argparse.Namespace) -> int:
    """Tidy every finished run (portable paths, short setting labels), then table and plots."""
    from fish_lightning.app.report import write_report

    common = set(common_overrides(args))
    for res in sorted(out.glob("*/*/seed*/results.json")):
        rec = json.loads(_portable(res.read_text()))
        own = [o for o in rec.get("overrides", []) if o not in common and not o.startswith("data.path=")]
        rec["group"] = " ".join(sorted(o for o in own if not o.startswith("seed=")))
        rec["method"] = res.parent.parent.name  # the study's label (ablation variants differ only in settings)
        if rec.get("status") == "ok":
            rec.pop("traceback", None)
        res.write_text(json.dumps(rec, indent=1))
        cfg = res.with_name("config.yaml")
        if cfg.is_file():
            cfg.write_text(_portable(cfg.read_text()))
    (out / "study.json").write_text(json.dumps({"common_overrides": sorted(_portable(o) for o in common),
                                                "command": study_command(args)},
                                               indent=1))  # fmt: skip
    paths = write_report(out)
    for path in paths.values():
        if path.suffix in (".md", ".csv"):
            path.write_text(_portable(path.read_text()))
    plot_per_task(out)
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def study_command(args: argparse.Namespace) -> str:
    """The command line that (re)makes this study's runs."""
    opts = {"--tasks": args.tasks, "--peft": args.peft, "--seeds": args.seeds, "--train-samples": args.train_samples,
            "--val-samples": args.val_samples, "--epochs": args.epochs, "--warmup-steps": args.warmup_steps,
            "--lr": args.lr, "--model": args.model}  # fmt: skip
    flags = (" --ablation" if args.ablation else "") + (f" --methods {args.methods}" if args.methods else "")
    return "python scripts/reproduce.py" + flags + "".join(f" {k} {v}" for k, v in opts.items())


def _portable(text: str) -> str:
    """Absolute paths of this checkout and its siblings (../shared) made relative to the repo root, and
    the home directory (e.g. the tokenisation cache) written as ``~``."""
    return text.replace(f"{ROOT}/", "").replace(f"{ROOT.parent}/", "../").replace(f"{Path.home()}/", "~/")


def plot_per_task(out: Path) -> None:
    """``results_<task>.png``: the task metric per method, mean ± std over seeds (bars in run order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task: dict[str, dict[str, list[float]]] = {}
    for res in sorted(out.glob("*/*/seed*/results.json")):
        rec = json.loads(res.read_text())
        if rec.get("status") != "ok":
            continue
        metric = METRIC.get(rec["task"], rec["primary_metric"])
        by_task.setdefault(rec["task"], {}).setdefault(rec["method"], []).append(rec["metrics"][metric])
    for task, table in by_task.items():
        names = list(table)
        means = [statistics.mean(table[n]) for n in names]
        stds = [statistics.stdev(table[n]) if len(table[n]) > 1 else 0.0 for n in names]
        colors = ["#888" if "+" not in n else "#1f77b4" if "fisher" in n else "#ff7f0e" if "random" in n
                  else "#d62728" for n in names]  # fmt: skip
        fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.6))
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(METRIC.get(task, "metric"))
        ax.set_title(f"{task}: mean ± std over seeds")
        lo = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(-1.0, lo - 0.05) if lo < 0.3 else lo - 0.05, max(m + s for m, s in zip(means, stds)) + 0.03)
        fig.tight_layout()
        fig.savefig(out / f"results_{task}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
