"""Reproducible initialisation of peft LoRA / DoRA adapter tensors (pure torch + peft).

peft draws LoRA ``A`` from the *global* torch RNG, so its fit-start value depends on everything that
drew random numbers before the wrap. :func:`seeded_init_` redraws every adapter tensor from its own
``torch.Generator`` seeded by ``(seed, name)``, with peft's default distributions, so that any process
can rebuild the fit-start adapter exactly (:func:`init_values`). The sparse exporter
(:mod:`fish_lightning.adapters.export`) relies on this to store only the entries training changed.

Names are *canonical*: relative to the model the peft tuner wraps (``tuner.model``), e.g.
``bert.encoder.layer.0.attention.self.query.lora_A.default.weight``, whether the module handed in is
the ``PeftModel``, its ``LoraModel`` or a LightningModule holding either.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fish_lightning.adapters.peft_methods import REGISTRY

SUPPORTED_INITS = (True, False, "gaussian")
#: peft methods whose adapters the apps (fish-train, fish-cli) initialise from per-tensor seeds
SEEDED_METHODS = tuple(n for n, m in REGISTRY.items() if m.seeded)
"""``LoraConfig.init_lora_weights`` values :func:`seeded_init_` reproduces."""

_SEED_ATTR = "_fish_init_seed"


@dataclass(frozen=True, eq=False)
class AdapterTensor:
    """One LoRA-family tensor of a peft model.

    ``kind``: ``"A"``/``"B"`` (``lora_A``/``lora_B`` weights), ``"B.bias"`` (``lora_bias``),
    ``"emb_A"``/``"emb_B"`` (embedding LoRA), ``"magnitude"`` (DoRA's per-output-feature magnitude).
    ``init``: the adapter's ``init_lora_weights``; ``supported``: whether the layer's init is one this
    module reproduces (plain LoRA or DoRA, ``init`` in :data:`SUPPORTED_INITS`).
    """

    name: str
    param: nn.Parameter
    layer: nn.Module
    adapter: str
    kind: str
    init: object
    supported: bool


def find_tuner(model: nn.Module) -> tuple[str, nn.Module | None]:
    """``(prefix, tuner)``: the outermost peft ``BaseTuner`` inside ``model`` and the prefix that
    turns ``model.named_parameters()`` names into canonical ones (``("", None)`` without peft)."""
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover - peft is a dependency of the adapter features only
        return "", None
    for name, module in model.named_modules():
        if isinstance(module, BaseTuner):
            return (f"{name}.model." if name else "model."), module
    return "", None


def canonical_names(model: nn.Module) -> dict[str, str]:
    """``model.named_parameters()`` name -> canonical name, for parameters under the peft-wrapped
    model (all parameters when ``model`` has no peft tuner)."""
    prefix, _ = find_tuner(model)
    return {n: n[len(prefix) :] for n, _ in model.named_parameters() if n.startswith(prefix)}


def adapter_tensors(model: nn.Module) -> list[AdapterTensor]:
    """Every LoRA / DoRA tensor of ``model`` (canonical names), in ``named_modules`` order.

    Raises ``ValueError`` when ``model`` holds LoRA layers but no peft tuner (their config, hence
    their init scheme, is unknown).
    """
    from peft.tuners.lora import LoraLayer

    prefix, tuner = find_tuner(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        return []
    if tuner is None:
        raise ValueError(
            f"{type(model).__name__} has LoRA layers ({layers[0][0]!r}, ...) but no peft tuner: wrap it with "
            "peft.get_peft_model so that the adapter config (init_lora_weights) is known"
        )
    out: list[AdapterTensor] = []
    for path, layer in layers:
        if not path.startswith(prefix):
            continue
        base = path[len(prefix) :]
        for adapter in _layer_adapters(layer):
            config = tuner.peft_config.get(adapter)
            init = getattr(config, "init_lora_weights", None)
            supported = _supported(config, layer, adapter)

            found: list[tuple[str, str, object]] = []
            if adapter in layer.lora_A:
                found += [
                    ("A", f"lora_A.{adapter}.weight", layer.lora_A[adapter].weight),
                    ("B", f"lora_B.{adapter}.weight", layer.lora_B[adapter].weight),
                    ("B.bias", f"lora_B.{adapter}.bias", getattr(layer.lora_B[adapter], "bias", None)),
                ]
            if adapter in layer.lora_embedding_A:
                found += [
                    ("emb_A", f"lora_embedding_A.{adapter}", layer.lora_embedding_A[adapter]),
                    ("emb_B", f"lora_embedding_B.{adapter}", layer.lora_embedding_B[adapter]),
                ]
            if adapter in layer.lora_magnitude_vector:
                mag = layer.lora_magnitude_vector[adapter].weight
                found.append(("magnitude", f"lora_magnitude_vector.{adapter}.weight", mag))
            out += [
                AdapterTensor(f"{base}.{attr}", p, layer, adapter, kind, init, supported)
                for kind, attr, p in found
                if isinstance(p, nn.Parameter)
            ]
    return out


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor ``name``: first 32 bits of ``sha256(f"{seed}:{name}")``."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def init_values(model: nn.Module, seed: int | None, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Canonical name -> the value (CPU, the parameter's dtype) of each adapter tensor right after
    ``seeded_init_(model, seed)``, computed without touching ``model``.

    With ``seed=None`` only the values peft's own init fixes without randomness are returned (LoRA
    ``B`` and its bias for ``init_lora_weights`` in ``(True, "gaussian")``, embedding ``A``, and DoRA
    magnitudes whose ``B @ A`` is then zero). Tensors of unsupported layers (other init schemes or
    LoRA variants) are left out. ``names`` restricts the result (others may still be computed when a
    DoRA magnitude needs them).

    DoRA magnitudes are recomputed with peft's own ``update_layer`` on CPU from the base weight and
    the reference ``A``/``B``, so the result does not depend on the device the model lives on.
    """
    builder = _InitBuilder(adapter_tensors(model), seed)
    return {n: v for n in (builder.names if names is None else names) if (v := builder.value(n)) is not None}


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int, include: Sequence[str] | str | None = None) -> None:
    """Re-initialise the peft LoRA / DoRA tensors of ``model`` in place, reproducibly.

    Each tensor is drawn on CPU in float32 from ``torch.Generator().manual_seed(tensor_seed(seed,
    name))`` (``name`` canonical, see the module doc) with peft's distribution for the adapter's
    ``init_lora_weights``: ``True``: ``A ~ kaiming_uniform_(a=sqrt(5))`` (like ``nn.Linear``), ``B =
    0``; ``"gaussian"``: ``A ~ N(0, 1/r^2)``, ``B = 0``; ``False``: ``A`` and ``B`` (and ``lora_bias``)
    with ``nn.Linear``'s default init. Embedding LoRA: ``A = 0``, ``B ~ N(0, 1)`` (``False``: both
    ``N(0, 1)``). DoRA magnitudes are then recomputed from the base weight (see :func:`init_values`).
    The global RNG is neither read nor advanced, and the result does not depend on the order tensors
    are visited in. A model without LoRA layers is left unchanged (so callers may call it always).

    Args:
        model: a peft-wrapped model (``PeftModel``, its ``LoraModel``, or a module containing one).
        seed: any integer.
        include: regexes (``re.search``) over canonical names; only matching tensors are redrawn (a
            DoRA magnitude is recomputed when its layer's ``A`` or ``B`` is). Default: all.

    Raises ``ValueError`` for adapters whose init this function cannot reproduce (PiSSA, OLoRA,
    LoftQ, EVA, ..., or LoRA variants other than DoRA), naming the adapter and the setting.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer")
    patterns = [re.compile(p) for p in ([include] if isinstance(include, str) else include or [])]
    tensors = adapter_tensors(model)
    chosen = {t.name for t in tensors if not patterns or any(p.search(t.name) for p in patterns)}
    bad = [t for t in tensors if t.name in chosen and not t.supported]
    if bad:
        t = bad[0]
        variant = type(t.layer.lora_variant.get(t.adapter)).__name__ if t.adapter in t.layer.lora_variant else None
        raise ValueError(
            f"seeded_init_ cannot reproduce the init of adapter {t.adapter!r} ({t.name!r}): "
            f"init_lora_weights={t.init!r}, lora variant {variant}; supported: init_lora_weights in "
            f"{SUPPORTED_INITS} with plain LoRA or DoRA"
        )
    if not chosen:
        return
    builder = _InitBuilder(tensors, seed)  # values from the reference A/B, whatever the params hold now
    redrawn = {(id(t.layer), t.adapter) for t in tensors if t.name in chosen and t.kind != "magnitude"}
    for t in tensors:
        if t.name in chosen or (t.kind == "magnitude" and (id(t.layer), t.adapter) in redrawn):
            t.param.copy_(builder.value(t.name))  # type: ignore[arg-type]
    _, tuner = find_tuner(model)
    setattr(tuner if tuner is not None else model, _SEED_ATTR, seed)


def recorded_seed(model: nn.Module) -> int | None:
    """The ``seed`` of the last :func:`seeded_init_` on ``model`` (``None`` if it was never called)."""
    for module in model.modules():
        seed = getattr(module, _SEED_ATTR, None)
        if seed is not None:
            return int(seed)
    return None


# ---------------------------------------------------------------------------------------------- helpers
def _layer_adapters(layer: nn.Module) -> list[str]:
    names: list[str] = []
    for attr in ("lora_A", "lora_embedding_A", "lora_magnitude_vector"):
        for a in getattr(layer, attr, {}):
            if a not in names:
                names.append(a)
    return names


def _supported(config: object, layer: nn.Module, adapter: str) -> bool:
    from peft.utils import PeftType

    if config is None or getattr(config, "peft_type", None) != PeftType.LORA:
        return False
    init = getattr(config, "init_lora_weights", None)
    if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
        return False
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return variant is None or type(variant).__name__.startswith("Dora")


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))


class _InitBuilder:
    """Computes (and caches) the seeded init of the supported adapter tensors of one model."""

    def __init__(self, tensors: list[AdapterTensor], seed: int | None) -> None:
        self.seed = seed
        self.tensors = {t.name: t for t in tensors if t.supported}
        self.names = list(self.tensors)
        self._by_kind = {(id(t.layer), t.adapter, t.kind): t for t in self.tensors.values()}
        self._cache: dict[str, Tensor | None] = {}

    def value(self, name: str) -> Tensor | None:
        """Init value of ``name`` (CPU, its dtype); ``None`` if unknown (needs a seed, unsupported)."""
        if name not in self._cache:
            t = self.tensors.get(name)
            self._cache[name] = None if t is None else self._magnitude(t) if t.kind == "magnitude" else self._draw(t)
        return self._cache[name]

    def _draw(self, t: AdapterTensor) -> Tensor | None:
        shape, dtype = t.param.shape, t.param.dtype
        zero_b = t.init is not False  # True / "gaussian": B (and its bias) and embedding A start at zero
        if t.kind in ("B", "B.bias", "emb_A") and zero_b:
            return torch.zeros(shape, dtype=dtype)
        if self.seed is None:
            return None
        g = _generator(self.seed, t.name)
        x = torch.empty(shape, dtype=torch.float32)
        if t.kind in ("emb_A", "emb_B"):
            nn.init.normal_(x, generator=g)
        elif t.kind == "A" and isinstance(t.init, str):  # "gaussian"
            nn.init.normal_(x, std=1.0 / t.layer.r[t.adapter], generator=g)
        elif t.kind in ("A", "B"):
            nn.init.kaiming_uniform_(x, a=math.sqrt(5), generator=g)
        else:  # "B.bias" with init_lora_weights=False: nn.Linear's bias init
            fan_in = t.layer.lora_B[t.adapter].weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(x, -bound, bound, generator=g)
        return x.to(dtype)

    def _magnitude(self, t: AdapterTensor) -> Tensor | None:
        """DoRA magnitude for the reference A/B, via peft's own ``update_layer`` on a CPU copy."""
        pair = ("A", "B") if t.adapter in t.layer.lora_A else ("emb_A", "emb_B")
        parts = [self._by_kind.get((id(t.layer), t.adapter, k)) for k in pair]
        if parts[0] is None or parts[1] is None:
            return None
        a, b = self.value(parts[0].name), self.value(parts[1].name)
        if a is None and b is None:
            return None
        if a is None or b is None:  # one factor unknown: fine only when the other is exactly zero
            if bool((a if a is not None else b).any()):  # type: ignore[union-attr]
                return None
            a = a if a is not None else torch.zeros(parts[0].param.shape, dtype=parts[0].param.dtype)
            b = b if b is not None else torch.zeros(parts[1].param.shape, dtype=parts[1].param.dtype)
        dora = copy.deepcopy(t.layer.lora_magnitude_vector[t.adapter]).to("cpu")
        dora.update_layer(base_layer=t.layer.get_base_layer(), lora_A=a, lora_B=b, scaling=t.layer.scaling[t.adapter])
        return dora.weight.detach().to("cpu", t.param.dtype).clone()
