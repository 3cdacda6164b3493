"""Mask anatomy: candidate names -> (layer, kind); the layers × kinds grid; the TensorBoard image and
Fisher histogram the callback logs at the freeze."""

from __future__ import annotations

import pytest
import torch

from fish_lightning import FisherMaskCallback
from fish_lightning.adapters.decoders import apply_decoder_peft, build_causal_lm
from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.core.anatomy import by_kind, layer_and_kind, mask_anatomy
from fish_lightning.core.candidates import find_candidates

LLAMA_PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def bert(method, **config):
    return apply_peft(build_sequence_classifier(tiny_config=tiny_config("bert")), method, **config)


def llama_lora():
    return apply_decoder_peft(build_causal_lm(tiny_config=tiny_config("llama")), "lora", r=2)


def cells(model, prefix=""):
    return {layer_and_kind(prefix + n) for n in find_candidates(model)}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_tiny_bert_lora_and_dora_names(method):
    model = bert(method, r=2, target_modules=["query", "value"])
    parts = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if method == "dora" else [])
    want = {(layer, f"attention.{m}.{p}") for layer in (0, 1) for m in ("query", "value") for p in parts}
    assert cells(model) == want
    assert cells(model, prefix="model.") == want  # as the LightningModule names them (fish-train's masks)


def test_tiny_llama_lora_names():
    want = {(layer, f"{proj}.lora_{ab}") for layer in (0, 1) for proj in LLAMA_PROJECTIONS for ab in "AB"}
    assert cells(llama_lora()) == want


def test_full_fine_tuning_names_outside_the_layers_and_biases():
    got = {n: layer_and_kind(n) for n in find_candidates(bert("none"))}
    assert got["bert.encoder.layer.1.attention.self.query.weight"] == (1, "attention.query")
    assert got["bert.encoder.layer.1.attention.self.query.bias"] == (1, "attention.query.bias")
    assert got["bert.encoder.layer.0.output.dense.weight"] == (0, "output.dense")
    assert got["bert.embeddings.word_embeddings.weight"] == (None, "bert.embeddings.word_embeddings")
    assert got["classifier.weight"] == (None, "classifier") and got["classifier.bias"] == (None, "classifier.bias")


@pytest.mark.parametrize("build", [lambda: bert("dora", r=2, target_modules=["query", "value"]), llama_lora,
                                   lambda: bert("none")], ids=["bert_dora", "llama_lora", "bert_full"])  # fmt: skip
def test_grid_totals_equal_candidate_counts(build):
    model = build()
    params = dict(model.named_parameters())
    names = find_candidates(model)
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(params[n].shape, generator=g) < 0.3 for n in names}
    kept = {n: int(m.sum()) for n, m in masks.items()}
    anatomy = mask_anatomy(kept, {n: params[n].numel() for n in names})
    rows, cols = len(anatomy["layers"]), len(anatomy["kinds"])
    assert all(len(r) == cols for key in ("kept", "total", "density") for r in anatomy[key]) and rows
    assert sum(map(sum, anatomy["total"])) == sum(params[n].numel() for n in names)
    assert sum(map(sum, anatomy["kept"])) == sum(kept.values())
    for i, layer in enumerate(anatomy["layers"]):
        for j, kind in enumerate(anatomy["kinds"]):
            here = [n for n in names if layer_and_kind(n) == (layer, kind)]
            assert anatomy["total"][i][j] == sum(params[n].numel() for n in here)
            assert anatomy["kept"][i][j] == sum(kept[n] for n in here)
            d = anatomy["density"][i][j]
            assert (d is None) == (not here) and (d is None or d == pytest.approx(anatomy["kept"][i][j] /
                                                                                  anatomy["total"][i][j]))  # fmt: skip
    assert anatomy["layers"][-1] is None or None not in anatomy["layers"]  # outside the layers: the last row
    kinds = by_kind(anatomy)
    assert sum(v["total"] for v in kinds.values()) == sum(params[n].numel() for n in names)
    assert sum(v["kept"] for v in kinds.values()) == sum(kept.values())


def test_fit_with_tensorboard_logs_the_anatomy_image_and_fisher_histogram(tiny, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import make_loader, make_trainer

    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=2, mask_epoch=None)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    make_trainer([cb], max_epochs=1, logger=logger).fit(tiny, make_loader())
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = acc.Tags()
    assert "fish/mask_anatomy" in tags["images"] and "fish/log10_fisher" in tags["histograms"]
    (image,) = acc.Images("fish/mask_anatomy")
    anatomy = mask_anatomy(cb.mask.kept, {n: m.numel() for n, m in cb.masks.items()})
    assert image.step == cb.freeze_step == 2
    from fish_lightning.masker.anatomy_image import anatomy_figure

    fig = anatomy_figure(anatomy)  # the labelled figure of mask_anatomy.png, as drawn for TensorBoard
    width, height = fig.get_size_inches() * fig.dpi
    assert image.width >= int(width) and image.height >= int(height) and image.width >= 200
    assert "fish/mask_anatomy_axes" not in tags.get("tensors", [])  # the axes are labelled in the figure itself
    (hist,) = acc.Histograms("fish/log10_fisher")
    assert hist.step == 2 and hist.histogram_value.num == cb.num_candidates  # one score per candidate entry
