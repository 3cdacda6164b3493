"""The package's layers, enforced: core (pure torch) <- masker (the lifecycle, framework-free) <- callback (Lightning) /
adapters (transformers, peft) <- app.

Every ``import`` in a module counts, also the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "fish_lightning"
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "transformers", "peft")
# layer -> first-party layers and third-party roots it may not import
FORBIDDEN = {
    "core": (("masker", "callback", "adapters", "app"), FRAMEWORKS),
    "masker": (("callback", "adapters", "app"), FRAMEWORKS),
    "callback": (("adapters", "app"), ("hydra", "omegaconf", "transformers", "peft")),
    "adapters": (("callback", "app"), ("lightning", "pytorch_lightning", "hydra")),
    "integrations": (("callback", "app"), ("lightning", "pytorch_lightning", "hydra", "omegaconf")),
}


def imports(path: Path) -> list[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(("fish_lightning", *path.relative_to(PKG).parent.parts))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module or "")
    return names


def modules(layer: str) -> list[Path]:
    return sorted((PKG / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_layer_imports_only_what_lies_below(layer):
    own_forbidden, third_forbidden = FORBIDDEN[layer]
    bad = []
    for path in modules(layer):
        for name in imports(path):
            root, _, rest = name.partition(".")
            if root == "fish_lightning" and rest.split(".")[0] in own_forbidden:
                bad.append(f"{path.relative_to(PKG)} imports {name}")
            if root in third_forbidden:
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert modules(layer), layer
    assert not bad, bad


def test_nothing_outside_the_app_imports_the_app():
    bad = [
        f"{path.relative_to(PKG)} imports {name}"
        for path in PKG.rglob("*.py")
        if "app" not in path.relative_to(PKG).parts and path.name != "_compat.py"  # (_compat names old paths only)
        for name in imports(path)
        if name.startswith("fish_lightning.app")
    ]
    assert not bad, bad


@pytest.mark.parametrize("path", sorted((PKG / "app").glob("report*.py")), ids=lambda p: p.name)
def test_report_needs_no_torch(path):
    names = imports(path)
    assert not [n for n in names if n.split(".")[0] in ("torch", "lightning", *FRAMEWORKS)], names
    own = [n for n in names if n.startswith("fish_lightning.")]
    assert not [n for n in own if n != "fish_lightning.app" and not n.startswith("fish_lightning.app.report")], names


def test_old_module_paths_still_import_with_a_warning():
    import importlib
    import sys

    for old, new in [("modeling", "adapters.models"), ("fisher", "core.fisher"), ("module", "app.classifier")]:
        sys.modules.pop(f"fish_lightning.{old}", None)
        with pytest.warns(DeprecationWarning, match=f"fish_lightning.{old} moved to fish_lightning.{new}"):
            mod = importlib.import_module(f"fish_lightning.{old}")
        assert mod is importlib.import_module(f"fish_lightning.{new}")
    from fish_lightning.adapters import BottleneckAdapter, add_adapters  # the 0.1.0 module's names

    assert callable(add_adapters) and BottleneckAdapter.__module__ == "fish_lightning.adapters.bottleneck"
