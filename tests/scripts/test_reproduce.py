"""scripts/reproduce.py --quick: the grid on held-out training rows, the final runs at the chosen rate, two
workers claiming runs, a resumed invocation that reruns nothing, the report and study.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GLUE = ROOT.parent / "shared" / "data" / "glue"
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(), reason=f"GLUE data not found at {GLUE}")
def test_reproduce_quick(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--quick", "--out", str(out)]
    proc = subprocess.run([*cmd, "--workers", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = {(p.parent.parent.name, p.parent.name): json.loads(p.read_text())
            for p in out.glob("grid/sst2/*/lr*/results.json")}  # fmt: skip
    assert set(grid) == {(m, lr) for m in ("lora-r2", "lora-r8+fisher") for lr in ("lr0.001", "lr0.003")}
    assert all(r["status"] == "ok" and "data.holdout=160" in r["overrides"] for r in grid.values())
    final = {p.parent.parent.name: json.loads(p.read_text()) for p in out.glob("final/sst2/*/seed0/results.json")}
    assert set(final) == {"lora-r2", "lora-r8+fisher"}
    for method, rec in final.items():
        scores = {lr: grid[method, lr]["metrics"]["val/accuracy"] for lr in ("lr0.001", "lr0.003")}
        best = max(scores, key=lambda lr: (scores[lr], -float(lr[2:])))  # ties: the smaller rate
        assert f"optim.lr={float(best[2:])}" in rec["overrides"] and not any("holdout" in o for o in rec["overrides"])
    assert final["lora-r2"]["trainable_params"] == final["lora-r8+fisher"]["trainable_params"]  # matched exactly
    assert not list(out.rglob(".claim"))
    study = (out / "study.md").read_text()
    assert "| lora-r8+fisher |" in study and "**sst2**" in study and "top 2 layers hold" in study
    assert (out / "results_sst2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data.path=../shared/data/glue" in (out / "study.json").read_text()  # portable, no machine paths
    assert (out / "final" / "summary.md").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)  # resume: nothing to do
    assert again.returncode == 0 and "lr 0.00" not in again.stdout, again.stdout[-2000:]


def test_comparison_rule():
    from study_report import compare

    diff, word = compare([0.80, 0.81, 0.79], [0.70, 0.71, 0.69])
    assert word == "better" and diff == pytest.approx(0.10)
    assert compare([0.80, 0.85, 0.75], [0.79, 0.84, 0.74])[1] == "tie"
    assert compare([0.5, 0.5], [0.5, 0.5])[1] == "tie"
    assert compare([0.6, 0.61, 0.6], [0.7, 0.71, 0.7])[1] == "worse"


def test_without_drops_options_and_values():
    from reproduce import _without

    assert _without(["--quick", "--workers", "2", "--threads=3", "--no-report", "--out", "x"],
                    "--workers", "--threads", "--no-report") == ["--quick", "--out", "x"]  # fmt: skip


@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(), reason=f"GLUE data not found at {GLUE}")
def test_sparsity_study_quick(tmp_path):
    """scripts/sparsity_study.py --quick: head-only, FISH-LoRA at 1% of r=8 and the FISH Mask (calibration) on full
    fine-tuning at 0.5%, each a 1-rate grid and 1 seed; exact budgets, pruned run dirs, tables, curve, resume."""
    out, pub = tmp_path / "runs", tmp_path / "pub"
    cmd = [sys.executable, str(ROOT / "scripts" / "sparsity_study.py"), "--quick", "--out", str(out),
           "--publish", str(pub)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = {p.parent.parent.name: json.loads(p.read_text()) for p in out.glob("final/sst2/*/seed0/results.json")}
    assert set(final) == {"head-only", "lora-r8+fisher@1%", "full+fisher@0.5%-calibration"}
    assert all(r["status"] == "ok" for r in final.values())
    head = final["head-only"]["trainable_params"]
    assert head == 770  # 384 x 2 + 2: the classifier alone
    assert final["lora-r8+fisher@1%"]["kept"] == round(0.01 * 73_728)
    assert final["lora-r8+fisher@1%"]["trainable_params"] == round(0.01 * 73_728) + head
    fft = final["full+fisher@0.5%-calibration"]
    assert fft["kept"] == round(0.005 * fft["candidates"]) and fft["trainable_params"] == fft["kept"] + head
    assert "fish.calibration_samples=64" in fft["overrides"] and "fish.warmup_steps=0" in fft["overrides"]
    stats = json.loads((out / "final/sst2/full+fisher@0.5%-calibration/seed0/mask_stats.json").read_text())
    assert stats["frozen_at_step"] == 0  # the mask before any update, as the original FISH Mask
    leftovers = [p for p in out.rglob("*") if p.suffix in (".safetensors", ".ckpt", ".bin") or p.name == ".claim"]
    assert not leftovers
    study = (pub / "study.md").read_text()
    assert "| lora-r8+fisher@1% | 1% | 1,507 |" in study and "1/1" in study
    assert (pub / "curve_sst2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (pub / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and all(",ok," in r for r in rows[1:])
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)  # resume: nothing to do
    assert again.returncode == 0 and "trainable" not in again.stdout, again.stdout[-2000:]


def test_sparsity_study_plan():
    from sparsity_study import GRIDS, PRIORITY, parse, plan

    args = parse(["--out", "/tmp/unused"])
    runs = plan(args)
    assert [r.task for r in runs][:1] == ["stsb"] and {r.task for r in runs} == {"stsb", "sst2"}
    full = {r.method for r in runs if r.method.startswith("full")}
    assert full and not any(r.method.startswith("full") for r in runs if r.task == "sst2")  # --full-tasks stsb
    stsb = [r for r in runs if r.task == "stsb"]
    order = list(dict.fromkeys(r.method for r in stsb))
    assert order == list(PRIORITY)
    first = [r for r in stsb if r.method == order[0]]
    assert [r.stage for r in first] == ["grid"] * len(GRIDS["head"]) + ["final"] * 3  # its grid, then its seeds
    fisher = next(r for r in stsb if r.method == "lora-r8+fisher@1%")
    assert "fish.sparsity=0.99" in fisher.overrides and "fish.warmup_steps=10" in fisher.overrides
    calib = next(r for r in stsb if r.method == "full+fisher@0.5%-calibration")
    assert {"peft=none", "fish.exclude=[classifier]", "fish.sparsity=0.995", "fish.warmup_steps=0",
            "fish.calibration_samples=1024"} <= set(calib.overrides)  # fmt: skip
    at_start = next(r for r in stsb if r.method == "full+random@0.5%-nowarmup")  # the original's random baseline
    assert {"fish=random", "fish.sparsity=0.995", "fish.warmup_steps=0"} <= set(at_start.overrides)
    assert not any(o.startswith("fish.calibration_samples") for o in at_start.overrides)
    head_grid = [r.dir(Path(args.out)) for r in first if r.stage == "grid"]
    assert all(r.head_from == head_grid for r in stsb if r.method != "head-only")  # heads at head-only's rate
    assert not first[0].head_from
    shared = plan(parse(["--out", "/tmp/unused", "--head-lr", "shared"]))
    assert not any(r.head_from for r in shared)
    with pytest.raises(SystemExit, match="--head-lr shared"):
        parse(["--reuse", "docs/results"])
    with pytest.raises(SystemExit, match="unknown method"):
        parse(["--methods", "lora-r8+fisher@2%"])
