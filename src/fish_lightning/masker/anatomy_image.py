"""The mask anatomy as a labelled matplotlib figure for the loggers (TensorBoard's ``add_figure``): density per
layer × module kind, rows = layers (``other``: outside the numbered layers), columns = kinds, grey = no tensor of
that kind, a colour bar and the kept/total counts in the title. Sized to the grid, so each row and label stays
readable for a 6-layer encoder and a 32-layer decoder alike. Needs matplotlib (Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

CELL_W, CELL_H = 0.55, 0.28


def anatomy_figure(anatomy: Mapping[str, Any]) -> Any:
    """The figure of :func:`~fish_lightning.core.anatomy.mask_anatomy`'s grid (closed by the caller)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, kinds = anatomy["layers"], anatomy["kinds"]
    labels = ["other" if x is None else str(x) for x in layers]
    density = np.array([[math.nan if d is None else float(d) for d in row] for row in anatomy["density"]],
                       dtype=float).reshape(len(layers), len(kinds))  # fmt: skip
    below = 0.4 + 0.075 * max((len(k) for k in kinds), default=1)
    left = 0.3 + 0.09 * max((len(s) for s in labels), default=1)
    width, height = max(2.5, CELL_W * len(kinds)), max(1.6, CELL_H * len(layers))
    fig = plt.figure(figsize=(width + left + 1.6, height + below + 0.7))
    ax = fig.add_subplot(1, 1, 1)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")
    image = ax.imshow(np.ma.masked_invalid(density), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")  # fmt: skip
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylabel("layer")
    kept = sum(map(sum, anatomy["kept"]))
    total = sum(map(sum, anatomy["total"]))
    ax.set_title(f"kept {kept:,} of {total:,} (density {kept / total:.3g})" if total else "no candidates", fontsize=9)
    fig.colorbar(image, ax=ax, label="density (kept / entries)", fraction=0.05, pad=0.02)
    fig.tight_layout()
    return fig
