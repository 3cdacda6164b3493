"""Checkpoints that hold what training changes, not the frozen base.

A peft run trains a small fraction of its model (MiniLM + LoRA: the adapter and the head); the rest is rebuilt,
bit for bit, by the model's own settings (the packaged or hub checkpoint, or a seeded random config).
:class:`LeanCheckpointMixin` drops every frozen parameter (``requires_grad=False``) from a checkpoint's
``state_dict`` and, when the checkpoint is loaded (``Trainer.fit(ckpt_path=...)``, ``load_from_checkpoint``), fills
them back from the module being loaded into, after checking a per-tensor fingerprint (sum and sum of squares, in
float64) so a checkpoint never loads onto another base silently. The optimizer, scheduler, loops, callbacks' state
(FISH) and RNG states stay in the checkpoint as Lightning writes them. A sharded model (FSDP2 ``DTensor`` parameters,
whose distributed checkpoints load in place by key) keeps Lightning's full checkpoint.

:func:`model_from_run_config` builds a run's model from its resolved ``fish-train`` config, so that
``SequenceClassifier.load_from_checkpoint(path)`` / ``CausalLM.load_from_checkpoint(path)`` need no arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

FROZEN_KEY = "fish_frozen_rebuilt"  # checkpoint entry: name -> fingerprint of each dropped frozen tensor


def fingerprint(t: Tensor) -> Tensor:
    """``[sum, sum of squares]`` of ``t`` in float64 (CPU): cheap, order-stable on one device."""
    x = t.detach().to(torch.float64)
    return torch.stack([x.sum(), (x * x).sum()]).cpu()


class LeanCheckpointMixin:
    """For a ``LightningModule``: checkpoints without its frozen parameters (module doc)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))  # type: ignore[attr-defined]
        if any(hasattr(p, "placements") for p in params.values()):
            return  # sharded (FSDP2, distributed checkpoints load in place by key): Lightning's checkpoint as it is
        frozen = {n: p for n, p in params.items() if not p.requires_grad}
        state = checkpoint.get("state_dict")
        if not frozen or state is None:
            return
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}
        checkpoint[FROZEN_KEY] = {n: fingerprint(p) for n, p in frozen.items() if n in state}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        dropped: Mapping[str, Tensor] | None = checkpoint.get(FROZEN_KEY)
        if not dropped:
            return
        own = dict(self.named_parameters(remove_duplicate=False))  # type: ignore[attr-defined]
        missing = [n for n in dropped if n not in own]
        if missing:
            raise ValueError(f"checkpoint: frozen tensor {missing[0]!r} (rebuilt, not stored) names no parameter of "
                             f"{type(self).__name__}: was it saved from a model built the same way?")  # fmt: skip
        for name, want in dropped.items():
            got = fingerprint(own[name])
            if not torch.allclose(got, want.to(got.dtype), rtol=1e-6, atol=1e-8):
                raise ValueError(f"checkpoint: frozen tensor {name!r} of the model built now differs from the one "
                                 "trained (the checkpoint stores only trainable tensors; the base must be rebuilt "
                                 "from the same checkpoint/seed)")  # fmt: skip
        state = dict(checkpoint["state_dict"])
        for name in dropped:
            state.setdefault(name, own[name].detach())
        checkpoint["state_dict"] = state


def model_from_run_config(run_config: Mapping[str, Any]) -> nn.Module:
    """The (peft-wrapped) model of a resolved ``fish-train`` config (``model.net``, ``peft``, ``seed``), as the run
    built it before training."""
    from hydra.utils import instantiate

    from fish_lightning.adapters.models import build_peft_model

    try:
        net, peft, seed = run_config["model"]["net"], run_config["peft"], run_config["seed"]
    except (KeyError, TypeError):
        raise ValueError("run_config needs model.net, peft and seed (the resolved fish-train config)") from None
    return build_peft_model(lambda: instantiate(net), instantiate(peft), peft["method"], seed)
