"""When does FISH help? The metric against the trainable budget, per task: FISH vs random vs reverse masks on LoRA
r=8 at budgets below what a LoRA rank reaches, vanilla LoRA at ranks 1, 2, 8, a head-only baseline, and the FISH
Mask on full fine-tuning (``peft=none``) against a random mask and dense fine-tuning.

Same rules and machinery as scripts/reproduce.py (in-process ``fish-train`` runs, resumable, lock-file claims):
per method, a learning-rate grid at seed 0 on held-out **training** rows (``data.holdout``), then ``--seeds``
seeds at the best rate on the whole dev split. Runs go method by method, in the order of :data:`PRIORITY`, so a
study cut short holds whole methods. Raw runs go to ``--out`` (default ``runs/sparsity``, ignored by git; model
weights are deleted after each run); ``--publish DIR`` writes only what the tables and figures need (``runs.csv``,
``study.md``, ``curve_<task>.png``, ``anatomy.json``).

Methods (``--methods``; budgets in % of LoRA r=8's 73,728 query/value adapter entries; the head trains densely
and is counted the same way for every method):

- ``head-only``: the classifier on the frozen encoder (``fish_lightning.app.freeze.TrainOnly``);
- ``lora-r1``, ``lora-r2``, ``lora-r8``: vanilla LoRA (r=2 holds 25% of r=8's entries, r=1 12.5%);
- ``lora-r8+<fisher|random|reverse>@<25|6.25|1|0.1>%``: masked LoRA r=8, mask after 10 dense warmup steps;
- ``lora-r8+fisher@1%-calibration``: the mask from 1,024 training examples before any update (LoRA's B is zero
  then, so every A entry scores 0), against ``lora-r8+fisher@1%`` (10 warmup steps);
- ``full``: dense full fine-tuning; ``full+<fisher|random>@<0.5|0.1>%``: the FISH Mask over every weight but the
  head (embeddings, encoder, pooler), Fisher from 10 dense warmup steps; ``full+fisher@<b>%-calibration``: from
  1,024 examples before any update, as the original FISH Mask; ``full+random@<b>%-nowarmup``: a random mask drawn
  before any update (no dense warmup steps), the original's random baseline.

``--reuse DIR`` copies matching finished runs of scripts/reproduce.py's study (LoRA r=2/r=8 and the masks sized
by ``budget.r=2``, which keep exactly 25% of r=8's entries: the same runs as ``@25%``) instead of re-running them.

Usage:
    nice -n 19 python scripts/sparsity_study.py --threads 1 --reuse docs/results        # the study (resumable)
    python scripts/sparsity_study.py --report-only --publish docs/results/sparsity       # tables and curves
    python scripts/sparsity_study.py --quick --out /tmp/q                                 # tiny, ~2 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import METRIC, ROOT, TASKS, TRIVIAL, Run, _portable, chosen_lr, common_overrides, work  # noqa: E402

R8_ENTRIES = 73_728  # LoRA r=8 on query/value of MiniLM-L6: 6 layers x 2 modules x 8 x (384 + 384)
LORA_BUDGETS = {"25%": 0.75, "6.25%": 0.9375, "1%": 0.99, "0.1%": 0.999}  # name -> fish.sparsity
FULL_BUDGETS = {"0.5%": 0.995, "0.1%": 0.999}
#: learning-rate grids per family: sparse masks need larger rates than dense training
GRIDS = {
    "head": (1e-2, 3e-2, 1e-1, 3e-1),  # the head alone learns slowly: its best rate is large
    "lora": (1e-3, 3e-3, 1e-2),  # vanilla LoRA and masks at 25% (the grid of scripts/reproduce.py)
    "lora-sparse": (3e-3, 1e-2, 3e-2),  # masks below 25%
    "full": (3e-5, 1e-4, 3e-4),
    "full-sparse": (3e-4, 1e-3, 3e-3),
}
WARMUP = ["fish.mask_epoch=null", "fish.warmup_steps=10"]
CALIBRATION = ["fish.mask_epoch=null", "fish.warmup_steps=0"]  # + fish.calibration_samples=<--calibration-samples>
NO_WARMUP = ["fish.mask_epoch=null", "fish.warmup_steps=0"]  # a selection without a Fisher: the mask at the start
HEAD_ONLY = ["peft=none", "fish=off", "+callbacks.head_only._target_=fish_lightning.app.freeze.TrainOnly",
             "+callbacks.head_only.patterns=[classifier]"]  # fmt: skip
FULL = ["peft=none", "fish.exclude=[classifier]"]
#: the order runs go in (a study cut short holds the first methods whole)
PRIORITY = (
    "head-only", "lora-r8+fisher@1%", "lora-r8+random@1%", "lora-r8+fisher@0.1%", "lora-r8+random@0.1%",
    "lora-r8+fisher@6.25%", "lora-r8+random@6.25%", "lora-r2", "lora-r8", "full", "full+fisher@0.5%-calibration",
    "full+random@0.5%", "lora-r8+reverse@1%", "lora-r1", "lora-r8+fisher@1%-calibration", "full+fisher@0.5%",
    "lora-r8+reverse@6.25%", "lora-r8+reverse@0.1%", "lora-r8+fisher@25%", "lora-r8+random@25%",
    "lora-r8+reverse@25%", "full+fisher@0.1%-calibration", "full+random@0.1%", "full+fisher@0.1%",
    "full+random@0.5%-nowarmup", "full+random@0.1%-nowarmup",
)  # fmt: skip
#: methods of scripts/reproduce.py's study that are the same runs
REUSE = {"lora-r2": "lora-r2", "lora-r8": "lora-r8", "lora-r8+fisher@25%": "lora-r8+fisher",
         "lora-r8+random@25%": "lora-r8+random", "lora-r8+reverse@25%": "lora-r8+reverse"}  # fmt: skip
KEEP = ("results.json", "mask_stats.json", "config.yaml", "train.log")


def method_table() -> dict[str, tuple[str, list[str]]]:
    """name -> (grid family, fish-train overrides)."""
    table: dict[str, tuple[str, list[str]]] = {"head-only": ("head", HEAD_ONLY)}
    for r in (1, 2, 8):
        table[f"lora-r{r}"] = ("lora", ["peft=lora", f"peft.r={r}", "fish=off"])
    for budget, sparsity in LORA_BUDGETS.items():
        family = "lora" if sparsity <= 0.75 else "lora-sparse"
        for sel in ("fisher", "random", "reverse"):
            table[f"lora-r8+{sel}@{budget}"] = (family, ["peft=lora", "peft.r=8", f"fish={sel}",
                                                         f"fish.sparsity={sparsity}", *WARMUP])  # fmt: skip
    table["lora-r8+fisher@1%-calibration"] = ("lora-sparse", ["peft=lora", "peft.r=8", "fish=fisher",
                                                              "fish.sparsity=0.99", *CALIBRATION])  # fmt: skip
    table["full"] = ("full", ["peft=none", "fish=off"])
    for budget, sparsity in FULL_BUDGETS.items():
        for sel in ("fisher", "random"):
            table[f"full+{sel}@{budget}"] = ("full-sparse", [*FULL, f"fish={sel}", f"fish.sparsity={sparsity}",
                                                             *WARMUP])  # fmt: skip
        table[f"full+fisher@{budget}-calibration"] = ("full-sparse", [*FULL, "fish=fisher",
                                                                      f"fish.sparsity={sparsity}", *CALIBRATION])
        table[f"full+random@{budget}-nowarmup"] = ("full-sparse", [*FULL, "fish=random", f"fish.sparsity={sparsity}",
                                                                   *NO_WARMUP])  # fmt: skip
    assert set(table) == set(PRIORITY), set(table) ^ set(PRIORITY)
    return table


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue"), help="GLUE TSV directory")
    ap.add_argument("--out", default=str(ROOT / "runs" / "sparsity"), help="raw runs (keep out of git)")
    ap.add_argument("--publish", default=None, help="also write the tables and curves here (e.g. docs/results/..)")
    ap.add_argument("--tasks", default="stsb,sst2")
    ap.add_argument("--methods", default=None, help="comma list (default: all, in priority order)")
    ap.add_argument("--full-tasks", default="stsb", help="tasks that also run the full fine-tuning methods")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--holdout", type=int, default=500)
    ap.add_argument("--train-samples", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--calibration-samples", type=int, default=1024, help="Fisher examples of the calibration masks")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--pooling", default="mean", choices=("cls", "mean"))
    ap.add_argument("--head-lr", default="chosen", choices=("chosen", "shared"),
                    help="chosen: every method's head trains at head-only's rate chosen on the holdout "
                         "(optim.head_lr); shared: the head at the method's own rate")  # fmt: skip
    ap.add_argument("--reuse", default=None, help="scripts/reproduce.py's output: copy its matching runs "
                                                  "(its heads share the method's rate: only with --head-lr shared)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--quick", action="store_true",
                    help="sst2, 3 small methods, 1 rate, 1 seed, 320 rows, 1 epoch, 128 dev rows")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="more fish-train overrides for every run")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.seeds, args.train_samples, args.holdout, args.epochs = "sst2", 1, 320, 96, 1
        args.calibration_samples = 64
        args.extra = [*args.extra, "data.val_samples=128"]  # the final runs score 128 dev rows, not all
        args.methods = args.methods or "head-only,lora-r8+fisher@1%,full+fisher@0.5%-calibration"
        args.full_tasks = "sst2"
    if args.reuse and args.head_lr != "shared":
        raise SystemExit("sparsity_study.py: --reuse copies runs whose head shares the method's rate: "
                         "add --head-lr shared, or drop --reuse")  # fmt: skip
    table = method_table()
    wanted = args.methods.split(",") if args.methods else list(PRIORITY)
    unknown = [m for m in wanted if m not in table]
    if unknown:
        raise SystemExit(f"sparsity_study.py: unknown method(s) {unknown}: expected some of {list(PRIORITY)}")
    if args.head_lr == "chosen" and "head-only" not in wanted:
        wanted.append("head-only")  # its grid chooses every head's rate
    args.method_list = [m for m in PRIORITY if m in wanted]
    for task in {*args.tasks.split(","), *args.full_tasks.split(",")} - {""}:
        if task not in TASKS:
            raise SystemExit(f"sparsity_study.py: unknown task {task!r}: expected some of {TASKS}")
    args.warmup_steps, args.ablation = 10, False  # for reproduce.common_overrides / study_command
    return args


def plan(args: argparse.Namespace) -> list[Run]:
    """Task-major, then method by method (its grid, then its seeds); with ``--head-lr chosen`` every run but
    head-only's waits for head-only's grid and trains its head at the rate chosen there."""
    common, out, table = common_overrides(args), Path(args.out), method_table()
    runs: list[Run] = []
    for task in args.tasks.split(","):
        head_grid = [out / "grid" / task / "head-only" / f"lr{lr:g}" for lr in GRIDS["head"]]
        if args.quick:
            head_grid = head_grid[1:2]
        for method in args.method_list:
            family, overrides = table[method]
            if family.startswith("full") and task not in args.full_tasks.split(","):
                continue
            if "fish.warmup_steps=0" in overrides and "fish=fisher" in overrides:  # calibration
                overrides = [*overrides, f"fish.calibration_samples={args.calibration_samples}"]
            base = [f"data={task}", *common, *overrides]
            lrs = GRIDS[family][1:2] if args.quick else GRIDS[family]
            grid = [Run("grid", task, method, f"lr{lr:g}", [*base, f"data.holdout={args.holdout}", f"optim.lr={lr}",
                                                            "seed=0"], 0, lr) for lr in lrs]  # fmt: skip
            finals = [Run("final", task, method, f"seed{s}", [*base, f"seed={s}"], s, None, [g.dir(out) for g in grid])
                      for s in range(args.seeds)]  # fmt: skip
            if args.head_lr == "chosen" and method != "head-only":
                for r in grid + finals:
                    r.head_from = head_grid
            runs += grid + finals
    return runs


def reuse(runs: list[Run], out: Path, old: Path) -> int:
    """Copy the finished runs of scripts/reproduce.py's study that are the same runs; returns how many."""
    copied = 0
    for r in runs:
        src = old / r.stage / r.task / REUSE.get(r.method, "") / r.label
        dst = r.dir(out)
        if r.method not in REUSE or (dst / "results.json").is_file() or not (src / "results.json").is_file():
            continue
        rec = json.loads((src / "results.json").read_text())
        if rec.get("status") != "ok":
            continue
        dst.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
        rec["reused_from"] = str(src.relative_to(old.parent) if old.is_relative_to(ROOT) else src)
        (dst / "results.json").write_text(json.dumps(rec, indent=1))
        copied += 1
    return copied


def prune(out: Path) -> None:
    """Delete what the tables do not need from finished runs (weights, masks, checkpoints)."""
    for res in out.glob("*/*/*/*/results.json"):
        for f in res.parent.iterdir():
            if f.is_file() and f.name not in KEEP and f.suffix != ".png":
                f.unlink()
            elif f.is_dir():
                shutil.rmtree(f)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not Path(args.data_dir).is_dir():
        print(f"sparsity_study.py: --data-dir {args.data_dir} does not exist (a directory of GLUE TSV files)",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out)
    if args.report_only and not out.is_dir():
        print(f"sparsity_study.py: --out {out} does not exist: nothing to report", file=sys.stderr)
        return 2
    runs = plan(args)
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            print(f"reused {reuse(runs, out, Path(args.reuse).resolve())} runs of {args.reuse}", flush=True)
        print(f"{len(runs)} runs -> {out}", flush=True)
        import torch

        torch.set_num_threads(args.threads)
        clock = _Clock(out / "study_time.json")
        try:
            work(args, runs)
        finally:
            clock.stop()
            prune(out)
    from sparsity_report import write_all

    write_all(out, args, runs, Path(args.publish) if args.publish else None)
    return 0


class _Clock:
    """Adds this invocation's wall time to ``path`` every 30 s and at the end (a killed study loses < 30 s)."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path, self.start = path, time.time()
        rec = json.loads(path.read_text()) if path.is_file() else {}
        self.before = float(rec.get("seconds", 0.0))
        self.done = threading.Event()
        threading.Thread(target=self._tick, daemon=True).start()

    def _write(self) -> None:
        seconds = self.before + time.time() - self.start
        self.path.write_text(json.dumps({"seconds": round(seconds), "note": "wall time summed over invocations"}))

    def _tick(self) -> None:
        while not self.done.wait(30):
            self._write()

    def stop(self) -> None:
        self.done.set()
        self._write()


def study_command(args: argparse.Namespace) -> str:
    """The command line that resumes this study."""
    opts = {"--tasks": args.tasks, "--full-tasks": args.full_tasks, "--seeds": args.seeds, "--holdout": args.holdout,
            "--train-samples": args.train_samples, "--epochs": args.epochs,
            "--calibration-samples": args.calibration_samples, "--head-lr": args.head_lr}  # fmt: skip
    if args.methods:
        opts["--methods"] = args.methods
    return "nice -n 19 python scripts/sparsity_study.py --threads 1" + "".join(f" {k} {v}" for k, v in opts.items())


__all__ = ["GRIDS", "LORA_BUDGETS", "METRIC", "R8_ENTRIES", "TRIVIAL", "chosen_lr", "main", "plan", "_portable"]

if __name__ == "__main__":
    raise SystemExit(main())
