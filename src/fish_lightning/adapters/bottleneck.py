"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) for BERT/RoBERTa-style encoders.

Pure torch. Our own small implementation, because AdapterHub's ``adapters`` package pins
``transformers~=4.57`` (version 1.3.0) and does not import with transformers 5.

Each adapter is ``h -> h + up(act(down(h)))`` applied to the output of a sub-layer's output
projection (the ``dense`` of ``attention.output`` and/or of ``output``), i.e. before that
sub-layer's dropout, residual connection and LayerNorm. ``up`` is zero-initialised, so the wrapped
model computes exactly what the base model computes until the first update. Adapter parameters are
named ``...<sub-layer>.dense.adapter.{down,up}.{weight,bias}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fish_lightning.core.candidates import ALWAYS_TRAINED_ATTR

#: style -> (adapter after the attention output, adapter after the FFN output, default non-linearity);
#: positions and non-linearities as AdapterHub's DoubleSeqBnConfig (houlsby) and SeqBnConfig (pfeiffer).
ADAPTER_STYLES: dict[str, tuple[bool, bool, str]] = {
    "houlsby": (True, True, "swish"),
    "pfeiffer": (False, True, "relu"),
}
NONLINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
_DEFAULT_HEADS = ("classifier", "score")


class BottleneckAdapter(nn.Module):
    """``h -> h + up(act(down(h)))``; ``h``: ``[..., dim]``, ``down``: dim -> bottleneck, ``up``: back.

    ``down.weight`` ~ N(0, ``init_std``); ``up`` (weight and bias) and ``down.bias`` start at zero,
    so the adapter starts as the identity.
    """

    def __init__(self, dim: int, bottleneck: int, non_linearity: str = "relu", init_std: float = 0.02) -> None:
        super().__init__()
        if non_linearity not in NONLINEARITIES:
            raise ValueError(f"non_linearity={non_linearity!r} is not valid: expected one of {tuple(NONLINEARITIES)}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = NONLINEARITIES[non_linearity]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h)))


def _run_adapter(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    """Forward hook on a ``dense`` projection: pass its output through its ``adapter`` child."""
    return module.adapter(output)


def _sublayer_outputs(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(layer name, attention.output, output)`` of every BERT/RoBERTa-style transformer layer."""
    found = []
    for name, m in model.named_modules():
        attn_out = getattr(getattr(m, "attention", None), "output", None)
        ffn_out = getattr(m, "output", None)
        if (
            hasattr(m, "intermediate")
            and isinstance(getattr(attn_out, "dense", None), nn.Linear)
            and isinstance(getattr(ffn_out, "dense", None), nn.Linear)
        ):
            found.append((name, attn_out, ffn_out))
    return found


def add_adapters(
    model: nn.Module,
    style: str = "houlsby",
    reduction_factor: int = 16,
    bottleneck: int | None = None,
    non_linearity: str | None = None,
    init_std: float = 0.02,
    modules_to_save: Sequence[str] | None = None,
) -> nn.Module:
    """Insert bottleneck adapters into ``model`` in place, freeze everything else but the head.

    Args:
        model: a Hugging Face BERT/RoBERTa-style model (layers with ``attention.output.dense``,
            ``intermediate`` and ``output.dense``), e.g. ``BertForSequenceClassification``.
        style: ``"houlsby"`` (after the attention output and the FFN output of each layer) or
            ``"pfeiffer"`` (after the FFN output only).
        reduction_factor: bottleneck width = ``hidden // reduction_factor`` (at least 1).
        bottleneck: explicit bottleneck width; overrides ``reduction_factor``.
        non_linearity: one of :data:`NONLINEARITIES`; default ``"swish"`` (houlsby) / ``"relu"`` (pfeiffer).
        init_std: standard deviation of the down-projection's initial weights.
        modules_to_save: names (or dotted-name suffixes) of modules kept fully trainable and
            marked ``fish_always_trained`` (never FISH candidates); default: whichever of
            ``classifier`` / ``score`` exists.

    Returns ``model``, whose trainable parameters are exactly the adapters and the head.
    """
    if style not in ADAPTER_STYLES:
        raise ValueError(f"adapter style {style!r} is not valid: expected one of {tuple(ADAPTER_STYLES)}")
    after_attn, after_ffn, default_act = ADAPTER_STYLES[style]
    non_linearity = non_linearity or default_act
    if bottleneck is None and not _positive_int(reduction_factor):
        raise ValueError(f"reduction_factor={reduction_factor!r} must be an integer >= 1")
    if bottleneck is not None and not _positive_int(bottleneck):
        raise ValueError(f"bottleneck={bottleneck!r} must be None or an integer >= 1")
    layers = _sublayer_outputs(model)
    if not layers:
        raise ValueError(
            f"no BERT/RoBERTa-style transformer layer (with attention.output.dense, intermediate and "
            f"output.dense) found in {type(model).__name__}: bottleneck adapters cannot be inserted"
        )
    heads = _find_heads(model, modules_to_save)

    model.requires_grad_(False)
    for _, attn_out, ffn_out in layers:
        for sub, wanted in ((attn_out, after_attn), (ffn_out, after_ffn)):
            if not wanted:
                continue
            dense: nn.Linear = sub.dense
            if hasattr(dense, "adapter"):
                raise ValueError(f"{type(model).__name__} already has adapters: add_adapters was applied twice")
            width = bottleneck if bottleneck is not None else max(1, dense.out_features // reduction_factor)
            adapter = BottleneckAdapter(dense.out_features, width, non_linearity, init_std)
            dense.add_module("adapter", adapter.to(device=dense.weight.device, dtype=dense.weight.dtype))
            dense.register_forward_hook(_run_adapter)
    for head in heads:
        head.requires_grad_(True)
        setattr(head, ALWAYS_TRAINED_ATTR, True)
    return model


def _positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _find_heads(model: nn.Module, modules_to_save: Sequence[str] | None) -> list[nn.Module]:
    """Modules whose dotted name equals or ends with one of ``modules_to_save`` (default: the head)."""
    names = [modules_to_save] if isinstance(modules_to_save, str) else modules_to_save
    wanted = list(names) if names is not None else list(_DEFAULT_HEADS)
    named = list(model.named_modules())
    heads: list[nn.Module] = []
    for key in wanted:
        hits = [m for n, m in named if n == key or n.endswith(f".{key}")]
        if not hits and names is not None:
            raise ValueError(
                f"modules_to_save entry {key!r} matches no module of {type(model).__name__}; "
                f"top-level modules are: {[n for n, _ in model.named_children()]}"
            )
        heads.extend(m for m in hits if all(m is not h for h in heads))
    if not heads:
        raise ValueError(
            f"no classifier head ({' or '.join(_DEFAULT_HEADS)}) found in {type(model).__name__}: "
            f"pass modules_to_save=[<head module name>] (top-level modules: {[n for n, _ in model.named_children()]})"
        )
    return heads
