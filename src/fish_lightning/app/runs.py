"""Use what a ``fish-train`` run trained: :func:`load_run` rebuilds the model (base, adapter, head, pooling) from
the run directory, offline, in eval mode; :func:`load_tokenizer` gives its tokenizer.

A run directory ``D`` holds ``config.yaml`` (whose ``model.net`` builds the base) and either ``D/adapter/`` (peft's
``adapter_config.json`` + ``adapter_model.safetensors``, or our bottleneck adapters' ``trainable.safetensors``) or
``D/model/`` (full fine-tuning). An adapter folder on its own (``D/adapter``, copied anywhere) loads too: its
``fish_lightning.json`` (:mod:`fish_lightning.adapters.portable`) records how to rebuild the base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fish_lightning.adapters.portable import RUN_META

ADAPTER_DIR, MODEL_DIR, CONFIG = "adapter", "model", "config.yaml"


class RunLoadError(ValueError):
    """A folder that does not hold a loadable run; the message names what is missing."""


def _settings(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None, str, Path | None]:
    """``(model.net, peft, tokenizer, run directory or None)`` for a run directory or an adapter folder."""
    from omegaconf import OmegaConf

    if (folder / CONFIG).is_file():
        cfg = OmegaConf.to_container(OmegaConf.load(folder / CONFIG), resolve=False)
        model = cfg.get("model") or {}
        if not isinstance(model.get("net"), dict):
            raise RunLoadError(f"{folder / CONFIG} has no model.net: it is not the config.yaml of a fish-train run")
        return model["net"], cfg.get("peft"), model.get("tokenizer") or "minilm", folder
    if (folder / RUN_META).is_file():
        meta = json.loads((folder / RUN_META).read_text())
        if not isinstance(meta.get("model_net"), dict):
            raise RunLoadError(f"{folder / RUN_META} records no model_net: the base cannot be rebuilt")
        return meta["model_net"], meta.get("peft"), meta.get("tokenizer") or "minilm", None
    raise RunLoadError(f"{folder} is not a fish-train run: it has no {CONFIG} (a run directory) and no "
                       f"{RUN_META} (an adapter folder)")  # fmt: skip


def _build_base(model_net: dict[str, Any]) -> nn.Module:
    from hydra.utils import instantiate

    with torch.random.fork_rng(devices=[]):  # tiny random bases seed the global RNG: leave the caller's alone
        return instantiate(model_net)


def _trained_folder(folder: Path, run_dir: Path | None) -> tuple[str, Path]:
    """``("peft" | "bottleneck" | "full", path)`` of what the run saved."""
    adapter = folder / ADAPTER_DIR if run_dir is not None else folder
    if (adapter / "adapter_config.json").is_file():
        return "peft", adapter
    if (adapter / "trainable.safetensors").is_file():
        return "bottleneck", adapter / "trainable.safetensors"
    if run_dir is not None and (run_dir / MODEL_DIR).is_dir():
        return "full", run_dir / MODEL_DIR
    status = ""
    if run_dir is not None and (run_dir / "results.json").is_file():
        res = json.loads((run_dir / "results.json").read_text())
        status = f" (results.json: status {res.get('status')!r}{', ' + str(res['error']) if res.get('error') else ''})"
    want = (f"{ADAPTER_DIR}/adapter_config.json, {ADAPTER_DIR}/trainable.safetensors or {MODEL_DIR}/"
            if run_dir is not None else "adapter_config.json or trainable.safetensors")  # fmt: skip
    raise RunLoadError(f"{folder} holds no trained model: expected {want}{status}")


def _load_full(base: nn.Module, folder: Path) -> nn.Module:
    """Full fine-tuning: ``folder``'s ``save_pretrained`` weights into the rebuilt ``base`` (which keeps the run's
    pooling; tied weights saved once load into both)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RunLoadError(f"{folder} holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = base.load_state_dict(state, strict=False)
    params = dict(base.named_parameters(remove_duplicate=False))
    loaded = {params[n].data_ptr() for n in state if n in params}
    untied = [n for n in missing if n in params and params[n].data_ptr() not in loaded]
    if unexpected or untied:
        raise RunLoadError(f"{folder} does not fit the model config.yaml builds: "
                           f"{len(untied)} missing (e.g. {untied[:2]}), {len(unexpected)} unexpected "
                           f"(e.g. {unexpected[:2]}) tensors")  # fmt: skip
    return base


def load_run(run_dir: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """The trained model of a ``fish-train`` run (base, adapter, classifier head, pooling; sequence classifiers
    and causal LMs) in eval mode, built offline from ``run_dir`` (a run directory, or its ``adapter/`` folder
    copied anywhere). Its outputs are the run's final model's.

    Returns a ``peft.PeftModel`` for peft adapters, else the transformers model (full fine-tuning, our bottleneck
    adapters). Raises :class:`RunLoadError` naming what is missing for a folder that is not a run.
    """
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise RunLoadError(f"run_dir={str(run_dir)!r} is not a directory")
    model_net, peft_cfg, _, run = _settings(folder)
    kind, path = _trained_folder(folder, run)
    base = _build_base(model_net)
    if kind == "peft":
        from peft import PeftModel

        model: nn.Module = PeftModel.from_pretrained(base, str(path))
    elif kind == "bottleneck":
        from hydra.utils import instantiate
        from safetensors.torch import load_file

        if not peft_cfg:
            raise RunLoadError(f"{path} needs the run's peft settings (config.yaml peft, or {RUN_META}), none found")
        with torch.random.fork_rng(devices=[]):
            model = instantiate(peft_cfg)(base)
        tensors = load_file(str(path))
        params = dict(model.named_parameters())
        unknown = [n for n in tensors if n not in params]
        if unknown:
            raise RunLoadError(f"{path}: tensor {unknown[0]!r} names no parameter of the rebuilt model")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
    else:
        model = _load_full(base, path)
    model.eval()
    return model.to(device) if device is not None else model


def load_tokenizer(run_dir: str | os.PathLike) -> Any:
    """The tokenizer the run used (``model.tokenizer``; ``"minilm"``: the packaged MiniLM's)."""
    from transformers import AutoTokenizer

    from fish_lightning.adapters.models import resolve_model_path

    _, _, tokenizer, _ = _settings(Path(run_dir).expanduser())
    return AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))
