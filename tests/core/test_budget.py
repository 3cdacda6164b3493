"""Budget matching (fish_lightning.core.budget) and its wiring into fish-train (budget.r / kept /
count_always_trained)."""

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_peft_e2e import token_batches

from conftest import make_trainer
from fish_lightning import FisherMaskCallback
from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.app.classifier import SequenceClassifier
from fish_lightning.app.train import ConfigError, _budget_kept, _validate, build_fish
from fish_lightning.core.budget import count_candidates, count_trainable_entries, match_kept, match_sparsity
from fish_lightning.core.selection import num_kept

TINY = tiny_config("bert")
H = TINY["hidden_size"]
HEAD = 2 * H + 2  # classifier weight + bias, 2 labels


def lora(r: int, method: str = "lora", num_labels: int = 2):
    model = build_sequence_classifier(num_labels=num_labels, tiny_config=TINY)
    return apply_peft(model, method, r=r, lora_alpha=2 * r, target_modules=["query", "value"])


def lora_entries(r: int, dora: bool = False) -> int:
    """LoRA on query+value of 2 layers: A [r, H] + B [H, r] (+ DoRA magnitude [H]) per module."""
    return 4 * (2 * r * H + (H if dora else 0))


def test_lora_r8_matched_to_lora_r2_exactly():
    model, ref = lora(8), lora(2)
    assert count_candidates(ref) == lora_entries(2) and count_candidates(model) == lora_entries(8)
    s = match_sparsity(model, ref)
    assert num_kept(lora_entries(8), s) == lora_entries(2) == match_kept(model, ref)
    # the callback keeps exactly that many entries
    cb = FisherMaskCallback(sparsity=s, warmup_steps=2, mask_epoch=None)
    module = SequenceClassifier(model, num_labels=2, lr=1e-2, warmup_ratio=None)
    make_trainer([cb], max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(module, token_batches(n=24))
    assert cb.num_kept == lora_entries(2)


def test_dora_counts_its_magnitude_vectors():
    model, ref = lora(8, "dora"), lora(2, "dora")
    assert count_candidates(ref) == lora_entries(2, dora=True)
    s = match_sparsity(model, ref)
    assert num_kept(lora_entries(8, dora=True), s) == lora_entries(2, dora=True)


def test_absolute_budget():
    model = lora(8)
    for kept in (1, 1000, lora_entries(8)):
        assert num_kept(lora_entries(8), match_sparsity(model, kept)) == kept


def test_count_always_trained_both_ways():
    model = lora(8)
    assert count_trainable_entries(model) == lora_entries(8) + HEAD
    # int reference: False -> that many candidates; True -> the head takes its share first
    assert match_kept(model, 1000) == 1000
    assert match_kept(model, 1000, count_always_trained=True) == 1000 - HEAD
    assert num_kept(lora_entries(8), match_sparsity(model, 1000, count_always_trained=True)) == 1000 - HEAD
    # same head on both sides: both settings agree
    ref = lora(2)
    assert match_kept(model, ref, count_always_trained=True) == match_kept(model, ref) == lora_entries(2)
    # a reference with a bigger head (3 labels): only True counts the difference
    ref3 = lora(2, num_labels=3)
    assert match_kept(model, ref3) == lora_entries(2)
    assert match_kept(model, ref3, count_always_trained=True) == lora_entries(2) + (3 * H + 3) - HEAD


def test_include_exclude_apply_to_both_models():
    model, ref = lora(8), lora(2)
    assert match_kept(model, ref, include=["lora_B"]) == lora_entries(2) // 2
    assert count_candidates(model, exclude=["lora_A"]) == lora_entries(8) // 2


def test_unreachable_budgets_name_the_numbers():
    model = lora(2)
    n = lora_entries(2)
    with pytest.raises(ValueError, match=f"{lora_entries(8):,} candidate entries of the reference.*1..{n:,}"):
        match_sparsity(model, lora(8))  # reference bigger than the model
    with pytest.raises(ValueError, match=f"{n + 1:,} trainable entries asked for.*1..{n:,}"):
        match_sparsity(model, n + 1)
    with pytest.raises(ValueError, match=f"{HEAD:,} trainable entries asked for minus this model's {HEAD:,} "
                                         "always-trained entries = 0 to keep"):  # fmt: skip
        match_sparsity(model, HEAD, count_always_trained=True)
    with pytest.raises(ValueError, match="use a larger rank/model or a smaller reference"):
        match_sparsity(model, n + HEAD + 1, count_always_trained=True)
    with pytest.raises(ValueError, match="must be >= 1"):
        match_sparsity(model, 0)
    with pytest.raises(TypeError, match="nn.Module or an int, got str"):
        match_sparsity(model, "lora")
    with pytest.raises(TypeError, match="got bool"):
        match_sparsity(model, True)
    with pytest.raises(ValueError, match="count_always_trained='yes' must be True or False"):
        match_sparsity(model, 10, count_always_trained="yes")


# ---------------------------------------------------------------- fish-train wiring


def composed(overrides, tmp_path):
    with initialize_config_module("fish_lightning.conf", version_base="1.3"):
        return compose("train", overrides=["model=tiny_bert", f"paths.cache_dir={tmp_path}/cache", *overrides])


def _fish_kwargs(cfg):
    return {k: v for k, v in OmegaConf.to_container(cfg.fish, resolve=True).items() if k != "_target_"}


@pytest.mark.parametrize("count_always_trained", [False, True])
def test_train_budget_r(count_always_trained, tmp_path):
    cfg = composed(["peft.r=8", "budget.r=2", f"budget.count_always_trained={count_always_trained}"], tmp_path)
    assert cfg.budget.count_always_trained is count_always_trained
    _validate(cfg)
    model = instantiate(cfg.peft)(instantiate(cfg.model.net))
    ref = instantiate(OmegaConf.merge(cfg.peft, {"r": 2}))(instantiate(cfg.model.net))
    state = torch.get_rng_state()
    kept = _budget_kept(cfg, _fish_kwargs(cfg))
    assert torch.equal(torch.get_rng_state(), state)  # budget models do not shift the run's random stream
    assert kept == match_kept(model, ref, count_always_trained=count_always_trained) == count_candidates(ref)
    fish, info = build_fish(cfg, model)
    assert info["budget_kept"] == kept and num_kept(count_candidates(model), fish.sparsity) == kept


def test_train_budget_kept_counts_the_head_when_asked(tmp_path):
    cfg = composed(["budget.kept=1000"], tmp_path)
    assert _budget_kept(cfg, _fish_kwargs(cfg)) == 1000
    cfg = composed(["budget.kept=1000", "budget.count_always_trained=true"], tmp_path)
    model = instantiate(cfg.peft)(instantiate(cfg.model.net))
    head = count_trainable_entries(model) - count_candidates(model)
    assert head > 0 and _budget_kept(cfg, _fish_kwargs(cfg)) == 1000 - head
    assert _budget_kept(cfg, _fish_kwargs(cfg), model=model) == 1000 - head


def test_train_budget_validation(tmp_path):
    with pytest.raises(ConfigError, match="count_always_trained='yes' must be true or false"):
        _validate(composed(["budget.kept=10", "budget.count_always_trained=yes"], tmp_path))
    with pytest.raises(ConfigError, match="peft='ia3' has none: use budget.kept"):
        _validate(composed(["peft=ia3", "budget.r=2"], tmp_path))
    with pytest.raises(ConfigError, match="budget.kept=True must be an integer"):
        _validate(composed(["budget.kept=true"], tmp_path))
    _validate(composed(["peft=vera", "budget.r=2"], tmp_path))
