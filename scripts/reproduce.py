"""Reproduce FISH-Tuning's claim on GLUE with the offline MiniLM-L6: FISH vs vanilla PEFT vs random and
reverse masks at one matched trainable budget, learning rates chosen on held-out training rows, several seeds.

A thin driver over the Hydra app: every run is ``fish-train`` with overrides (composed in this process, so the
model code is imported once). Per task, two stages:

1. **grid**: every method at every rate of ``--lrs``, seed 0, trained on ``--train-samples`` training rows and
   validated on ``--holdout`` *other* training rows (``data.holdout``), never on dev:
   ``OUT/grid/<task>/<method>/lr<lr>/results.json``;
2. **final**: every method at its best grid rate (holdout metric; a tie goes to the smaller rate), ``--seeds``
   seeds, validated on the whole dev split: ``OUT/final/<task>/<method>/seed<k>/results.json``.

Finished runs are skipped, so an interrupted study resumes where it stopped. ``--workers N`` runs N
single-threaded processes that claim runs through lock files (a final run waits for its grid). At the end
``fish-report`` writes ``OUT/final/summary.md`` etc., and this script writes ``OUT/study.md`` (verdict, chosen
rates, scores, anatomy, time) and ``OUT/results_<task>.png``.

Methods at the budget of rank 2 of LoRA on query/value (``budget.r=2``: the mask keeps exactly rank-2's candidate
count): ``lora-r2`` (vanilla at the budget rank), ``lora-r8`` (vanilla at the full rank, for reference),
``lora-r8+fisher`` (the paper: global top-k), ``lora-r8+normalized`` (``fish.scope=normalized``), ``lora-r8+random``,
``lora-r8+reverse``. The classifier reads the masked token mean (``model.net.pooling=mean``, what the MiniLM
checkpoint was trained for; its first-token pooler is untrained, see docs/results.md).

The warmup ablation (``--ablation``, one rate, no grid) compares, for FISH-LoRA, a mask from calibration before
any update (original FISH; LoRA's B = 0 makes every A score 0) with masks after 10 (the main study) and 50 dense
warmup steps, and with re-selection every 20 steps.

Usage:
    python scripts/reproduce.py --workers 2        # the study (docs/results.md says how long it took)
    python scripts/reproduce.py --quick            # SST-2, 2 methods, 2 rates, 1 seed, small: ~2 min
    python scripts/reproduce.py --report-only      # tables and plots from the finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sst2", "cola", "rte", "stsb")
METRIC = {"sst2": "val/accuracy", "cola": "val/matthews", "rte": "val/accuracy", "stsb": "val/pearson"}
#: the trivial predictor's dev score (majority class; a constant has Pearson/MCC 0), which a baseline must beat
TRIVIAL = {"sst2": 0.509, "cola": 0.0, "rte": 0.527, "stsb": 0.0}
CLAIM = ".claim"
#: per-task overrides of the common ones: CoLA's vanilla LoRA barely learns from 2,000 sentences (MCC 0.04 at
#: lr 2e-3 and 0.03 at 1e-2, 2 epochs; 0.09 from all 8,551), so it trains on 4,000 (docs/results.md)
TASK_EXTRA = {"cola": ["data.train_samples=4000"]}
DEFAULT_TRAIN = 2000


@dataclass
class Run:
    stage: str  # "grid" | "final" | "ablation"
    task: str
    method: str
    label: str  # lr<lr> (grid) or seed<k>
    overrides: list[str]
    seed: int = 0
    lr: float | None = None  # None: the rate chosen on the grid (final runs)
    after: list[Path] = field(default_factory=list)  # grid runs a final run waits for
    head_from: list[Path] = field(default_factory=list)  # a grid whose chosen rate is this run's optim.head_lr

    def dir(self, out: Path) -> Path:
        return out / self.stage / self.task / self.method / self.label


def methods(peft: str, budget_r: int = 2, rank: int = 8) -> dict[str, list[str]]:
    base = [f"peft={peft}"]
    out = {f"{peft}-r{budget_r}": [*base, f"peft.r={budget_r}", "fish=off"]}
    out[f"{peft}-r{rank}"] = [*base, f"peft.r={rank}", "fish=off"]
    masked = {"fisher": ["fish=fisher"], "normalized": ["fish=fisher", "fish.scope=normalized"],
              "random": ["fish=random"], "reverse": ["fish=reverse"]}  # fmt: skip
    for name, sel in masked.items():
        out[f"{peft}-r{rank}+{name}"] = [*base, f"peft.r={rank}", *sel, f"budget.r={budget_r}"]
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue"), help="GLUE TSV directory")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"), help="where runs and the report go")
    ap.add_argument("--tasks", default="sst2,stsb,cola")
    ap.add_argument("--peft", default="lora", help="comma list of lora,dora")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma list: only these methods (e.g. lora-r2,lora-r8+fisher)")
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="the learning-rate grid, chosen on the holdout")
    ap.add_argument("--holdout", type=int, default=500, help="training rows held out to choose the rate")
    ap.add_argument("--train-samples", type=int, default=DEFAULT_TRAIN,
                    help=f"fixed-seed training subsample per task (at the default: {TASK_EXTRA} too)")  # fmt: skip
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=10, help="dense steps feeding the Fisher before the freeze")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--pooling", default="mean", choices=("cls", "mean"), help="model.net.pooling")
    ap.add_argument("--ablation", action="store_true", help="warmup-length ablation for FISH-LoRA (at --lrs[0])")
    ap.add_argument("--quick", action="store_true",
                    help="sst2, 2 methods, 2 rates, 1 seed, 480 rows, 1 epoch, 128 dev rows")
    ap.add_argument("--extra", nargs="*", default=[], help="more fish-train overrides for every run")
    ap.add_argument("--workers", type=int, default=1, help="processes (each single-threaded when > 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of a single worker")
    ap.add_argument("--no-report", action="store_true", help="skip the report (another process writes it)")
    ap.add_argument("--report-only", action="store_true", help="only tidy finished runs and write the report")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.peft, args.seeds, args.lrs = "sst2", "lora", 1, "1e-3,3e-3"
        args.methods = args.methods or "lora-r2,lora-r8+fisher"
        args.train_samples, args.holdout, args.epochs, args.warmup_steps = 480, 160, 1, 5
        args.extra = [*args.extra, "data.val_samples=128"]  # the final runs score 128 dev rows, not all
    for task in args.tasks.split(","):
        if task not in TASKS:
            raise SystemExit(f"reproduce.py: unknown task {task!r}: expected some of {TASKS}")
    try:
        args.lr_grid = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        raise SystemExit(f"reproduce.py: --lrs {args.lrs!r} is not a comma list of numbers") from None
    return args


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every run of the study shares (validation once, at the end of training)."""
    return [f"model={args.model}", f"model.net.pooling={args.pooling}", "logger=none",
            "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=null",
            f"trainer.max_epochs={args.epochs}", f"+trainer.check_val_every_n_epoch={args.epochs}",
            "+trainer.num_sanity_val_steps=0", f"data.path={args.data_dir}", "data.group_by_length=true",
            f"data.train_samples={args.train_samples}", "data.subsample_seed=0", *args.extra]  # fmt: skip


def _table(args: argparse.Namespace) -> dict[str, list[str]]:
    if args.ablation:
        variants = {  # (warmup 10 without re-selection is the main study's lora-r8+fisher)
            "lora-r8+fisher@calibration": ["fish.warmup_steps=0", "fish.calibration_samples=256"],
            "lora-r8+fisher@warmup50": ["fish.warmup_steps=50"],
            "lora-r8+fisher@reselect20": ["fish.warmup_steps=10", "fish.reselect_every_n_steps=20"],
        }
        return {k: ["peft=lora", "peft.r=8", "fish=fisher", "budget.r=2", "fish.mask_epoch=null", *v]
                for k, v in variants.items()}  # fmt: skip
    table = {m: o for peft in args.peft.split(",") for m, o in methods(peft).items()}
    if args.methods:
        wanted = args.methods.split(",")
        unknown = [m for m in wanted if m not in table]
        if unknown:
            raise SystemExit(f"reproduce.py: unknown method(s) {unknown}: expected some of {list(table)}")
        table = {m: table[m] for m in wanted}
    return table


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run, task-major (a study cut short holds whole tasks): the task's grid, then its final runs."""
    common = common_overrides(args)
    out = Path(args.out)
    runs: list[Run] = []
    for task in args.tasks.split(","):
        for method, overrides in _table(args).items():
            fish = [] if "fish=off" in overrides or args.ablation else \
                ["fish.mask_epoch=null", f"fish.warmup_steps={args.warmup_steps}"]  # fmt: skip
            extra = TASK_EXTRA.get(task, []) if args.train_samples == DEFAULT_TRAIN else []
            keys = {o.split("=", 1)[0] for o in extra}
            base = [f"data={task}", *(o for o in common if o.split("=", 1)[0] not in keys), *extra, *overrides, *fish]
            if args.ablation:
                lr = args.lr_grid[0]
                for seed in range(args.seeds):
                    runs.append(Run("ablation", task, method, f"seed{seed}",
                                    [*base, f"optim.lr={lr}", f"seed={seed}"], seed, lr))  # fmt: skip
                continue
            grid = [Run("grid", task, method, f"lr{lr:g}", [*base, f"data.holdout={args.holdout}", f"optim.lr={lr}",
                                                            "seed=0"], 0, lr) for lr in args.lr_grid]  # fmt: skip
            runs += grid
            after = [g.dir(out) for g in grid]
            runs += [Run("final", task, method, f"seed{s}", [*base, f"seed={s}"], s, None, after)
                     for s in range(args.seeds)]  # fmt: skip
    return sorted(runs, key=lambda r: (args.tasks.split(",").index(r.task), r.stage == "final"))


def _read(path: Path) -> dict | None:
    try:
        return json.loads((path / "results.json").read_text())
    except (OSError, ValueError):
        return None


def chosen_lr(task: str, grid_dirs: list[Path]) -> tuple[float | None, bool]:
    """(best grid rate by the holdout metric, whether every grid run has finished); a tie goes to the smaller
    rate; ``None`` when no grid run succeeded with a finite metric."""
    scored, finished = [], True
    for d in grid_dirs:
        rec = _read(d)
        if rec is None:
            finished = False
            continue
        value = rec.get("metrics", {}).get(METRIC[task], float("nan")) if rec.get("status") == "ok" else float("nan")
        if math.isfinite(value):
            scored.append((-value, float(d.name[2:]), d))
    return (min(scored)[1] if scored else None), finished


def _claim(run_dir: Path) -> bool:
    """Atomically claim ``run_dir`` for this process (a claim by a dead process is taken over)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
                return False  # held by a live process
            except (ProcessLookupError, ValueError):
                path.unlink(missing_ok=True)  # stale
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def work(args: argparse.Namespace, runs: list[Run]) -> None:
    """Run every unfinished run this process can claim, in plan order; final runs wait for their grid."""
    from hydra import compose, initialize_config_module

    from fish_lightning.app.train import run as train_run

    out, attempted = Path(args.out), set()
    with initialize_config_module("fish_lightning.conf", version_base="1.3"):
        while True:
            todo = [r for r in runs if r.dir(out) not in attempted and (_read(r.dir(out)) or {}).get("status") != "ok"]
            if not todo:
                return
            started = False
            for r in todo:
                lr = r.lr
                if r.stage == "final":
                    lr, finished = chosen_lr(r.task, r.after)
                    if not finished:
                        continue
                    if lr is None:  # no rate of the grid trained: nothing to run
                        attempted.add(r.dir(out))
                        print(f"{r.task} {r.method}: no grid rate gave a finite holdout metric; skipped", flush=True)
                        continue
                extra = []
                if r.head_from:
                    head_lr, finished = chosen_lr(r.task, r.head_from)
                    if not finished:
                        continue
                    extra = [f"optim.head_lr={head_lr}"] if head_lr is not None else []
                if not _claim(r.dir(out)):
                    continue
                attempted.add(r.dir(out))
                try:
                    _execute(r, lr, out, compose, train_run, extra)
                finally:
                    (r.dir(out) / CLAIM).unlink(missing_ok=True)
                started = True
                break
            if not started:
                time.sleep(5)  # waiting for another worker's claims or grid runs


def _execute(r: Run, lr: float | None, out: Path, compose, train_run, extra: list[str] | None = None) -> None:
    run_dir = r.dir(out)
    overrides = [*r.overrides, f"optim.lr={lr}"] if r.stage == "final" else list(r.overrides)
    overrides += extra or []
    cfg = compose("train", overrides=[f"trainer.default_root_dir={run_dir}", *overrides])
    t0 = time.time()
    try:
        rec = train_run(cfg, run_dir, overrides)
        value = rec["metrics"].get(METRIC[r.task], float("nan"))
        print(f"{r.stage} {r.task} {r.method} {r.label} lr {lr:g}: {value:.4f} "
              f"(trainable {rec['trainable_params']:,}, {time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    except Exception as err:  # recorded as failed in results.json by run(); keep going
        print(f"{r.stage} {r.task} {r.method} {r.label}: FAILED {type(err).__name__}: {err}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not Path(args.data_dir).is_dir():
        print(f"reproduce.py: --data-dir {args.data_dir} does not exist (a directory of GLUE TSV files)",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out)
    if args.report_only:
        return report(out, args)
    runs = plan(args)
    print(f"{len(runs)} runs -> {out}", flush=True)
    start = time.time()
    if args.workers > 1:
        given = list(argv if argv is not None else sys.argv[1:])
        child = [sys.executable, __file__, *_without(given, "--workers", "--threads", "--no-report")]
        child += ["--no-report", "--workers", "1", "--threads", "1"]
        procs = [subprocess.Popen(child) for _ in range(args.workers)]
        codes = [p.wait() for p in procs]
        if any(codes):
            print(f"reproduce.py: worker exit codes {codes}", file=sys.stderr)
    else:
        import torch

        torch.set_num_threads(args.threads)
        work(args, runs)
    elapsed = time.time() - start
    print(f"study time {elapsed:.0f} s", flush=True)
    if args.workers > 1 or not args.no_report:
        timing = out / "study_time.json"
        spent = json.loads(timing.read_text()).get("seconds", 0.0) if timing.is_file() else 0.0
        timing.write_text(json.dumps({"seconds": spent + elapsed, "note": "wall time summed over invocations"}))
    return 0 if args.no_report else report(out, args)


def _without(argv: list[str], *options: str) -> list[str]:
    """``argv`` without ``options`` (``--opt value``, ``--opt=value`` or a bare flag)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = a != "--no-report"
        elif not any(a.startswith(o + "=") for o in options):
            out.append(a)
    return out


def report(out: Path, args: argparse.Namespace) -> int:
    """Tidy every finished run (portable paths, short labels), then fish-report, study.md and plots."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fish_lightning.app.report import write_report
    from study_report import write_study

    common = set(common_overrides(args))
    for res in sorted(out.glob("*/*/*/*/results.json")):
        rec = json.loads(_portable(res.read_text()))
        own = [o for o in rec.get("overrides", []) if o not in common and not o.startswith("data.path=")]
        rec["group"] = " ".join(sorted(o for o in own if not o.startswith("seed=")))
        rec["method"] = res.parent.parent.name  # the study's label (ablation variants differ only in settings)
        if rec.get("status") == "ok":
            rec.pop("traceback", None)
        res.write_text(json.dumps(rec, indent=1))
        for name in ("config.yaml", "train.log"):
            f = res.with_name(name)
            if f.is_file():
                f.write_text(_portable(f.read_text()))
    (out / "study.json").write_text(json.dumps({"common_overrides": sorted(_portable(o) for o in common),
                                                "command": study_command(args)}, indent=1))  # fmt: skip
    stage = out / ("ablation" if args.ablation else "final")
    if stage.is_dir():
        for path in write_report(stage).values():
            if path.suffix in (".md", ".csv"):
                path.write_text(_portable(path.read_text()))
    if not args.ablation:
        write_study(out, args, METRIC, TRIVIAL)
    plot_per_task(stage, out)
    return 0


def study_command(args: argparse.Namespace) -> str:
    """The command line that (re)makes this study's runs."""
    opts = {"--tasks": args.tasks, "--peft": args.peft, "--seeds": args.seeds, "--lrs": args.lrs,
            "--holdout": args.holdout, "--train-samples": args.train_samples, "--epochs": args.epochs,
            "--warmup-steps": args.warmup_steps, "--model": args.model, "--pooling": args.pooling}  # fmt: skip
    flags = (" --ablation" if args.ablation else "") + (f" --methods {args.methods}" if args.methods else "")
    return "python scripts/reproduce.py" + flags + "".join(f" {k} {v}" for k, v in opts.items())


def _portable(text: str) -> str:
    """Absolute paths of this checkout and its siblings (../shared) made relative to the repo root, and
    the home directory (e.g. the tokenisation cache) written as ``~``."""
    return text.replace(f"{ROOT}/", "").replace(f"{ROOT.parent}/", "../").replace(f"{Path.home()}/", "~/")


def plot_per_task(stage: Path, out: Path) -> None:
    """``results_<task>.png``: the task metric per method, mean ± std over seeds (bars in run order)."""
    by_task: dict[str, dict[str, list[float]]] = {}
    for res in sorted(stage.glob("*/*/seed*/results.json")):
        rec = json.loads(res.read_text())
        if rec.get("status") != "ok":
            continue
        metric = METRIC.get(rec["task"], rec["primary_metric"])
        by_task.setdefault(rec["task"], {}).setdefault(rec["method"], []).append(rec["metrics"][metric])
    for task, table in by_task.items():
        fig = task_bar_figure(task, table)
        fig.savefig(out / f"results_{task}.png", dpi=110)
        fig.clf()


def task_bar_figure(task: str, table: dict[str, list[float]]):
    """One task's bars: mean ± std over seeds per method, the axis from 0 (or below, for a negative score) so that
    bar heights compare, each mean written on its bar, the trivial predictor as a dotted line, the legend beside
    the axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = list(table)
    means = [statistics.mean(table[n]) for n in names]
    stds = [statistics.stdev(table[n]) if len(table[n]) > 1 else 0.0 for n in names]
    colors = ["#888" if "+" not in n else "#1f77b4" if "fisher" in n else "#2ca02c" if "normalized" in n
              else "#ff7f0e" if "random" in n else "#d62728" for n in names]  # fmt: skip
    fig = Figure(figsize=(1.1 * len(names) + 3.6, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=4)
    span = max(m + s for m, s in zip(means, stds)) - min(0.0, *(m - s for m, s in zip(means, stds)))
    for bar, m, s in zip(bars, means, stds):  # each mean just beyond its error bar
        up = m >= 0
        ax.text(bar.get_x() + bar.get_width() / 2, (m + s) if up else (m - s), f"{m:.3f}", fontsize=8,
                ha="center", va="bottom" if up else "top")  # fmt: skip
    ax.axhline(TRIVIAL.get(task, 0.0), color="k", lw=0.8, ls=":", label="trivial predictor")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(METRIC.get(task, "metric"))
    ax.set_title(f"{task}: mean ± std over seeds (dev)")
    lo = min(0.0, *(m - s for m, s in zip(means, stds)))
    ax.set_ylim(max(-1.0, lo - 0.12 * span) if lo < 0 else 0.0, max(m + s for m, s in zip(means, stds)) + 0.12 * span)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
