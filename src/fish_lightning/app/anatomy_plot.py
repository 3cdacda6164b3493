"""Mask anatomy heatmaps: rows = layers, columns = module kinds, colour = density of kept entries.

Input is the aggregation of :func:`fish_lightning.core.anatomy.mask_anatomy` as ``mask_stats.json`` stores it
(``{"layers", "kinds", "kept", "total", "density"}``; a layer ``None``/``null`` is everything outside the numbered
layers). Needs only matplotlib (Agg backend) and the standard library: ``fish-report`` draws with it, torch-free.

- :func:`anatomy_figure` / :func:`write_anatomy_png`: one run's ``mask_anatomy.png``.
- :func:`anatomy_panels_figure` / :func:`write_anatomy_panels`: several runs on a grid (``fish-report``'s
  ``anatomy.png``).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

ANATOMY_PNG = "mask_anatomy.png"
#: inches per grid cell (width, height) and the most cells that get their density written in
CELL_W, CELL_H = 0.55, 0.28
ANNOTATE_MAX_CELLS = 200


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def totals(anatomy: Mapping[str, Any]) -> tuple[int, int]:
    """``(kept, total)`` over the whole grid."""
    kept = sum(sum(row) for row in anatomy["kept"])
    total = sum(sum(row) for row in anatomy["total"])
    return kept, total


def layer_label(layer: Any) -> str:
    return "other" if layer is None else str(layer)


def title_of(anatomy: Mapping[str, Any], prefix: str = "") -> str:
    """``"<prefix>kept K of N (density D)"``."""
    kept, total = totals(anatomy)
    density = f"{kept / total:.3g}" if total else "n/a"
    return f"{prefix}kept {kept:,} of {total:,} (density {density})"


def _layout(anatomy: Mapping[str, Any]) -> tuple[float, float]:
    """Inches ``(width, height)`` of one heatmap's axes: grows with the grid, never below a readable minimum."""
    n_rows, n_cols = len(anatomy["layers"]), len(anatomy["kinds"])
    return max(2.5, CELL_W * n_cols), max(1.6, CELL_H * n_rows)


def _label_room(anatomy: Mapping[str, Any]) -> tuple[float, float]:
    """Inches for the rotated column labels (below) and the row labels (left)."""
    longest = max((len(k) for k in anatomy["kinds"]), default=1)
    return 0.4 + 0.075 * longest, 0.3 + 0.09 * max((len(layer_label(x)) for x in anatomy["layers"]), default=1)


def draw_anatomy(ax: Any, anatomy: Mapping[str, Any], title: str | None = None, colorbar: bool = True) -> Any:
    """Draw the heatmap into ``ax`` (grey: no tensor of that kind in that layer); returns the image."""
    import numpy as np

    density = np.array(
        [[math.nan if d is None else float(d) for d in row] for row in anatomy["density"]], dtype=float
    ).reshape(len(anatomy["layers"]), len(anatomy["kinds"]))
    cmap = _plt().get_cmap("viridis").with_extremes(bad="#d0d0d0")
    image = ax.imshow(np.ma.masked_invalid(density), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")  # fmt: skip
    ax.set_xticks(range(len(anatomy["kinds"])))
    ax.set_xticklabels(anatomy["kinds"], rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(anatomy["layers"])))
    ax.set_yticklabels([layer_label(x) for x in anatomy["layers"]], fontsize=8)
    ax.set_ylabel("layer")
    if density.size <= ANNOTATE_MAX_CELLS:
        for (i, j), d in np.ndenumerate(density):
            if not math.isnan(d):
                ax.text(j, i, f"{d:.0%}" if d >= 0.01 or d == 0 else f"{d:.1%}", ha="center", va="center",
                        fontsize=7, color="black" if d > 0.6 else "white")  # fmt: skip
    ax.set_title(title if title is not None else title_of(anatomy), fontsize=9)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="density (kept / entries)", fraction=0.05, pad=0.02)
    return image


def anatomy_figure(anatomy: Mapping[str, Any], title: str | None = None) -> Any:
    """One run's figure, sized to the grid (a 32-layer decoder gets a tall one, a 6-layer encoder a short one)."""
    plt = _plt()
    width, height = _layout(anatomy)
    below, left = _label_room(anatomy)
    fig = plt.figure(figsize=(width + left + 1.6, height + below + 0.7))
    draw_anatomy(fig.add_subplot(1, 1, 1), anatomy, title)
    fig.tight_layout()
    return fig


def write_anatomy_png(anatomy: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None) -> None:
    """Save :func:`anatomy_figure` as a PNG."""
    fig = anatomy_figure(anatomy, title)
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def write_anatomy_panels(
    panels: Sequence[Sequence[tuple[str, Mapping[str, Any] | None]]], path: str | os.PathLike[str]
) -> None:
    """Save :func:`anatomy_panels_figure` as a PNG."""
    fig = anatomy_panels_figure(panels)
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def anatomy_panels_figure(panels: Sequence[Sequence[tuple[str, Mapping[str, Any] | None]]]) -> Any:
    """Panels on a grid, ``panels[row][col] = (title, anatomy)`` (``None``: an empty slot), one shared colour scale.
    Titles are wrapped to their panel's width, and every panel gets room for its title's lines."""
    plt = _plt()
    n_rows = len(panels)
    n_cols = max(len(row) for row in panels)
    present = [a for row in panels for _, a in row if a is not None]
    width = max(_layout(a)[0] + _label_room(a)[1] for a in present)
    chars = max(24, int(width / 0.068))  # characters of a 8-pt title line that fit the panel
    titles = [[_wrap(t, chars) for t, _ in row] for row in panels]
    title_lines = max(t.count("\n") + 1 for row in titles for t in row)
    height = max(_layout(a)[1] + _label_room(a)[0] for a in present) + 0.35 + 0.16 * title_lines
    fig_w = width * n_cols + 1.2
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(fig_w, height * n_rows), squeeze=False)
    image = None
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            if c >= len(panels[r]) or panels[r][c][1] is None:
                ax.set_visible(False)
                continue
            image = draw_anatomy(ax, panels[r][c][1], titles[r][c], colorbar=False)
            ax.title.set_fontsize(8)
            if c > 0:
                ax.set_ylabel("")
    fig.tight_layout(rect=(0, 0, 1 - 0.9 / fig_w, 1))
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="density (kept / entries)", fraction=0.03, pad=0.01)
    return fig


def _wrap(title: str, chars: int) -> str:
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in title.splitlines())
