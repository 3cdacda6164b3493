"""What a fish-train run keeps: the adapter, the mask file and its anatomy, the checkpoint; the saved adapter
reloads with peft to the same metric."""

import json

import pytest
import torch
from fish_train_runs import KEEP
from hydra.utils import instantiate
from test_config_composition import composed

from fish_lightning import FisherMaskCallback


def test_run_keeps_adapter_mask_checkpoint_and_starts_quietly(kept_run):
    run_dir, proc = kept_run
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run_dir / "adapter").iterdir()}
    assert (run_dir / "fish_mask.safetensors").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    res = json.loads((run_dir / "results.json").read_text())
    assert res["artifacts"] == {"model": "adapter", "mask": "fish_mask.safetensors", "anatomy": "mask_anatomy.png"}
    assert res["resumed_from"] is None
    out = proc.stdout + proc.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "is deprecated", "estimate number of stepping batches"):
        assert noise not in out, out
    assert "FISH: mask frozen" in out and "val/accuracy" in out


def test_run_writes_mask_anatomy_png_and_the_aggregation_in_mask_stats(kept_run):
    run_dir, _ = kept_run
    res = json.loads((run_dir / "results.json").read_text())
    stats = json.loads((run_dir / "mask_stats.json").read_text())
    anatomy, kinds = stats["anatomy"], stats["by_kind"]
    want = [f"attention.{m}.lora_{ab}" for m in ("query", "value") for ab in "AB"]  # tiny BERT, LoRA on query/value
    assert anatomy["layers"] == [0, 1] and anatomy["kinds"] == want and list(kinds) == want
    assert sum(map(sum, anatomy["total"])) == res["candidates"] == stats["candidates"]
    assert sum(map(sum, anatomy["kept"])) == res["kept"] == sum(v["kept"] for v in kinds.values())
    for i, row in enumerate(anatomy["density"]):
        assert row == [pytest.approx(k / t) for k, t in zip(anatomy["kept"][i], anatomy["total"][i])]
    png = (run_dir / "mask_anatomy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_anatomy_figure_scales_with_the_grid():
    """Readable for a 6-layer encoder and a 32-layer decoder: one labelled row per layer, rotated kind labels."""
    from fish_lightning.app.anatomy_plot import anatomy_figure, title_of

    def grid(n_layers, kinds):
        total = [[64] * len(kinds) for _ in range(n_layers)]
        kept = [[(i * 7 + j * 3) % 65 for j in range(len(kinds))] for i in range(n_layers)]
        density = [[k / 64 for k in row] for row in kept]
        return {"layers": list(range(n_layers)), "kinds": kinds, "kept": kept, "total": total, "density": density}

    encoder = grid(6, [f"attention.{m}.lora_{ab}" for m in ("query", "value") for ab in "AB"])
    decoder = grid(32, [f"self_attn.{p}_proj.lora_{ab}" for p in "qkvo" for ab in "AB"]
                   + [f"mlp.{p}_proj.lora_{ab}" for p in ("gate", "up", "down") for ab in "AB"])  # fmt: skip
    sizes = {}
    for name, anatomy in (("encoder", encoder), ("decoder", decoder)):
        fig = anatomy_figure(anatomy)
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(x) for x in anatomy["layers"]]
        assert [t.get_text() for t in ax.get_xticklabels()] == anatomy["kinds"]
        assert all(t.get_rotation() == 60 for t in ax.get_xticklabels())
        kept, total = sum(map(sum, anatomy["kept"])), sum(map(sum, anatomy["total"]))
        assert ax.get_title() == title_of(anatomy) and f"kept {kept:,} of {total:,}" in ax.get_title()
        sizes[name] = fig.get_size_inches()
        fig.canvas.draw()
        height_px = ax.get_window_extent().height / len(anatomy["layers"])
        assert height_px >= 25, (name, height_px)  # a row per layer, tall enough for its 8 pt label
    assert sizes["decoder"][1] > 2 * sizes["encoder"][1] and sizes["decoder"][0] > sizes["encoder"][0]


def test_saved_adapter_reloads_with_peft_and_reproduces_the_metric(kept_run, tmp_path):
    import lightning.pytorch as pl
    from peft import PeftModel

    from fish_lightning.app.classifier import SequenceClassifier

    run_dir, _ = kept_run
    res = json.loads((run_dir / "results.json").read_text())
    cfg = composed([*KEEP], tmp_path)
    base = instantiate(cfg.model.net)  # the same seeded random base
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    data = instantiate(cfg.data)
    module = SequenceClassifier(model, num_labels=data.num_labels, metrics=data.metrics)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    for name in ("val/accuracy", "val/f1", "val/loss"):
        assert metrics[name] == pytest.approx(res["metrics"][name], abs=1e-6), name


def test_mask_file_round_trips_to_the_callback_masks(tiny, tmp_path):
    from conftest import make_loader, make_trainer
    from fish_lightning.adapters.export import load_mask, save_mask

    cb = FisherMaskCallback(sparsity=0.7, warmup_steps=2, mask_epoch=None)
    make_trainer([cb], max_epochs=1).fit(tiny, make_loader())
    save_mask(cb.masks, tmp_path / "m.safetensors")
    loaded = load_mask(tmp_path / "m.safetensors", model=tiny)
    assert loaded.keys() == cb.masks.keys()
    assert all(loaded[n].dtype == torch.bool and torch.equal(loaded[n], cb.masks[n].cpu()) for n in loaded)
    with pytest.raises(ValueError, match=r"mask 'net.0.weight' has shape \[16, 8\] but the parameter has shape"):
        load_mask(tmp_path / "m.safetensors", model=type(tiny)(d_in=5))
