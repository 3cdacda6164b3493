"""Careless input is refused at construction or fit start with one error naming the setting and what is valid;
nothing is silently ignored (resume with changed settings, empty masks, unreadable mask files)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TinyClassifier, make_loader, make_trainer
from fish_lightning import FisherMaskCallback
from fish_lightning.core.mask_file import save_mask

BOOLEANS = ["keep_fisher", "rewind_frozen", "sparse_optimizer_state", "strict"]


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_boolean_settings_must_be_booleans(name, value):
    with pytest.raises(ValueError, match=rf"^{name}={value!r} must be True or False"):
        FisherMaskCallback(**{name: value})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(include=3), r"include=3 must be None, a regex string or a list of regex strings"),
        (dict(exclude=["a", 2]), r"exclude=\['a', 2\] must be None, a regex string or a list of regex strings"),
        (dict(scope=None), r"scope=None is not valid"),
        (dict(mask_path=7), r"mask_path=7 is not a file"),
    ],
)
def test_other_settings_are_type_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FisherMaskCallback(**kwargs)


def test_sparsity_that_keeps_nothing_is_refused_at_fit_start(one_thread):
    cb = FisherMaskCallback(sparsity=0.999, warmup_steps=2, mask_epoch=1)  # 195 candidates: round(0.195) = 0
    with pytest.raises(ValueError, match=r"sparsity=0\.999 keeps 0 of the 195 candidate entries: use sparsity <= "
                                         r"0\.99487"):
        make_trainer([cb], max_epochs=2).fit(TinyClassifier(), make_loader())


def test_sparsity_per_tensor_keeping_nothing_is_refused(one_thread):
    cb = FisherMaskCallback(sparsity=0.997, warmup_steps=2, mask_epoch=1, scope="per_tensor")
    with pytest.raises(ValueError, match=r"sparsity=0\.997 keeps 0 of the 195 candidate entries per tensor "
                                         r"\(scope='per_tensor'\): use sparsity <= 0\.992188"):
        make_trainer([cb], max_epochs=2).fit(TinyClassifier(), make_loader())


class MeanFisherLoss(TinyClassifier):
    def fisher_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)  # the batch mean: shape [], not [b]


@pytest.mark.parametrize("how", ["calibration", "warmup"])
def test_fisher_loss_must_return_one_loss_per_example(how, one_thread):
    kw = dict(calibration_samples=16, warmup_steps=0, mask_epoch=None) if how == "calibration" else {}
    cb = FisherMaskCallback(sparsity=0.7, **({"warmup_steps": 2, "mask_epoch": 1} | kw))
    with pytest.raises(ValueError, match=r"fisher_loss\(batch\) returned shape \[\] for a batch of 8 examples: "
                                         r"it must return one loss per example, shape \[8\]"):
        make_trainer([cb], max_epochs=2).fit(MeanFisherLoss(), make_loader())


def checkpoint_after(tmp_path, epoch, **settings):
    cb = FisherMaskCallback(**({"sparsity": 0.7, "warmup_steps": 2, "mask_epoch": 1} | settings))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer([cb, ckpt], max_epochs=3, enable_checkpointing=True).fit(TinyClassifier(), make_loader())
    return tmp_path / f"epoch={epoch}.ckpt"


@pytest.mark.parametrize(
    "saved, changed, name",
    [
        ({}, {"include": [r"net\.0"]}, "include"),
        ({"exclude": r"bias"}, {"exclude": None}, "exclude"),
        ({}, {"fisher_estimator": "batch_grad"}, "fisher_estimator"),
        ({}, {"sparse_optimizer_state": True}, "sparse_optimizer_state"),
        ({"sparse_optimizer_state": True}, {"sparse_optimizer_state": False}, "sparse_optimizer_state"),
    ],
)
def test_resume_with_changed_candidates_estimator_or_state_layout_is_refused(tmp_path, saved, changed, name):
    epoch = 1 if name == "sparse_optimizer_state" else 0  # the optimizer state differs only after the freeze
    path = checkpoint_after(tmp_path, epoch, **saved)
    cb = FisherMaskCallback(**({"sparsity": 0.7, "warmup_steps": 2, "mask_epoch": 1} | saved | changed))
    with pytest.raises(ValueError, match=rf"checkpoint was written with FisherMaskCallback\({name}="):
        make_trainer([cb], max_epochs=3).fit(TinyClassifier(), make_loader(), ckpt_path=path)


def test_sparse_state_may_change_before_the_freeze(tmp_path, one_thread):
    path = checkpoint_after(tmp_path, 0)
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=2, mask_epoch=1, sparse_optimizer_state=True)
    make_trainer([cb], max_epochs=3).fit(TinyClassifier(), make_loader(), ckpt_path=path)
    assert cb.frozen and cb.verify()["frozen_unchanged"]


def test_fish_added_to_a_run_resumed_past_mask_epoch_says_no_warmup_step_ran(tmp_path, one_thread):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer([ckpt], max_epochs=2, enable_checkpointing=True).fit(TinyClassifier(), make_loader())
    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=2, mask_epoch=1)
    with pytest.raises(ValueError, match=r"no warmup step ran before the freeze: the run resumed at epoch 2, past "
                                         r"mask_epoch=1.*calibration_samples"):
        make_trainer([cb], max_epochs=4).fit(TinyClassifier(), make_loader(), ckpt_path=tmp_path / "epoch=1.ckpt")


@pytest.mark.parametrize("content", ["empty", "truncated", "torch_ckpt"])
def test_unreadable_mask_file_names_the_option_and_the_file(tmp_path, content, one_thread):
    path = tmp_path / "mask.safetensors"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "truncated":
        model = TinyClassifier()
        save_mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}, path)
        path.write_bytes(path.read_bytes()[:40])
    else:
        torch.save({"state_dict": TinyClassifier().state_dict()}, path)
    cb = FisherMaskCallback(mask_path=str(path), warmup_steps=0, mask_epoch=None)
    with pytest.raises(ValueError, match=rf"mask_path='{path}' is not a FISH mask file \(.+\): a mask file is the "
                                         r"fish_mask\.safetensors"):
        make_trainer([cb], max_epochs=1).fit(TinyClassifier(), make_loader())


def test_kept_is_an_exact_budget_without_a_sparsity_round_trip(one_thread):
    cb = FisherMaskCallback(kept=37, warmup_steps=2, mask_epoch=1)
    make_trainer([cb], max_epochs=2).fit(TinyClassifier(), make_loader())
    assert cb.num_kept == 37 == sum(int(m.sum()) for m in cb.masks.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kept=0), r"kept=0 must be None or an integer >= 1"),
        (dict(kept=5, sparsity=0.5), r"kept=5 and sparsity=0\.5 both set the budget: pass one"),
        (dict(kept=5, scope="per_tensor"), r"kept sets one budget over all candidates"),
    ],
)
def test_kept_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FisherMaskCallback(**kwargs)


def test_kept_above_the_candidates_is_refused_at_fit_start(one_thread):
    with pytest.raises(ValueError, match=r"kept=1,000 is more than the 195 candidate entries"):
        make_trainer([FisherMaskCallback(kept=1000, warmup_steps=2, mask_epoch=1)], max_epochs=2).fit(
            TinyClassifier(), make_loader()
        )


def test_a_registered_scorer_is_a_selection(one_thread):
    from fish_lightning.core.selection import SCORERS, register_scorer

    @register_scorer("first_entries", needs_fisher=False)
    def first(fisher, params, seed):  # keeps the lowest flat indices of each tensor first
        return {n: -torch.arange(p.numel(), dtype=torch.float32).view(p.shape) for n, p in params.items()}

    try:
        cb = FisherMaskCallback(sparsity=0.5, selection="first_entries", warmup_steps=2, mask_epoch=1)
        assert not cb.settings.needs_fisher
        make_trainer([cb], max_epochs=2).fit(TinyClassifier(), make_loader())
        assert cb.num_kept == round(0.5 * cb.num_candidates) and cb.fisher is None
    finally:
        del SCORERS["first_entries"]
    with pytest.raises(ValueError, match=r"selection='first_entries' is not valid: expected one of \('fisher'"):
        FisherMaskCallback(selection="first_entries")
