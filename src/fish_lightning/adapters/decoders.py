"""Causal language models (decoders) for FISH: build a Hugging Face ``AutoModelForCausalLM`` and add
LoRA to every linear projection of its blocks (attention and MLP).

Pure torch + transformers + peft; no Lightning import. Model sources: a local directory or hub id
(``from_pretrained``), or a small random config built in code (tests, offline smoke runs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fish_lightning.adapters.models import apply_peft, resolve_model_path
from fish_lightning.adapters.peft_methods import REGISTRY, get_method, offered

#: ``config.model_type`` -> names (suffixes) of the linear projections of each block: attention and
#: MLP, never the embeddings or the LM head. GPT-2's are ``transformers`` ``Conv1D`` layers (weight
#: stored ``[in, out]``), for which peft needs ``fan_in_fan_out=True`` (set by :func:`apply_decoder_peft`).
DECODER_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # attn: c_attn (qkv), attn.c_proj; mlp: c_fc, mlp.c_proj
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

#: peft methods :func:`apply_decoder_peft` accepts (the LoRA family, and ``none`` = full fine-tuning).
#: the registry's methods that run on causal LMs
DECODER_PEFT_METHODS = tuple(n for n in offered() if REGISTRY[n].decoder)

#: :func:`apply_decoder_peft`'s ``target_modules`` value meaning "every projection of this architecture".
PROJECTIONS = "projections"

DTYPES = ("float32", "bfloat16", "float16")

#: :func:`build_causal_lm`'s ``quantization`` values besides ``None``: a ``bitsandbytes`` base (QLoRA).
QUANTIZATIONS = ("4bit", "8bit")


def build_causal_lm(
    name_or_path: str | None = None,
    tiny_config: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    quantization: str | None = None,
) -> nn.Module:
    """An ``AutoModelForCausalLM``: pretrained from ``name_or_path`` (hub id or local directory), or
    randomly initialised (seeded) from ``tiny_config`` = ``{"model_type": "gpt2" | "llama" | ...,
    **config fields}`` when given. ``dtype``: ``None`` (the checkpoint's/fp32) or one of :data:`DTYPES`.

    ``quantization``: ``None``, ``"4bit"`` (NF4, compute in ``dtype``, fp32 by default) or ``"8bit"``
    (LLM.int8): the linear layers of the blocks become frozen ``bitsandbytes`` layers (transformers'
    ``BitsAndBytesConfig``; the LM head and embeddings stay as they are), for LoRA on top (QLoRA).
    Needs ``pip install "fish-lightning[quant]"``. A ``tiny_config`` model is built, saved to a
    temporary directory and loaded back quantized, the same path as a pretrained one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid: expected null or one of {DTYPES}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not valid: expected null or one of {QUANTIZATIONS}")
    torch_dtype = getattr(torch, dtype) if dtype is not None else None
    if quantization is not None:
        return _build_quantized(name_or_path, tiny_config, seed, torch_dtype, quantization)
    if tiny_config is not None:
        fields = dict(tiny_config)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ValueError(f"tiny_config needs a model_type (e.g. 'gpt2', 'llama'); got keys {sorted(tiny_config)}")
        config = AutoConfig.for_model(model_type, **fields)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        return model.to(torch_dtype) if torch_dtype is not None else model
    if not name_or_path:
        raise ValueError("build_causal_lm needs name_or_path (hub id or directory) or tiny_config")
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs)


def _bnb_config(quantization: str, compute_dtype: torch.dtype | None) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes: pip install 'fish-lightning[quant]'"
        ) from e
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype or torch.float32
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _build_quantized(
    name_or_path: str | None,
    tiny_config: dict[str, Any] | None,
    seed: int,
    torch_dtype: torch.dtype | None,
    quantization: str,
) -> nn.Module:
    """:func:`build_causal_lm` with a ``bitsandbytes`` base (``quantization`` already checked)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"quantization_config": _bnb_config(quantization, torch_dtype)}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if tiny_config is None:
        if not name_or_path:
            raise ValueError("build_causal_lm needs name_or_path (hub id or directory) or tiny_config")
        return _no_cpu_repacking(AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs))
    model = build_causal_lm(tiny_config=tiny_config, seed=seed)  # fp32 random weights, then quantized on load
    with tempfile.TemporaryDirectory(prefix="fish-quant-") as tmp:
        model.save_pretrained(tmp)
        del model
        model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
    model.name_or_path = model.config._name_or_path = ""  # as from a config, not the removed temporary directory
    return _no_cpu_repacking(model)


def _no_cpu_repacking(model: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights. On a CPU with AVX512-BF16, a
    ``Linear4bit`` forward in eval mode without input gradients rewrites its weight in place into a
    packed layout (bf16 absmax); a later training backward through it runs an op with no autograd
    kernel and returns wrong input gradients (measured with bitsandbytes 0.50.2: LoRA gradients off by
    ~100% after one validation pass), and layers narrower than the 64-wide block fail. Training and
    Fisher estimation need the unpacked layout, so the flag is cleared on every layer that has it."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def decoder_projections(model: nn.Module) -> list[str]:
    """The :data:`DECODER_PROJECTIONS` of ``model``'s architecture (``config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DECODER_PROJECTIONS:
        raise ValueError(
            f"no known projection names for model_type={model_type!r} (known: {sorted(DECODER_PROJECTIONS)}): "
            "set target_modules to a list of module names, or to 'all-linear' (peft's every-linear-layer rule)"
        )
    return list(DECODER_PROJECTIONS[model_type])


def apply_decoder_peft(
    model: nn.Module, method: str = "lora", target_modules: str | list[str] = PROJECTIONS, **config: Any
) -> nn.Module:
    """Wrap a causal LM with a LoRA-family method (``peft.LoraConfig``, ``task_type="CAUSAL_LM"``).

    Args:
        model: an ``AutoModelForCausalLM``.
        method: one of :data:`DECODER_PEFT_METHODS` (``"none"``: unchanged, full fine-tuning).
        target_modules: ``"projections"`` (default: :data:`DECODER_PROJECTIONS` of the architecture,
            i.e. every attention and MLP projection), ``"all-linear"`` (peft's rule: every linear
            layer but the LM head), or a list of module names.
        config: further ``LoraConfig`` fields (``r``, ``lora_alpha``, ``lora_dropout``, ...).

    ``fan_in_fan_out`` defaults to ``True`` when every targeted layer is a ``transformers`` ``Conv1D``
    (GPT-2), whose weight is stored ``[in, out]``.
    """
    get_method(method, decoder=True)
    if method == "none":
        return apply_peft(model, "none", **config)
    if target_modules == PROJECTIONS:
        target_modules = decoder_projections(model)
    elif not isinstance(target_modules, str):
        target_modules = [str(t) for t in target_modules]  # also an OmegaConf ListConfig
    config.setdefault("task_type", "CAUSAL_LM")
    if config["task_type"] != "CAUSAL_LM":
        raise ValueError(f"task_type={config['task_type']!r} is not valid for a decoder: expected 'CAUSAL_LM'")
    if "fan_in_fan_out" not in config and _targets_only_conv1d(model, target_modules):
        config["fan_in_fan_out"] = True
    return apply_peft(model, method, target_modules=target_modules, **config)


def _targets_only_conv1d(model: nn.Module, target_modules: str | list[str]) -> bool:
    """Whether every layer ``target_modules`` selects is a ``transformers`` ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(target_modules, str):  # "all-linear": every linear layer except the LM head
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        hits = [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]
    else:
        hits = [m for n, m in model.named_modules() if n.split(".")[-1] in target_modules]
    return bool(hits) and all(isinstance(m, Conv1D) for m in hits)
