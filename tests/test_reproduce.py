"""scripts/reproduce.py --quick: one task, the LoRA methods at one budget, a report and plots (< 3 min)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"


@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(), reason=f"GLUE data not found at {GLUE}")
def test_reproduce_quick(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {p.parent.parent.name: json.loads(p.read_text()) for p in out.glob("sst2/*/seed0/results.json")}
    assert set(runs) == {"lora-r2", "lora-r8", "lora-r8+fisher", "lora-r8+random", "lora-r8+reverse"}
    assert all(r["status"] == "ok" for r in runs.values())
    budget = {runs[m]["trainable_params"] for m in ("lora-r2", "lora-r8+fisher", "lora-r8+random", "lora-r8+reverse")}
    assert len(budget) == 1 and runs["lora-r8"]["trainable_params"] > budget.pop()  # matched exactly
    table = (out / "summary.md").read_text()
    assert sum(ln.startswith("| lora") for ln in table.splitlines()) == 5
    assert (out / "results_sst2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data.path=../shared/data/glue" in (out / "study.json").read_text()  # portable, no machine paths
