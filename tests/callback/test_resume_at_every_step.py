"""A phase change does not hang on one Lightning hook: resuming from a checkpoint taken at any step (before, at and
after the freeze, epoch ends included) ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TinyClassifier, make_loader, make_trainer
from fish_lightning import FisherMaskCallback

N, BATCH, EPOCHS = 24, 8, 3  # 3 optimizer steps per epoch, 9 in all


class Manual(TinyClassifier):
    """TinyClassifier under manual optimization (backward, clip, step)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt.step()
        return loss


class ResumableLoader:
    """A DataLoader that a mid-epoch checkpoint resumes where it stopped (Lightning's ``state_dict`` protocol), so
    that a resumed run sees the same batches as the uninterrupted one."""

    def __init__(self, loader) -> None:
        self.loader, self.trainer, self._skip = loader, None, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(self.loader):
            if i >= skip:
                yield batch

    def state_dict(self) -> dict:
        return {"done": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed % len(self)}

    def load_state_dict(self, state: dict) -> None:
        self._skip = state["done"]


def run(settings, manual, tmp=None, ckpt_path=None):
    model = Manual() if manual else TinyClassifier()
    cb = FisherMaskCallback(**settings)
    extra, kw = [], {}
    if tmp is not None:
        extra = [ModelCheckpoint(dirpath=tmp / "steps", save_top_k=-1, every_n_train_steps=1, filename="{step}"),
                 ModelCheckpoint(dirpath=tmp / "epochs", save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
        kw["enable_checkpointing"] = True
    trainer = make_trainer([cb, *extra], max_epochs=EPOCHS, **kw)
    loader = ResumableLoader(make_loader(n=N, batch=BATCH))
    loader.trainer = trainer
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model, cb


CASES = {
    "mask_epoch=1": dict(sparsity=0.7, warmup_steps=2, mask_epoch=1),
    "mask_epoch=2,sparse_state": dict(sparsity=0.7, warmup_steps=4, mask_epoch=2, sparse_optimizer_state=True),
    "after_warmup": dict(sparsity=0.7, warmup_steps=4, mask_epoch=None),
}


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("case", list(CASES))
def test_resume_from_every_checkpoint_ends_bit_identical(case, manual, tmp_path, one_thread):
    if manual and case != "mask_epoch=1":
        pytest.skip("manual optimization: one case is enough")
    settings = CASES[case]
    full, full_cb = run(settings, manual, tmp=tmp_path)
    paths = sorted((tmp_path / "steps").glob("*.ckpt")) + sorted((tmp_path / "epochs").glob("*.ckpt"))
    assert len(paths) == EPOCHS * N // BATCH + EPOCHS
    wrong = {}
    for path in paths:
        resumed, cb = run(settings, manual, ckpt_path=path)
        problems = [n for n, m in (cb.masks or {}).items() if not torch.equal(m, full_cb.masks[n])]
        problems += [n for (n, p), q in zip(resumed.named_parameters(), full.parameters()) if not torch.equal(p, q)]
        if cb.freeze_step != full_cb.freeze_step or not cb.verify(resumed)["frozen_unchanged"]:
            problems.append(f"frozen at step {cb.freeze_step}, not {full_cb.freeze_step}")
        if problems:
            wrong[f"{path.parent.name}/{path.name}"] = problems
    assert wrong == {}
