"""Promises off the happy path: manual optimization, a second fit, closure and factored optimizers, calibration,
checkpoints loaded outside fit. Tiny MLP, seconds each."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import SnapshotAtFreeze, TinyClassifier, make_loader, make_trainer, params_of
from fish_lightning import FisherMaskCallback, TieWarning

OPTIMIZERS = {
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=0.01),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, weight_decay=0.01),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.01),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=0.01),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.01),
    "asgd": lambda p: torch.optim.ASGD(p, lr=1e-2, weight_decay=0.01, t0=1),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-3),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2, weight_decay=0.01),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=4, history_size=3),
}
#: (optimizer, sparse_optimizer_state) -> the refusal expected at fit start; every other cell: frozen bit-identical
REFUSED = {("lbfgs", True): "does not support LBFGS", ("adafactor", True): "does not support Adafactor"}


class Model(TinyClassifier):
    """TinyClassifier with any optimizer, automatic or manual optimization (manual: a closure step, clipping)."""

    def __init__(self, opt: str = "adamw_foreach", manual: bool = False, clip: float | None = None, lr: float = 0):
        super().__init__()
        self.opt_name, self.clip, self.sgd_lr = opt, clip, lr
        self.automatic_optimization = not manual

    def configure_optimizers(self):
        if self.sgd_lr:
            return torch.optim.SGD(self.parameters(), lr=self.sgd_lr)
        return OPTIMIZERS[self.opt_name](self.parameters())

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        opt = self.optimizers()
        x, y = batch

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(self(x), y)
            self.manual_backward(loss)
            if self.clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
            return loss

        opt.step(closure=closure)


def fit(cb, model, max_epochs=2, **kw):
    snap = SnapshotAtFreeze(cb)
    trainer = make_trainer([cb, snap], max_epochs=max_epochs, **kw)
    trainer.fit(model, make_loader())
    return trainer, snap


def assert_frozen_unchanged(cb, model, at_freeze):
    final = params_of(model)
    moved_kept = 0
    for n, m in cb.masks.items():
        assert torch.equal(final[n][~m], at_freeze[n][~m]), n
        moved_kept += int((final[n][m] != at_freeze[n][m]).sum())
    assert moved_kept > 0  # the kept entries did train
    assert cb.verify(model)["frozen_unchanged"]


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse_state"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_optimizer_matrix(opt, sparse, manual, one_thread):
    cb = FisherMaskCallback(sparsity=0.8, warmup_steps=3, mask_epoch=1, sparse_optimizer_state=sparse, strict=True)
    model = Model(opt, manual=manual, clip=0.5 if manual else None)
    if (opt, sparse) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[(opt, sparse)]):
            fit(cb, model)
        return
    _, snap = fit(cb, model, gradient_clip_val=None if manual or opt == "lbfgs" else 0.5)
    assert cb.num_kept == round(0.2 * cb.num_candidates)
    assert cb.warmup_steps_done == 3
    assert_frozen_unchanged(cb, model, snap.at_freeze)


class StepRecorder(Callback):
    """Parameter change of every optimizer step after the freeze."""

    def __init__(self, fish):
        self.fish, self.before, self.updates = fish, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = params_of(pl_module) if self.fish.frozen else None

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.before is not None:
            after = params_of(pl_module)
            self.updates.append(torch.cat([(after[n] - self.before[n]).reshape(-1) for n in after]))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse_state"])
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_clipping_sees_only_kept_gradients(manual, sparse, one_thread):
    """SGD(lr=1), clip 0.01: every masked step moves the kept entries by exactly the clip norm, whether the user
    clips between backward and step (manual) or Lightning does (automatic)."""
    clip = 0.01
    cb = FisherMaskCallback(sparsity=0.9, warmup_steps=3, mask_epoch=1, sparse_optimizer_state=sparse)
    rec = StepRecorder(cb)
    model = Model(manual=manual, clip=clip if manual else None, lr=1.0)
    make_trainer([cb, rec], max_epochs=2, gradient_clip_val=None if manual else clip).fit(model, make_loader())
    norms = torch.stack([u.norm() for u in rec.updates])
    assert len(norms) == 8
    torch.testing.assert_close(norms, torch.full_like(norms, clip), rtol=1e-4, atol=0)


def test_second_fit_after_freeze_sparse_state_compacts_the_new_optimizer(one_thread):
    cb = FisherMaskCallback(sparsity=0.9, warmup_steps=3, mask_epoch=1, sparse_optimizer_state=True, strict=True)
    model = Model("adamw_foreach")
    _, snap = fit(cb, model)
    trainer = make_trainer([cb], max_epochs=2)
    trainer.fit(model, make_loader())
    state = trainer.optimizers[0].state
    assert sum(v.numel() for st in state.values() for v in st.values() if v.dim() > 0) == 2 * cb.num_kept
    assert_frozen_unchanged(cb, model, snap.at_freeze)


def test_second_fit_before_the_freeze_keeps_the_warmup_fisher(one_thread):
    """The first fit ends (max_steps) after the warmup but before mask_epoch: the second fit selects from the
    Fisher of those warmup steps (kept, with the count), not from an all-zero Fisher."""
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=3, mask_epoch=1, keep_fisher=True)
    model = Model()
    with pytest.warns(UserWarning, match="training ended before the mask was frozen"):
        make_trainer([cb], max_epochs=2, max_steps=5).fit(model, make_loader())
    fisher = {n: f.clone() for n, f in cb.fisher.items()}
    assert cb.warmup_steps_done == 3 and all(bool(f.any()) for f in fisher.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", TieWarning)
        make_trainer([cb], max_epochs=2).fit(model, make_loader())
    assert cb.frozen and cb.warmup_steps_done == 3
    for n in fisher:
        assert torch.equal(cb.fisher[n], fisher[n]), n


def test_one_callback_on_a_new_model_starts_over(one_thread):
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=3, mask_epoch=1, strict=True, keep_fisher=True)
    fit(cb, Model())
    first = {n: m.clone() for n, m in cb.masks.items()}
    other = Model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-2.0)
    with pytest.warns(UserWarning, match="not the one the callback's state belongs to"):
        _, snap = fit(cb, other)
    assert cb.frozen and cb.warmup_steps_done == 3
    assert any(not torch.equal(first[n], cb.masks[n]) for n in first)
    assert_frozen_unchanged(cb, other, snap.at_freeze)


def test_lbfgs_counts_optimizer_steps_not_closure_calls(one_thread):
    """LBFGS evaluates its closure up to 4 times per step: the warmup counts steps, the Fisher takes the first
    evaluation of each, and the guard snapshots once per step (sparse state is refused: see the matrix)."""
    cb = FisherMaskCallback(sparsity=0.8, warmup_steps=3, mask_epoch=None, keep_fisher=True, strict=True)
    model = Model("lbfgs")
    _, snap = fit(cb, model, max_epochs=1)
    assert cb.freeze_step == 3 and cb.warmup_steps_done == 3
    assert_frozen_unchanged(cb, model, snap.at_freeze)


class NoFisherLoss(Model):
    pass


def test_calibration_with_manual_optimization_needs_fisher_loss(one_thread):
    cb = FisherMaskCallback(sparsity=0.8, warmup_steps=0, mask_epoch=None, calibration_samples=16)
    with pytest.raises(ValueError, match=r"needs `fisher_loss\(batch\) -> Tensor\[batch\]`.*NoFisherLoss"):
        fit(cb, NoFisherLoss(manual=True))


class WithFisherLoss(Model):
    def fisher_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")


def test_calibration_with_manual_optimization_updates_nothing(one_thread):
    model = WithFisherLoss(manual=True)
    init = params_of(model)
    cb = FisherMaskCallback(sparsity=0.8, warmup_steps=0, mask_epoch=None, calibration_samples=16, strict=True)
    _, snap = fit(cb, model, max_epochs=1)
    assert cb.calibration_examples == 16 and cb.freeze_step == 0
    for n, t in snap.at_freeze.items():
        assert torch.equal(t, init[n]), n
    assert_frozen_unchanged(cb, model, snap.at_freeze)


def test_checkpoint_loaded_outside_fit_has_masks_and_verifies(tmp_path, one_thread):
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=3, mask_epoch=1)
    model = Model()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    make_trainer([cb, ckpt], max_epochs=2, enable_checkpointing=True).fit(model, make_loader())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["FisherMaskCallback"]
    loaded = FisherMaskCallback(sparsity=0.7, warmup_steps=3, mask_epoch=1)
    loaded.load_state_dict(state)
    assert loaded.frozen and loaded.num_kept == cb.num_kept and loaded.freeze_step == cb.freeze_step
    for n, m in cb.masks.items():
        assert torch.equal(loaded.masks[n], m), n
    assert loaded.verify(model)["frozen_unchanged"]
    with torch.no_grad():
        p = dict(model.named_parameters())["net.0.weight"]
        p[~cb.masks["net.0.weight"]] += 1.0
    assert loaded.verify(model)["moved"] == ["net.0.weight"]


def test_warmup_shortfall_warning_counts_partial_accumulation_windows():
    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=4, mask_epoch=1)  # 8 batches, accumulate 3: 3 steps/epoch
    with pytest.warns(UserWarning, match="only 3 optimizer steps run before mask_epoch=1"):
        fit(cb, Model(), accumulate_grad_batches=3)


class SumLoss(WithFisherLoss):
    """Training loss summed over the batch (not averaged)."""

    def training_step(self, batch, batch_idx):
        return self.fisher_loss(batch).sum()


def loop_fisher(model, n_batches):
    from fish_lightning.core.fisher import per_example_fisher

    params = dict(model.named_parameters())
    fisher = None
    for i, batch in enumerate(make_loader()):
        if i == n_batches:
            break
        fisher, _ = per_example_fisher(model.fisher_loss, batch, params, fisher)
    return fisher


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_reduction_setting_gives_the_exact_fisher(reduction, one_thread):
    """SGD with lr 0 holds the weights: the warmup Fisher must equal the batch-size-1 loop over the same batches."""
    model = (SumLoss if reduction == "sum" else WithFisherLoss)(lr=1e-30)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)
    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=4, mask_epoch=1, keep_fisher=True, loss_reduction=reduction)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "FISH: the training loss")
        make_trainer([cb], max_epochs=2).fit(model, make_loader())
    ref = loop_fisher(model, 4)
    for n in ref:
        torch.testing.assert_close(cb.fisher[n], ref[n], rtol=1e-5, atol=1e-9)


def test_summed_loss_with_the_mean_setting_is_detected():
    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=2, mask_epoch=1)
    with pytest.warns(UserWarning, match=r"looks like the sum of fisher_loss.*loss_reduction='mean'.*'sum'"):
        fit(cb, SumLoss())
    with pytest.raises(ValueError, match=r"loss_reduction='none' is not valid: expected one of \('mean', 'sum'\)"):
        FisherMaskCallback(loss_reduction="none")
