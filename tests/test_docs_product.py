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
