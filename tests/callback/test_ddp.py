"""Masks identical on both ranks under Trainer(accelerator="cpu", devices=2, strategy="ddp")."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")


@pytest.mark.parametrize("mode", ["warmup", "calibration", "sparse"])
def test_ddp_two_ranks_same_fisher_and_mask(tmp_path, mode):
    env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_PORT=str(29500 + (os.getpid() % 500) + len(mode)))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
        assert torch.equal(r0["fisher"][n], r1["fisher"][n]), n
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    total = sum(m.numel() for m in r0["masks"].values())
    assert sum(int(m.sum()) for m in r0["masks"].values()) == round(0.2 * total)


def test_ddp_resume_during_warmup_equals_uninterrupted(tmp_path):
    # per-example Fisher sums are rank-local until the freeze: the checkpoint must hold their mean
    for mode in ("full", "resume"):
        env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_PORT=str(29600 + (os.getpid() % 300) + len(mode)))
        proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), mode], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        full, resumed = (torch.load(tmp_path / f"{m}{rank}.pt", weights_only=False) for m in ("full", "resume"))
        for n in full["masks"]:
            assert torch.equal(full["masks"][n], resumed["masks"][n]), n
            torch.testing.assert_close(full["fisher"][n], resumed["fisher"][n], rtol=1e-6, atol=0)
            assert torch.equal(full["params"][n], resumed["params"][n]), n
