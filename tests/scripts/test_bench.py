"""scripts/bench.py runs (tiny model) and reports its ratios; timing targets live in the script, not here."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


def test_bench_tiny_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"fisher_hooks / plain_fwd_bwd", "step_masked / step_vanilla"} <= set(res["ratios"])
    assert res["hooks_vs_loop_max_rel_err"] < 1e-5  # exactness is a property, not a timing
    assert res["resident_bytes_per_candidate_after_freeze"] <= 1.0
    assert "fisher_hooks / plain_fwd_bwd" in proc.stdout
    ops = res["callback_ops_per_masked_step"]
    for state in ("dense", "sparse_state"):  # the callback's ops per masked step do not grow with the layers
        two, eight = ops[f"tiny_bert_2_layers {state}"], ops[f"tiny_bert_8_layers {state}"]
        assert eight["tensors"] == 4 * two["tensors"]
        assert eight["aten_ops_top_level"] == two["aten_ops_top_level"] <= 20


def test_bench_sparse_state_tiny_runs(tmp_path):
    script = SCRIPT.with_name("bench_sparse_state.py")
    out = tmp_path / "bss.json"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--steps", "1", "--densities", "0.1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense, sparse = json.loads(out.read_text())
    assert dense["state"] == "dense masked" and sparse["state"] == "sparse (kept only)"
    # state bytes <= density x dense + scalars (Adam's step counters)
    assert sparse["optimizer_state_bytes_after_freeze"] <= 0.1 * dense["optimizer_state_bytes_after_freeze"] + 4096
