"""What the fish-train tests share: the CLI in a subprocess, the small kept run's overrides, safetensors checks.

``kept_run`` (tests/conftest.py) runs :data:`KEEP` once per session for every module that compares against it."""

import os
import subprocess
import sys
from pathlib import Path

import torch


def cli(args, tmp_path, entry="fish-train", **env_extra):
    if "PYTHONPATH" in env_extra and os.environ.get("PYTHONPATH"):  # keep the caller's path (e.g. a source tree)
        env_extra["PYTHONPATH"] = os.pathsep.join([env_extra["PYTHONPATH"], os.environ["PYTHONPATH"]])
    env = dict(os.environ, FISH_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               **env_extra)  # fmt: skip
    exe = Path(sys.executable).parent / entry
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", f"fish_lightning.{entry.split('-')[1]}"]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)



KEEP = ["experiment=tiny", "data.train_samples=64", "data.val_samples=32", "data.batch_size=16",
        "checkpoint.every_n_train_steps=3", "trainer.deterministic=true",
        "trainer.enable_progress_bar=false"]  # fmt: skip
# 4 batches an epoch, 2 epochs; FISH freezes at the start of epoch 1 (global step 4); checkpoints at steps 3, 6, ...


def keep_run(tmp_path_factory, name, *extra):
    root = tmp_path_factory.mktemp(name)
    proc = cli([*KEEP, *extra, f"hydra.run.dir={root}/run"], root)
    return root / "run", proc


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def bit_identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
