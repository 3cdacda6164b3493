"""FisherMaskCallback through a real lightning.Trainer on a tiny MLP (seconds each)."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import SnapshotAtFreeze, TinyClassifier, make_loader, make_trainer, params_of
from fish_lightning import FisherMaskCallback
from fish_lightning.core.fisher import per_example_fisher
from fish_lightning.core.selection import num_kept


def fit(cb=None, max_epochs=3, model=None, loader=None, extra=(), **trainer_kw):
    model = model or TinyClassifier()
    callbacks = [cb] if cb is not None else []
    snap = SnapshotAtFreeze(cb) if cb is not None else None
    if snap:
        callbacks.append(snap)
    trainer = make_trainer(callbacks + list(extra), max_epochs=max_epochs, **trainer_kw)
    trainer.fit(model, loader or make_loader())
    return model, trainer, snap


@pytest.mark.parametrize("scope", ["global", "per_tensor", "normalized"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_exact_k_and_frozen_bit_identical_under_adamw(scope, sparsity):
    cb = FisherMaskCallback(sparsity=sparsity, warmup_steps=4, mask_epoch=1, scope=scope)
    model, _, snap = fit(cb)
    n = sum(p.numel() for p in model.parameters())
    if scope != "per_tensor":
        assert cb.num_kept == round((1 - sparsity) * n)
    else:
        assert cb.num_kept == sum(round((1 - sparsity) * p.numel()) for p in model.parameters())
    assert set(cb.masks) == {n for n, _ in model.named_parameters()}
    assert all(m.dtype == torch.bool for m in cb.masks.values())
    final = params_of(model)
    moved_kept = 0
    for name, m in cb.masks.items():
        assert torch.equal(final[name][~m], snap.at_freeze[name][~m]), name
        moved_kept += int((final[name][m] != snap.at_freeze[name][m]).sum())
    assert moved_kept > 0
    assert cb.fisher is None  # freed at the freeze


def test_frozen_bit_identical_sgd_momentum_with_clipping():
    cb = FisherMaskCallback(sparsity=0.8, warmup_steps=3, mask_epoch=1)
    model, _, snap = fit(cb, model=TinyClassifier(optimizer="sgd"), gradient_clip_val=0.05)
    final = params_of(model)
    for name, m in cb.masks.items():
        assert torch.equal(final[name][~m], snap.at_freeze[name][~m])


def test_sparsity_zero_equals_no_callback():
    ref, _, _ = fit(None)
    cb = FisherMaskCallback(sparsity=0.0, warmup_steps=2, mask_epoch=1)
    model, _, _ = fit(cb)
    assert all(m.all() for m in cb.masks.values())
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_mask_epoch_none_freezes_right_after_warmup():
    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=3, mask_epoch=None)
    fit(cb, max_epochs=1)
    assert cb.frozen and cb.freeze_step == 3 and cb.warmup_steps_done == 3


def test_warmup_fisher_batch_grad_is_sum_of_squared_step_gradients():
    grads = []

    class GradRecorder(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if len(grads) < 3:
                grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})

    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=3, mask_epoch=1, keep_fisher=True, fisher_estimator="batch_grad")
    fit(cb, max_epochs=2, extra=[GradRecorder()], accumulate_grad_batches=2)
    assert len(grads) == 3  # once per optimizer step, after accumulation
    for name, f in cb.fisher.items():
        ref = sum(g[name] ** 2 for g in grads)
        torch.testing.assert_close(f, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_warmup_fisher_per_example_matches_loop_over_warmup_batches(accumulate):
    ref = {}

    class LoopReference(pl.Callback):  # the oracle: batch-size-1 loop at the parameters each batch sees
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx < 3 * accumulate and trainer.current_epoch == 0:
                twin = TinyClassifier()  # same weights, no FISH hooks on its modules
                twin.load_state_dict(pl_module.state_dict())
                loss_fn = lambda b: F.cross_entropy(twin(b[0]), b[1], reduction="none")  # noqa: E731
                fisher, _ = per_example_fisher(loss_fn, batch, dict(twin.named_parameters()))
                for n, f in fisher.items():
                    ref[n] = ref.get(n, 0) + f

    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=3, mask_epoch=1, keep_fisher=True)
    fit(cb, max_epochs=2, extra=[LoopReference()], accumulate_grad_batches=accumulate)
    assert cb.estimator_in_use == "per_example" and cb.warmup.hooks is None  # hooks gone after warmup
    for name, f in cb.fisher.items():
        torch.testing.assert_close(f, ref[name], rtol=1e-5, atol=1e-9)


def test_rewind_frozen_resets_frozen_entries_to_fit_start():
    model = TinyClassifier()
    start = params_of(model)
    cb = FisherMaskCallback(sparsity=0.8, warmup_steps=4, mask_epoch=1, rewind_frozen=True)
    fit(cb, model=model, max_epochs=2)
    final = params_of(model)
    for name, m in cb.masks.items():
        assert torch.equal(final[name][~m], start[name][~m])
        assert not torch.equal(final[name][m], start[name][m])


def test_calibration_fisher_matches_brute_force():
    loader = make_loader(n=20, batch=8)
    model = TinyClassifier()
    params = {n: p for n, p in model.named_parameters()}
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in loader:  # brute force: one forward/backward per example
        for i in range(len(x)):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            for n, p in params.items():
                ref[n] += p.grad**2
    model.zero_grad()
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=0, mask_epoch=None, calibration_samples=20, keep_fisher=True)
    fit(cb, max_epochs=1, model=TinyClassifier(), loader=loader)
    assert cb.calibration_examples == 20 and cb.freeze_step == 0
    for n in ref:
        torch.testing.assert_close(cb.fisher[n], ref[n], rtol=1e-5, atol=1e-8)


def test_calibration_uses_fisher_loss_when_defined():
    class WithFisherLoss(TinyClassifier):
        calls = 0

        def fisher_loss(self, batch):
            WithFisherLoss.calls += 1
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="none")

    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=0, mask_epoch=None, calibration_samples=10, keep_fisher=True)
    fit(cb, max_epochs=1, model=WithFisherLoss())
    assert WithFisherLoss.calls == 2 + 2  # the batch-dim probe (8 and 7 examples), then batched (8 + 2 examples)
    model = TinyClassifier()
    fisher, n = per_example_fisher(
        lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"),
        next(iter(make_loader(n=10, batch=10))),
        dict(model.named_parameters()),
    )
    for k in fisher:
        torch.testing.assert_close(cb.fisher[k], fisher[k])


@pytest.mark.parametrize("ckpt_epoch", [0, 2])  # 0: during warmup (mask at epoch 2); 2: after the freeze
def test_resume_equals_uninterrupted(tmp_path, ckpt_epoch):
    def make_cb():
        return FisherMaskCallback(sparsity=0.7, warmup_steps=12, mask_epoch=2)

    full, _, _ = fit(make_cb(), max_epochs=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(make_cb(), max_epochs=4, extra=[ckpt], enable_checkpointing=True)
    path = tmp_path / f"epoch={ckpt_epoch}.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"]
    (fish_state,) = [v for k, v in state.items() if k.startswith("FisherMaskCallback")]
    if ckpt_epoch == 0:
        assert fish_state["masks"] is None and fish_state["fisher"] is not None and fish_state["warmup_done"] == 8
    else:
        assert fish_state["fisher"] is None and all(t.dtype == torch.uint8 for t in fish_state["masks"].values())
    cb = make_cb()
    resumed = TinyClassifier()
    make_trainer([cb], max_epochs=4).fit(resumed, make_loader(), ckpt_path=path)
    for (n, p), q in zip(resumed.named_parameters(), full.parameters()):
        assert torch.equal(p, q), n


def test_default_candidates_skip_peft_modules_to_save_and_include_exclude():
    class Named(TinyClassifier):
        pass

    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=1, mask_epoch=None, exclude=[r"net\.2\."])
    model, _, _ = fit(cb, max_epochs=1, model=Named())
    assert set(cb.masks) == {"net.0.weight", "net.0.bias"}
    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=1, mask_epoch=None, include=["weight$"])
    fit(cb, max_epochs=1)
    assert set(cb.masks) == {"net.0.weight", "net.2.weight"}


def test_density_logged_to_trainer_logger(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    from fish_lightning.masker.frozen import FrozenMask

    cb = FisherMaskCallback(sparsity=0.75, warmup_steps=2, mask_epoch=1)
    fit(cb, max_epochs=2, logger=CSVLogger(tmp_path, name="x"))
    header = (tmp_path / "x" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    density = sorted(h for h in header if h.startswith("fish/density/"))  # layer x kind, not one per tensor
    assert density == ["fish/density/layer_0/bias", "fish/density/layer_0/weight", "fish/density/layer_2/bias",
                       "fish/density/layer_2/weight"] and "fish/kept" in header and "fish/density" in header
    monkeypatch.setattr(FrozenMask, "per_tensor_density", True)  # opt-in: one series per tensor too
    fit(FisherMaskCallback(sparsity=0.75, warmup_steps=2, mask_epoch=1), max_epochs=2,
        logger=CSVLogger(tmp_path, name="y"))  # fmt: skip
    assert "fish/density/net.0.weight" in (tmp_path / "y" / "version_0" / "metrics.csv").read_text().splitlines()[0]


def test_nonfinite_warmup_gradient_warns_and_is_skipped():
    class NaNOnce(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 1 else loss

        def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hook
            for p in self.parameters():
                p.grad.nan_to_num_(0.0)

    cb = FisherMaskCallback(sparsity=0.5, warmup_steps=3, mask_epoch=1)
    with pytest.warns(UserWarning, match=r"non-finite gradient nan in 'net\.0\.weight'"):
        fit(cb, max_epochs=2, model=NaNOnce())
    assert cb.skipped_nonfinite_steps >= 1 and cb.warmup_steps_done == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), r"sparsity=1\.0 is out of range"),
        (dict(sparsity=-0.1), r"sparsity=-0\.1 is out of range"),
        (dict(sparsity="0.5"), r"sparsity='0\.5'"),
        (dict(warmup_steps=0), r"warmup_steps=0 must be an integer >= 1 \(0 is allowed only with "
                               r"calibration_samples, mask_path or selection in \['random', 'magnitude'\]\)"),
        (dict(warmup_steps=0, selection="reverse"), r"warmup_steps=0 must be an integer >= 1"),
        (dict(warmup_steps=2.5), r"warmup_steps=2\.5"),
        (dict(mask_epoch=-1), r"mask_epoch=-1"),
        (dict(mask_epoch=0), r"mask_epoch=0 freezes the mask before any warmup"),
        (dict(scope="layer"), r"scope='layer' is not valid.*'global', 'per_tensor'"),
        (dict(selection="best"), r"selection='best' is not valid.*'fisher', 'random', 'reverse', 'magnitude'"),
        (dict(include=["(unclosed"]), r"include pattern '\(unclosed' is not a valid"),
        (dict(calibration_samples=0), r"calibration_samples=0"),
    ],
)
def test_bad_constructor_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FisherMaskCallback(**kwargs)


@pytest.mark.parametrize("selection", ["random", "magnitude"])
def test_a_selection_without_fisher_freezes_before_any_step(selection):
    """``random``/``magnitude`` need no warmup: ``warmup_steps=0, mask_epoch=None`` draws the mask at fit start,
    and every frozen entry keeps its initial value."""
    model = TinyClassifier()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = FisherMaskCallback(sparsity=0.9, warmup_steps=0, mask_epoch=None, selection=selection)
    fit(cb, max_epochs=1, model=model)
    assert cb.freeze_step == 0 and cb.warmup_steps_done == 0
    total = sum(m.numel() for m in cb.masks.values())
    assert cb.num_kept == num_kept(total, 0.9) == sum(int(m.sum()) for m in cb.masks.values())
    for n, p in model.named_parameters():
        m = cb.masks[n]
        assert torch.equal(p[~m], init[n][~m]) and (not m.any() or not torch.equal(p[m], init[n][m])), n
    assert cb.verify(model)["frozen_unchanged"]


def test_mask_epoch_past_max_epochs():
    with pytest.raises(ValueError, match=r"mask_epoch=3 is past the run: Trainer\(max_epochs=3\)"):
        fit(FisherMaskCallback(mask_epoch=3), max_epochs=3)


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_regex_matching_nothing(arg):
    with pytest.raises(ValueError, match=rf"{arg} pattern 'lora_A' matches no trainable parameter.*net\.0\.weight"):
        fit(FisherMaskCallback(**{arg: ["lora_A"]}), max_epochs=2)


def test_no_candidates_error():
    with pytest.raises(ValueError, match="no candidate parameters"):
        fit(FisherMaskCallback(exclude=["net"]), max_epochs=2)


def test_calibration_with_mask_epoch_warns_unused_warmup():
    with pytest.warns(UserWarning, match="warmup_steps=5 is not used"):
        FisherMaskCallback(warmup_steps=5, mask_epoch=1, calibration_samples=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FisherMaskCallback(warmup_steps=0, mask_epoch=1, calibration_samples=8)


def test_random_and_magnitude_need_no_fisher():
    for sel in ("random", "magnitude"):
        cb = FisherMaskCallback(sparsity=0.5, warmup_steps=2, mask_epoch=1, selection=sel)
        fit(cb, max_epochs=2)
        assert cb.num_kept == round(0.5 * cb.num_candidates)


def test_resume_with_changed_setting_is_refused():
    state = FisherMaskCallback(sparsity=0.5, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"written with FisherMaskCallback\(seed=0\), this callback has seed=1"):
        FisherMaskCallback(sparsity=0.5, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"sparsity=0.5\).*sparsity=0.9"):
        FisherMaskCallback(sparsity=0.9).load_state_dict(state)


def test_run_ending_before_the_freeze_warns_or_raises_when_strict():
    with pytest.warns(UserWarning, match="training ended before the mask was frozen"):
        fit(FisherMaskCallback(warmup_steps=500, mask_epoch=None), max_epochs=1)
    with pytest.raises(RuntimeError, match="training ended before the mask was frozen"):
        fit(FisherMaskCallback(warmup_steps=500, mask_epoch=None, strict=True), max_epochs=1)


def test_sparse_state_refused_with_grad_scaler():
    from types import SimpleNamespace

    trainer = SimpleNamespace(max_epochs=3, precision_plugin=SimpleNamespace(scaler=object()), optimizers=[])
    cb = FisherMaskCallback(sparse_optimizer_state=True)
    with pytest.raises(ValueError, match="does not support fp16 mixed precision with a GradScaler"):
        cb.on_fit_start(trainer, TinyClassifier())


def test_reduce_mean_is_in_place_and_bucketed():
    from types import SimpleNamespace

    from fish_lightning.masker.collectives import reduce_mean_ as _reduce_mean

    sizes = []

    def reduce(t, reduce_op):  # two ranks holding t and 3 * t: the mean is 2 * t
        assert reduce_op == "mean"
        sizes.append(t.numel())
        return t * 2

    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    fisher = {
        "a": torch.ones(3),
        "big": torch.full((10,), 3.0),
        "b": torch.ones(2, 2),
        "c": torch.ones(1),
        "s": torch.ones(4),
    }
    before = {n: f.clone() for n, f in fisher.items()}
    out = _reduce_mean(trainer, fisher, skip={"s"}, bucket=6)
    assert out is fisher and list(out) == list(before)
    for n in fisher:
        assert torch.equal(fisher[n], before[n] if n == "s" else 2 * before[n]), n
    assert sizes == [3, 10, 5]  # "a" alone ("big" would overflow), "big" alone (> bucket), then "b" + "c"
