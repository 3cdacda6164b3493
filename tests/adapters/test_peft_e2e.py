"""A LoRA/DoRA-wrapped tiny BERT from transformers + peft, end to end through lightning.Trainer."""

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import SnapshotAtFreeze, make_trainer, params_of
from fish_lightning import FisherMaskCallback, TieWarning
from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.app.classifier import SequenceClassifier

TINY = tiny_config("bert")

def token_batches(n=48, batch=8, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, seq), generator=g)
    labels = (ids[:, 0] > 50).long()
    rows = [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]
    return DataLoader(rows, batch_size=batch, shuffle=False)


def lora_module(method="lora", r=4):
    model = build_sequence_classifier(num_labels=2, tiny_config=TINY)
    model = apply_peft(model, method, r=r, lora_alpha=8, target_modules=["query", "value"])
    return SequenceClassifier(model, num_labels=2, lr=1e-2, warmup_ratio=None)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_tiny_bert_end_to_end(method):
    module = lora_module(method)
    cb = FisherMaskCallback(sparsity=0.9, warmup_steps=4, mask_epoch=1)
    snap = SnapshotAtFreeze(cb)
    make_trainer([cb, snap], max_epochs=2, limit_val_batches=0).fit(module, token_batches())
    names = set(cb.masks)
    assert names and all("lora_" in n or "magnitude" in n for n in names)
    assert not any("modules_to_save" in n or "classifier" in n for n in names)  # head stays dense
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in names)
    n = sum(p.numel() for name, p in module.named_parameters() if name in names)
    assert cb.num_kept == round(0.1 * n)
    final = params_of(module)
    for name, m in cb.masks.items():
        assert torch.equal(final[name][~m], snap.at_freeze[name][~m]), name
    head = [k for k in final if "modules_to_save" in k]
    assert head and any(not torch.equal(final[k], snap.at_freeze[k]) for k in head)


def test_calibration_before_training_scores_lora_A_zero_and_warns_ties():
    module = lora_module("lora")
    # half the candidates are A (all scored 0), so keeping 80% must cut inside the run of zeros
    cb = FisherMaskCallback(sparsity=0.2, warmup_steps=0, mask_epoch=None, calibration_samples=16, keep_fisher=True)
    with pytest.warns(TieWarning, match="share the score at the cut"):
        make_trainer([cb], max_epochs=1, limit_val_batches=0, limit_train_batches=2).fit(module, token_batches())
    a = [f for n, f in cb.fisher.items() if "lora_A" in n]
    b = [f for n, f in cb.fisher.items() if "lora_B" in n]
    assert all(float(f.abs().max()) == 0.0 for f in a)  # B == 0 at init => dL/dA == 0 exactly
    assert any(float(f.max()) > 0.0 for f in b)
    assert cb.num_kept == round(0.8 * cb.num_candidates)  # exactly k, not "everything >= 0"
