"""The PEFT methods the apps build, one registration each (Opacus-style: adding a method is one entry here and one
``conf/peft/<name>.yaml``).

An entry says how to wrap a model (a peft config class and the fields it forces, or a function), which tensors the
method adds (its default FISH candidates), whether the apps seed its initialisation, whether it runs on causal LMs,
what trains whatever the mask says, and, for a method FISH cannot mask, why it is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class PeftMethod:
    """One PEFT method.

    Args:
        name: the ``peft.method`` value (``conf/peft/<name>.yaml``).
        help: one line for users (error messages, docs).
        added: regex (``re.search``) of the names of the tensors the method adds (peft adapter ``default``): the
            default FISH candidates; ``None``: every weight (full fine-tuning).
        peft_config: the peft config class name (``"LoraConfig"``, ...); ``None`` with ``build``.
        forced: config fields the method sets (e.g. ``use_dora=True``); a conflicting value is an error.
        build: ``(model, **config) -> model`` for methods that are not a peft config (our bottleneck adapters).
        seeded: the apps initialise its adapter from per-tensor seeds (reproducible, exportable sparsely).
        decoder: supported on causal LMs (``apply_decoder_peft``).
        always_trained: what trains densely whatever the mask (prose, for docs and errors).
        refused: why FISH refuses the method (it is then not offered).
        ranked: its config has a rank ``r`` (``budget.r`` can name another rank's entry count).
    """

    name: str
    help: str
    added: str | None
    peft_config: str | None = None
    forced: dict[str, Any] = field(default_factory=dict)
    build: Callable[..., nn.Module] | None = None
    seeded: bool = False
    decoder: bool = False
    always_trained: str = "the classifier head (peft's modules_to_save)"
    refused: str | None = None
    ranked: bool = False


#: name -> method, in registration order
REGISTRY: dict[str, PeftMethod] = {}


def register_peft_method(method: PeftMethod) -> PeftMethod:
    """Add ``method`` (replacing one of the same name)."""
    REGISTRY[method.name] = method
    return method


def offered() -> tuple[str, ...]:
    """The methods the apps build (not the refused ones)."""
    return tuple(n for n, m in REGISTRY.items() if m.refused is None)


def get_method(name: str, decoder: bool = False) -> PeftMethod:
    """The registered method ``name``; ``ValueError`` naming the offered ones (refused methods: the reason)."""
    method = REGISTRY.get(name) if isinstance(name, str) else None
    valid = tuple(n for n in offered() if not decoder or REGISTRY[n].decoder)
    where = " on decoders" if decoder else ""
    if method is None:
        raise ValueError(f"peft method {name!r} is not supported{where}: expected one of {valid}")
    if method.refused is not None:
        raise ValueError(refusal(name))
    if decoder and not method.decoder:
        raise ValueError(f"peft method {name!r} is not supported{where}: expected one of {valid}")
    return method


def refusal(name: str) -> str:
    """The one-line refusal of a registered method FISH cannot mask."""
    return (f"peft method {name!r} is not supported with FISH: {REGISTRY[name].refused}; use one of "
            f"{', '.join(offered())}")  # fmt: skip


def _bottleneck(style: str) -> Callable[..., nn.Module]:
    def build(model: nn.Module, **config: Any) -> nn.Module:
        from fish_lightning.adapters.bottleneck import add_adapters

        return add_adapters(model, style=style, **config)

    return build


def _none(model: nn.Module, **config: Any) -> nn.Module:
    if config:
        raise ValueError(f"peft method 'none' (full fine-tuning) takes no options, got {sorted(config)}")
    return model


LORA_AB = r"\.lora_[AB]\.default\.weight$"
BOTTLENECK = "the classifier head (marked fish_always_trained)"

for _m in (
    PeftMethod("none", "full fine-tuning: FISH over every weight, head included", None, build=_none, decoder=True,
               always_trained="nothing (every weight is a candidate)"),
    PeftMethod("lora", "LoRA (peft.LoraConfig)", LORA_AB, "LoraConfig", seeded=True, decoder=True, ranked=True),
    PeftMethod("dora", "DoRA: LoRA with a learned magnitude (use_dora=True)",
               r"\.lora_(A|B|magnitude_vector)\.default\.weight$", "LoraConfig", {"use_dora": True}, seeded=True,
               decoder=True, ranked=True),
    PeftMethod("rslora", "rank-stabilised LoRA (use_rslora=True)", LORA_AB, "LoraConfig", {"use_rslora": True},
               seeded=True, decoder=True, ranked=True),
    PeftMethod("pissa", "PiSSA: LoRA initialised from the principal singular vectors", LORA_AB, "LoraConfig",
               decoder=True, ranked=True),
    PeftMethod("adalora", "AdaLoRA (peft.AdaLoraConfig)", r"\.lora_[ABE]\.default$", "AdaLoraConfig",
               refused="AdaLoRA's rank allocator prunes entries FISH keeps frozen (update_and_allocate)"),
    PeftMethod("ia3", "IA3: learned rescaling vectors (peft.IA3Config)", r"\.ia3_l\.default$", "IA3Config"),
    PeftMethod("loha", "LoHa: Hadamard-product low rank (peft.LoHaConfig)", r"\.hada_w[12]_[ab]\.default$",
               "LoHaConfig", ranked=True),
    PeftMethod("lokr", "LoKr: Kronecker-product low rank (peft.LoKrConfig)", r"\.lokr_w[12](_[ab])?\.default$",
               "LoKrConfig", ranked=True),
    PeftMethod("vera", "VeRA: shared random projections, learned scaling vectors (peft.VeraConfig)",
               r"\.vera_lambda_[bd]\.default$", "VeraConfig", ranked=True),
    PeftMethod("houlsby", "Houlsby bottleneck adapters after attention and FFN outputs",
               r"\.dense\.adapter\.(down|up)\.(weight|bias)$", build=_bottleneck("houlsby"), always_trained=BOTTLENECK),
    PeftMethod("pfeiffer", "Pfeiffer bottleneck adapters after the FFN output",
               r"\.output\.dense\.adapter\.(down|up)\.(weight|bias)$", build=_bottleneck("pfeiffer"),
               always_trained=BOTTLENECK),
):  # fmt: skip
    register_peft_method(_m)
