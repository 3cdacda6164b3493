"""README and docs/ describe the product: no development history, no workspace paths, links that resolve."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
HISTORY = re.compile(
    r"\bsessions?\b|git history|\bissue ?#?\d+|\b(tested|measured|run|checked) here\b|engine fix|\bcommit [0-9a-f]{7}"
    r"|this project's|\bfirst study\b|before the (fix|batched)|\.\./shared",
    re.IGNORECASE,
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_tell_no_history(page):
    hits = [f"{i}: {ln.strip()[:100]}" for i, ln in enumerate(page.read_text().splitlines(), 1) if HISTORY.search(ln)]
    assert not hits, "\n".join(hits)


def test_readme_starts_with_the_two_commands_and_links_exist():
    text = (ROOT / "README.md").read_text()
    first, second = text.split("```bash\n", 1)[1].splitlines()[:2]
    assert first.startswith("python3 -m venv .venv") and 'pip install -e ".[test]"' in first
    assert first.endswith("&& fish-train") and second == ". .venv/bin/activate && python -m pytest -q"
    missing = [link for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md|LICENSE)\)", text)
               if not (ROOT / link).exists()]  # fmt: skip
    assert not missing, missing
    assert len(text.splitlines()) <= 200  # a product README, not a lab notebook


def _resolve(dotted: str) -> object:
    """Import the longest importable prefix of ``dotted`` and read the rest as attributes."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_import_path_the_docs_show_resolves():
    """``from fish_lightning... import a, b`` lines and backticked ``fish_lightning.x.y`` names in README and docs/."""
    names = set()
    for page in PAGES:
        text = page.read_text()
        for module, imported in re.findall(r"^\s*from (fish_lightning[\w.]*) import ([\w, ]+)", text, re.MULTILINE):
            names |= {f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()}
        names |= {m for m in re.findall(r"`(fish_lightning(?:\.\w+)+)", text) if not m.endswith(".json")}
    source = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    loggers = {n for n in names if f'getLogger("{n}")' in source}  # logger names, not modules
    names -= loggers
    assert len(names) > 20
    broken = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            broken.append(f"{name}: {e}")
    assert not broken, "\n".join(broken)
