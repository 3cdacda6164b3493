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
