"""Check FISH under sharded training on a machine with >= 2 CUDA GPUs (what CPU CI cannot run).

1. tests/callback/test_fsdp.py on the GPUs (NCCL) in fp32 and bf16-mixed: FSDP2 (ModelParallelStrategy +
   fully_shard) vs DDP: exactly k kept over the shards, the same masks as DDP, Fisher within 1e-5,
   frozen entries bit-identical under AdamW with weight decay.
2. Lightning's FSDPStrategy (FSDP1) and, if installed, DeepSpeedStrategy (ZeRO-2) are refused at
   fit start with a clear error instead of training with moving frozen entries.

Usage: python scripts/check_sharded_gpu.py      (prints one line per check; exit 1 if any failed)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pytest_on_gpu(precision: str) -> bool:
    env = dict(os.environ, FISH_ACCELERATOR="gpu", FISH_PRECISION=precision)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/callback/test_fsdp.py", "-k", "masks_equal_ddp"],
                          cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    print(f"[{'ok' if proc.returncode == 0 else 'FAILED'}] FSDP2 vs DDP on 2 GPUs, precision={precision}: "
          f"{proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]}")  # fmt: skip
    return proc.returncode == 0


def refused(strategy: str) -> bool:
    code = f"""
import sys, torch; sys.path.insert(0, "tests")
import lightning.pytorch as pl
from conftest import TinyClassifier, make_loader
from fish_lightning import FisherMaskCallback
t = pl.Trainer(accelerator="gpu", devices=2, strategy="{strategy}", max_epochs=2, logger=False,
               enable_checkpointing=False, callbacks=[FisherMaskCallback(sparsity=0.5, warmup_steps=2)])
try:
    t.fit(TinyClassifier(), make_loader())
except ValueError as err:
    assert "FISH does not support" in str(err), err
    sys.exit(0)
sys.exit("trained without the refusal")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    print(f"[{'ok' if proc.returncode == 0 else 'FAILED'}] strategy={strategy} refused at fit start"
          + ("" if proc.returncode == 0 else f": {proc.stderr[-500:]}"))
    return proc.returncode == 0


def main() -> int:
    import torch

    if torch.cuda.device_count() < 2:
        print(f"check_sharded_gpu.py needs >= 2 CUDA GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    results = [pytest_on_gpu("32-true"), pytest_on_gpu("bf16-mixed"), refused("fsdp")]
    if importlib.util.find_spec("deepspeed") is not None:
        results.append(refused("deepspeed_stage_2"))
    else:
        print("[skip] deepspeed is not installed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
