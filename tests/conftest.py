"""Shared fixtures: a tiny classifier LightningModule, fixed data, a quiet CPU trainer."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# the tests mirror the source layers (core, masker, callback, integrations, adapters, app, scripts); a test module
# may share fixtures with another layer's by name (``from test_peft_e2e import token_batches``)
for _layer in sorted(Path(__file__).resolve().parent.iterdir()):
    if _layer.is_dir() and _layer.name not in ("fixtures", "__pycache__") and str(_layer) not in sys.path:
        sys.path.append(str(_layer))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


class TinyClassifier(pl.LightningModule):
    """2-layer MLP classifier; ``optimizer`` in {"adamw", "sgd"}."""

    def __init__(self, optimizer: str = "adamw", lr: float = 1e-2, weight_decay: float = 0.01, d_in: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, 3))
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def make_loader(n: int = 64, batch: int = 8, d_in: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def make_trainer(callbacks=(), max_epochs: int = 3, **kwargs) -> pl.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    opts.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **opts)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class SnapshotAtFreeze(pl.Callback):
    """Records parameter values right after the FISH callback freezes (place it after that callback)."""

    def __init__(self, fish) -> None:
        self.fish, self.at_freeze = fish, None

    def _check(self, pl_module) -> None:
        if self.at_freeze is None and self.fish.frozen:
            self.at_freeze = params_of(pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._check(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._check(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        self._check(pl_module)


@pytest.fixture
def tiny():
    return TinyClassifier()


GLUE_ROWS = {
    "SST-2": ("sentence\tlabel", ["a fine film\t1", "dull and slow\t0", "great fun\t1", "bad acting\t0"]),
    "CoLA": (
        None,
        ["gj04\t1\t\tThe cat sat.", "gj04\t0\t*\tCat the sat.", "gj04\t1\t\tIt rains.", "x\t0\t*\tRains it."],
    ),
    "RTE": (
        "index\tsentence1\tsentence2\tlabel",
        ["0\tA man walks.\tA person walks.\tentailment", "1\tA dog runs.\tA cat sleeps.\tnot_entailment"] * 2,
    ),
    "QNLI": (
        "index\tquestion\tsentence\tlabel",
        ["0\tWho ran?\tBob ran.\tentailment", "1\tWho ran?\tIt rained.\tnot_entailment"] * 2,
    ),
    "MRPC": (
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        ["1\t1\t2\tHe left.\tHe went away.", "0\t3\t4\tHe left.\tShe sang."] * 2,
    ),
    "STS-B": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        ["0\tg\tf\ty\t1\tn\tn\tA plane flies.\tA jet flies.\t4.5", "1\tg\tf\ty\t2\tn\tn\tA cat.\tA car.\t0.4"] * 2,
    ),
}


def write_glue(root) -> str:
    """A miniature GLUE directory (GLUE's file layouts, a few rows per split)."""
    for folder, (header, rows) in GLUE_ROWS.items():
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev"):
            lines = ([header] if header else []) + rows
            (d / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture
def glue_dir(tmp_path):
    return write_glue(tmp_path / "glue")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (two spin-wait under CPU contention); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class KillAfterCheckpoint(pl.Callback):
    """For ``fish-train`` subprocess tests (``+callbacks.kill._target_=conftest.KillAfterCheckpoint``, ``tests`` on
    ``PYTHONPATH``): SIGKILLs its own process at the first training batch end at or after global step ``at_step``
    once ``path`` exists. ``ModelCheckpoint`` runs after the other callbacks' batch-end hooks, so a file seen here
    was written completely at an earlier step."""

    def __init__(self, path: str, at_step: int = 0) -> None:
        self.path, self.at_step = path, at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.at_step and os.path.isfile(self.path):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="session")
def kept_run(tmp_path_factory):
    """One uninterrupted fish-train run (tiny BERT with dropout, LoRA, FISH): its directory and the process, shared
    by tests/app's artifact and resume tests."""
    from fish_train_runs import keep_run

    run_dir, proc = keep_run(tmp_path_factory, "kept")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc
