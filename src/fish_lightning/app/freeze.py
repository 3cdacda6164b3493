"""``TrainOnly``: a Lightning callback that freezes every parameter except those matching some patterns, before the
optimizer is built. With ``peft=none fish=off`` and the pattern ``classifier`` it gives the head-only baseline (a
linear probe on the frozen encoder):

    fish-train peft=none fish=off +callbacks.head_only._target_=fish_lightning.app.freeze.TrainOnly \
        '+callbacks.head_only.patterns=[classifier]'
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import lightning.pytorch as pl


class TrainOnly(pl.Callback):
    """Keep ``requires_grad`` only on the parameters whose name matches one of ``patterns`` (``re.search``).

    Runs in ``setup``, i.e. before ``configure_optimizers``, so the optimizer sees only those parameters and the
    run's trainable count (``results.json``) is theirs. A pattern that matches no trainable parameter is an error.
    """

    def __init__(self, patterns: Sequence[str] | str = ("classifier",)) -> None:
        names = [patterns] if isinstance(patterns, str) else list(patterns)
        if not names:
            raise ValueError("TrainOnly needs at least one pattern, e.g. ['classifier']")
        try:
            self.patterns = [re.compile(p) for p in names]
        except re.error as err:
            raise ValueError(f"TrainOnly pattern is not a regular expression: {err}") from None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        for pat in self.patterns:
            if not any(pat.search(n) for n, _ in trainable):
                examples = [n for n, _ in trainable[-4:]]
                raise ValueError(f"TrainOnly pattern {pat.pattern!r} matches no trainable parameter, e.g. {examples}")
        for name, param in trainable:
            param.requires_grad_(any(pat.search(name) for pat in self.patterns))
