"""Checkpoints and resume for ``fish-train``: ``D/checkpoints/last.ckpt``, the RNG states in it, and where to resume.

A run with ``checkpoint.every_n_train_steps=N`` writes ``last.ckpt`` in its run directory every ``N`` optimizer
steps and at each epoch end (Lightning's ``ModelCheckpoint``, ``save_last``), and ``best.ckpt`` at the best value of
the primary validation metric so far. ``resume=true`` continues from ``last.ckpt``; ``ckpt_path=`` starts from any
checkpoint. Checkpoints hold the trainable tensors only (:mod:`fish_lightning.app.lean_checkpoint`).
An uninterrupted run and a resumed one end bit-identical (CPU, ``trainer.deterministic=true``): the checkpoint
holds the model, optimizer, scheduler, loops, the FISH callback's state, the data order
(:mod:`fish_lightning.app.data_order`) and the global RNG states (:class:`RNGStates`, for dropout).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fish_lightning.app.errors import ConfigError

log = logging.getLogger("fish_lightning")

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"


class RNGStates(pl.Callback):
    """Saves the global RNG states (torch CPU and CUDA, numpy, ``random``) in each checkpoint and restores them
    when training resumes (at ``on_train_start``: after the sanity check, whose loader draws a seed), so dropout
    continues as in an uninterrupted run."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain tensors and numbers only: the checkpoint must load with torch.load(weights_only=True)
        numpy_state = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_callbacks(every_n_train_steps: int | None, run_dir: Path,
                         monitor: tuple[str, str] | None = None) -> list[pl.Callback]:  # fmt: skip
    """``ModelCheckpoint`` callbacks writing ``run_dir/checkpoints/last.ckpt`` every ``every_n_train_steps``
    optimizer steps and at each epoch end (two callbacks: Lightning takes one trigger per callback), with
    ``monitor = (metric, "max" | "min")`` ``run_dir/checkpoints/best.ckpt`` (the best validation so far), plus
    :class:`RNGStates`; ``[]`` for ``None``."""
    if every_n_train_steps is None:
        return []
    if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
        raise ConfigError(f"checkpoint.every_n_train_steps={every_n_train_steps!r} must be null or an integer >= 1")
    where = str(run_dir / CHECKPOINT_DIR)
    common: dict[str, Any] = {"dirpath": where, "save_last": True, "save_top_k": 0, "enable_version_counter": False}
    best = []
    if monitor is not None:
        metric, mode = monitor
        best = [ModelCheckpoint(dirpath=where, filename=BEST.removesuffix(".ckpt"), monitor=metric, mode=mode,
                                save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False)]  # fmt: skip
    return [
        ModelCheckpoint(every_n_train_steps=every_n_train_steps, **common),
        ModelCheckpoint(every_n_epochs=1, **common),
        *best,
        RNGStates(),
    ]


def requeued() -> bool:
    """This process is a SLURM job that was requeued (preemption, or submitit's requeue at the time limit):
    ``SLURM_RESTART_COUNT`` >= 1."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def resume_path(run_dir: Path, resume: bool) -> str | None:
    """``run_dir/checkpoints/last.ckpt`` when ``resume`` (or the job is a requeued SLURM job, :func:`requeued`)
    and it exists (logged); ``None`` otherwise (a fresh start, said so when a resume was asked for)."""
    if requeued() and not resume:
        log.info(f"resume: requeued SLURM job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']})")
        resume = True
    if not resume:
        return None
    path = run_dir / CHECKPOINT_DIR / LAST
    if path.is_file():
        log.info(f"resume: continuing from {path}")
        return str(path)
    log.info(f"resume: no checkpoint at {path}: starting fresh")
    return None
