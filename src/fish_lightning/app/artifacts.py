"""What ``fish-train`` keeps in a run directory ``D`` after training.

- ``D/adapter/``: a peft model's ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``, the
  classifier head included where peft saves it, ``modules_to_save``), made portable
  (:mod:`fish_lightning.adapters.portable`: a hub id as base, ``fish_lightning.json`` with the head size and
  pooling, a model card). Reload with :func:`fish_lightning.load_run` (``D`` or ``D/adapter``), or
  ``PeftModel.from_pretrained(base, D / "adapter")`` on the base the run used. Our bottleneck adapters (houlsby,
  pfeiffer) are not peft's: their trainable tensors go to ``D/adapter/trainable.safetensors`` (names as in the
  model's ``named_parameters()``).
- ``D/model/``: full fine-tuning (``peft=none``): the model's own ``save_pretrained`` (transformers format).
- ``D/fish_mask.safetensors``: the FISH mask, bit-packed, names as in the trained model's own
  ``named_parameters()`` (the ``PeftModel``'s, without the LightningModule's ``model.``);
  :func:`fish_lightning.adapters.export.load_mask` reads it back (``load_mask(path, peft_model)``),
  ``fish.mask_path=D/fish_mask.safetensors`` trains with it (names matched by suffix whatever holds the model).
- ``D/mask_stats.json``: kept/candidate counts, the freeze step, per-tensor density, and where the budget went:
  ``anatomy`` (:func:`fish_lightning.core.anatomy.mask_anatomy`: kept/total/density per layer × module kind; layer
  ``null`` = outside the numbered layers) and ``by_kind`` (summed over layers).
- ``D/mask_anatomy.png``: that grid as a heatmap (:mod:`fish_lightning.app.anatomy_plot`).
- ``D/adapter.fish.safetensors`` with ``export=true``: the sparse export
  (:func:`fish_lightning.adapters.export.save_sparse`, only the changed entries).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from fish_lightning.adapters.export import save_mask, save_sparse
from fish_lightning.adapters.portable import make_portable
from fish_lightning.app.anatomy_plot import ANATOMY_PNG, title_of, write_anatomy_png
from fish_lightning.callback.fisher_mask import FisherMaskCallback
from fish_lightning.core.anatomy import by_kind, mask_anatomy
from fish_lightning.core.selection import density_report

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
MASK_FILE = "fish_mask.safetensors"
SPARSE_FILE = "adapter.fish.safetensors"


def save_model(model: nn.Module, run_dir: Path, settings: Mapping[str, Any] | None = None) -> str:
    """Save the trained ``model`` (peft-wrapped or not) under ``run_dir``; returns the folder's name. An adapter
    folder is made portable (:func:`fish_lightning.adapters.portable.make_portable`) with ``settings`` (the run's
    resolved ``model.net``, ``peft`` and ``model.tokenizer``: ``{"model_net": ..., "peft": ..., "tokenizer": ...}``)."""
    from peft import PeftModel

    settings = dict(settings or {})
    if isinstance(model, PeftModel):
        model.save_pretrained(str(run_dir / ADAPTER_DIR))
        make_portable(run_dir / ADAPTER_DIR, model, **settings)
        return ADAPTER_DIR
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    total = sum(1 for _ in model.parameters())
    if len(trainable) < total:  # an adapter outside peft (our bottleneck adapters): its tensors and the head
        from safetensors.torch import save_file

        (run_dir / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
        save_file(trainable, str(run_dir / ADAPTER_DIR / "trainable.safetensors"))
        make_portable(run_dir / ADAPTER_DIR, model, **settings)
        return ADAPTER_DIR
    model.save_pretrained(str(run_dir / MODEL_DIR))  # full fine-tuning: a transformers model
    return MODEL_DIR


def own_names(masks: Mapping[str, Tensor], module: pl.LightningModule) -> dict[str, Tensor]:
    """``masks`` (keyed by ``module``'s parameter names) keyed by ``module.model``'s own names (for a peft model:
    ``peft_model.named_parameters()``), so the file applies to the model wherever it is held; unchanged when a
    masked tensor is not inside ``module.model``."""
    inner = getattr(module, "model", None)
    if not isinstance(inner, nn.Module):
        return dict(masks)
    own = {id(p): n for n, p in inner.named_parameters()}
    params = dict(module.named_parameters())
    if not all(n in params and id(params[n]) in own for n in masks):
        return dict(masks)
    return {own[id(params[n])]: m for n, m in masks.items()}


def save_artifacts(
    run_dir: Path,
    module: pl.LightningModule,
    fish: FisherMaskCallback | None,
    export: bool = False,
    label: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the run's artifacts (module doc) and return ``{kind: file or folder name}``, plus
    ``"export"`` (the sparse export's size report) with ``export``. ``label`` (e.g. ``"sst2 · lora-r8+fisher"``)
    heads the anatomy figure's title, before the sparsity and the kept count; ``settings`` as :func:`save_model`."""
    out: dict[str, Any] = {"model": save_model(module.model, run_dir, settings)}
    if fish is None or fish.masks is None:
        return out
    masks = own_names(fish.masks, module)
    save_mask(masks, run_dir / MASK_FILE)
    out["mask"] = MASK_FILE
    stats = {"kept": fish.num_kept, "candidates": fish.num_candidates, "frozen_at_step": fish.freeze_step,
             "density": density_report(masks)}  # fmt: skip
    anatomy = mask_anatomy({n: int(m.sum()) for n, m in masks.items()}, {n: m.numel() for n, m in masks.items()})
    stats.update(anatomy=anatomy, by_kind=by_kind(anatomy))
    (run_dir / "mask_stats.json").write_text(json.dumps(stats, indent=1))
    head = " · ".join(x for x in (label or fish.settings.selection, f"sparsity {fish.sparsity:g}") if x)
    write_anatomy_png(anatomy, run_dir / ANATOMY_PNG, title=title_of(anatomy, prefix=f"{head}\n"))
    out["anatomy"] = ANATOMY_PNG
    if export:
        exp = save_sparse(module, fish.masks, run_dir / SPARSE_FILE)
        out["sparse"] = SPARSE_FILE
        out["export"] = {k: exp[k] for k in ("bytes", "dense_bytes", "ratio", "dense_fallback")}
    return out
