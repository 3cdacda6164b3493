"""scripts/check_gpu.py --dry-run: the single-GPU check's code paths on CPU with tiny shapes (the GPU run itself
needs a CUDA device; see docs/gpu.md)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_gpu.py"


def test_check_gpu_dry_run_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--rounds", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, (res["status"], proc.stderr[-3000:])
    assert res["environment"]["dry_run"] and res["status"] == "pass"
    sec = res["sections"]
    assert {r["method"] for r in sec["exactness"]["rows"]} == {"lora", "dora"}
    assert all(r["max_rel_err"] < 1e-4 for r in sec["exactness"]["rows"] if r["precision"] == "fp32")
    frozen = sec["frozen"]["rows"]
    assert len(frozen) == 6 and all(r["frozen_bit_identical"] and r["kept_trained"] for r in frozen)
    assert {r["state"] for r in frozen} == {"dense masked", "sparse_optimizer_state"}
    steps = sec["step_times"]["rows"]
    assert [r["checkpointing"] for r in steps] == [False, False, True]
    for r in steps:
        assert set(r["median_ms"]) == {"vanilla", "fish_warmup", "masked", "sparse_state"}
        assert r["optimizer_state_mib"]["sparse_state"] < r["optimizer_state_mib"]["masked"]
    assert sec["qlora"]["status"] in ("pass", "skip")
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Dry run on CPU" in md and "hooks vs the batch-size-1 loop" in md and "| sparse_state |" in md


def test_check_gpu_refuses_without_cuda_unless_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
