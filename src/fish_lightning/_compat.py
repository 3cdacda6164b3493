"""Module paths of fish-lightning 0.1.0 (one flat package), kept importable with a DeprecationWarning.

``import fish_lightning.modeling`` (or a Hydra ``_target_: fish_lightning.modeling.apply_peft`` in an old
run's config.yaml) yields the module at its new path; both names are the same module object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "candidates": "core.candidates",
    "selection": "core.selection",
    "masking": "core.masking",
    "sparse_state": "core.sparse_state",
    "sharding": "core.sharding",
    "budget": "core.budget",
    "fisher": "core.fisher",
    "calibration": "masker.calibration",
    "modeling": "adapters.models",
    "decoders": "adapters.decoders",
    "adapter_init": "adapters.seeded_init",
    "export": "adapters.export",
    "train": "app.train",
    "cli": "app.cli",
    "sweeps": "app.sweeps",
    "module": "app.classifier",
    "causal_lm": "app.causal_lm",
    "data": "app.classification_data",
    "instruct": "app.instruction_data",
    "report": "app.report",
}
# ``fish_lightning.adapters`` (the bottleneck module) is now a package that re-exports the same names.


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``fish_lightning.<old>`` to ``fish_lightning.<new>`` (see :data:`MOVED`)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        parent, _, name = fullname.rpartition(".")
        if parent != "fish_lightning" or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = f"fish_lightning.{MOVED[spec.name.rpartition('.')[2]]}"
        warnings.warn(f"{spec.name} moved to {new}; the old path will be removed", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        return None


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
