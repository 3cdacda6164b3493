"""FSDP2 (ModelParallelStrategy + fully_shard) on 2 CPU ranks (gloo): the Fisher is accumulated on
each rank's shards, the global top-k over shards keeps exactly k entries, the same entries as DDP,
and frozen entries stay bit-identical. GPU-only setups (FSDP1, CUDA) are checked by
scripts/check_sharded_gpu.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("fsdp_script.py")


def launch(out: Path, mode: str, estimator: str, selection: str, port: int, epoch: str = "") -> list[dict]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_PORT=str(port))
    args = [sys.executable, str(SCRIPT), str(out), mode, estimator, selection, *([epoch] if epoch else [])]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"{mode}{epoch}_{estimator}_{selection}_rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize(("estimator", "selection"), [("per_example", "fisher"), ("batch_grad", "random")])
def test_fsdp2_masks_equal_ddp_and_frozen_entries_stay(tmp_path, estimator, selection):
    base = 29900 + (os.getpid() % 40) * 2 + (selection == "random") * 80
    fsdp = launch(tmp_path, "fsdp", estimator, selection, base)
    ddp = launch(tmp_path, "ddp", estimator, selection, base + 1)
    r0, r1 = fsdp
    assert r0["sharded"] and set(r0["sharded"]) == set(r0["masks"])  # every LoRA tensor was a DTensor shard
    total = sum(m.numel() for m in r0["masks"].values())
    k = round(0.2 * total)
    for rank in fsdp:
        assert rank["kept"] == k and rank["verify"]["frozen_unchanged"]
    assert sum(int(m.sum()) for m in r0["masks"].values()) == k  # exactly k over the gathered shards
    some = r0["sharded"][0]
    assert r0["local_shapes"][some][0] < r0["masks"][some].shape[0]  # each rank held part of the rows
    if estimator == "per_example":  # per module call reduce-scattered into the shards: no whole-shaped sums
        assert r0["hook_sum_shapes"] == r0["local_shapes"]
    for n, m in r0["masks"].items():
        assert torch.equal(m, r1["masks"][n]), n  # the same whole mask seen from both ranks
        assert torch.equal(m, ddp[0]["masks"][n]), n  # and the one DDP selects
        if selection == "fisher":
            torch.testing.assert_close(r0["fisher"][n], ddp[0]["fisher"][n], rtol=1e-5, atol=1e-12)
        before, after = r0["at_freeze"][n], r0["final"][n]
        assert torch.equal(after[~m], before[~m]), n  # AdamW(weight_decay) did not move frozen entries
    assert any(not torch.equal(r0["final"][n][m], r0["at_freeze"][n][m]) for n, m in r0["masks"].items())


def test_fsdp2_resume_mid_warmup_and_after_freeze_equals_uninterrupted(tmp_path):
    # ModelParallelStrategy restores callback state after on_fit_start: the Fisher must still be restored
    base = 29700 + (os.getpid() % 60) * 3
    full = launch(tmp_path, "full", "per_example", "fisher", base)
    for i, epoch in enumerate(("0", "2")):  # checkpoint of epoch 0: mid-warmup; of epoch 2: after the freeze
        resumed = launch(tmp_path, "resume", "per_example", "fisher", base + 1 + i, epoch)
        for a, b in zip(full, resumed):
            assert b["verify"]["frozen_unchanged"] and b["kept"] == a["kept"]
            for n in a["masks"]:
                assert torch.equal(a["masks"][n], b["masks"][n]), (epoch, n)
                assert torch.equal(a["final"][n], b["final"][n]), (epoch, n)
                if epoch == "0":
                    assert torch.equal(a["fisher"][n], b["fisher"][n]), n


@pytest.mark.parametrize("name", ["DeepSpeedStrategy", "FSDPStrategy"])
def test_strategies_that_cannot_hold_frozen_entries_are_refused(name):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from conftest import TinyClassifier, make_loader, make_trainer
    from fish_lightning import FisherMaskCallback

    lookalike = type(name, (SingleDeviceStrategy,), {})(device=torch.device("cpu"))  # only the class name matters
    trainer = make_trainer([FisherMaskCallback(sparsity=0.5, warmup_steps=2)], max_epochs=2, strategy=lookalike)
    with pytest.raises(ValueError, match=f"FISH does not support {name}"):
        trainer.fit(TinyClassifier(), make_loader())
