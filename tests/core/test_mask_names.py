"""Mask files keyed by the PeftModel's own parameter names: they apply to a bare PeftModel and to a
LightningModule holding the model under any attribute; files keyed by a LightningModule's names keep loading."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_trainer
from fish_lightning import FisherMaskCallback
from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.app.artifacts import own_names
from fish_lightning.core.mask_file import align_names, load_mask, save_mask


def peft_model():
    return apply_peft(build_sequence_classifier(num_labels=2, tiny_config=tiny_config("bert"), seed=0), "lora", r=2,
                      target_modules=["query", "value"])  # fmt: skip


class Holder(pl.LightningModule):
    """Holds its peft model under ``attr`` (``model`` as fish-train's modules do, or ``net``)."""

    def __init__(self, attr: str = "model") -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, peft_model())

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return F.cross_entropy(getattr(self, self.attr)(input_ids=ids).logits, labels)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(5, 100, (32, 8), generator=g), torch.randint(0, 2, (32,),
                                                                                                  generator=g)),
                      batch_size=8)  # fmt: skip


def fit(module, cb):
    make_trainer([cb], max_epochs=1).fit(module, loader())
    return cb


LORA = r"\.lora_[AB]\.default\.weight$"


def test_saved_mask_is_keyed_by_the_peft_models_own_names_and_loads_onto_a_bare_peft_model(tmp_path, one_thread):
    module = Holder("model")
    cb = fit(module, FisherMaskCallback(sparsity=0.5, warmup_steps=2, mask_epoch=None, include=[LORA]))
    assert all(n.startswith("model.base_model.model.") for n in cb.masks)
    path = tmp_path / "fish_mask.safetensors"
    save_mask(own_names(cb.masks, module), path)  # as fish-train saves it
    fresh = peft_model()
    fresh_names = {n for n, _ in fresh.named_parameters() if "lora_" in n}
    assert set(load_mask(path)) == fresh_names
    loaded = load_mask(path, fresh)
    assert all(torch.equal(loaded[n.removeprefix("model.")], m.cpu()) for n, m in cb.masks.items())

    old = tmp_path / "old.safetensors"  # a file keyed by the LightningModule's names (as saved before)
    save_mask(cb.masks, old)
    assert set(load_mask(old, fresh)) == fresh_names


@pytest.mark.parametrize("attr", ["net", "model"])
def test_mask_path_matches_names_whatever_attribute_holds_the_model(tmp_path, one_thread, attr):
    ref_module = Holder("model")
    ref = fit(ref_module, FisherMaskCallback(sparsity=0.5, warmup_steps=2, mask_epoch=None, include=[LORA]))
    for name, masks in (("own", own_names(ref.masks, ref_module)), ("old", ref.masks)):
        path = tmp_path / f"{name}.safetensors"
        save_mask(masks, path)
        cb = fit(Holder(attr), FisherMaskCallback(warmup_steps=0, mask_epoch=None, mask_path=str(path),
                                                  include=[LORA], strict=True))  # fmt: skip
        assert set(cb.masks) == {f"{attr}.{n.removeprefix('model.')}" for n in ref.masks}
        for n, m in ref.masks.items():
            assert torch.equal(cb.masks[f"{attr}.{n.removeprefix('model.')}"].cpu(), m.cpu()), (name, n)


def test_a_name_that_matches_two_tensors_is_an_error_naming_both():
    names = ["base_model.model.bert.l0.lora_A.default.weight"]
    targets = [f"{who}.{names[0]}" for who in ("student", "teacher")]
    with pytest.raises(ValueError, match=r"mask 'base_model.model.bert.l0.lora_A.default.weight' matches both "
                                         r"'student.base_model.model.bert.l0.lora_A.default.weight' and "
                                         r"'teacher.base_model.model.bert.l0.lora_A.default.weight'"):  # fmt: skip
        align_names(names, targets)
    # a longer shared suffix wins over a shorter one; nothing shared: no match (the caller names what is missing)
    assert align_names(["m.a.x.w"], ["n.a.x.w", "n.b.x.w"]) == {"m.a.x.w": "n.a.x.w"}
    assert align_names(["m.a.x.w"], ["n.q"]) == {}
