"""Exact per-example squared gradients from one forward + backward: an engine and per-module rules.

* :mod:`.engine` -- :class:`PerExampleSquaredGrads` (hooks, multi-call buffering, missed/unseen
  detection, gradient checkpointing);
* :mod:`.registry` -- :class:`Rule` and :func:`register_rule` (by type or predicate);
* :mod:`.torch_rules` -- ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding``;
* :mod:`.peft_rules` -- peft's DoRA, IA3, LoHa, LoKr, VeRA layers (duck typed);
* :mod:`.fallback` -- the general ``torch.func`` rule for any other module.
"""

from fish_lightning.core.per_example.engine import PerExampleSquaredGrads
from fish_lightning.core.per_example.fallback import FuncFallbackRule
from fish_lightning.core.per_example.registry import SKIP, Rule, find_rule, register_rule, registered_rules

__all__ = [
    "SKIP",
    "FuncFallbackRule",
    "PerExampleSquaredGrads",
    "Rule",
    "find_rule",
    "register_rule",
    "registered_rules",
]
