"""Budget matching: the sparsity at which FISH trains exactly as many entries as a reference."""

from __future__ import annotations

from fish_lightning.selection import num_kept


def sparsity_for_kept(n_candidates: int, kept: int) -> float:
    """A sparsity ``s`` with ``num_kept(n_candidates, s) == kept`` exactly.

    Raises ``ValueError`` when ``kept`` is not in ``1..n_candidates``.
    """
    if not 1 <= kept <= n_candidates:
        raise ValueError(f"budget of {kept} kept entries is not reachable with {n_candidates} candidates "
                         f"(expected 1 <= kept <= {n_candidates})")  # fmt: skip
    s = 1.0 - kept / n_candidates
    for candidate in (s, s - 0.25 / n_candidates, s + 0.25 / n_candidates):
        if 0.0 <= candidate < 1.0 and num_kept(n_candidates, candidate) == kept:
            return max(0.0, candidate)
    raise ArithmeticError(f"no float sparsity gives exactly {kept} of {n_candidates}")  # pragma: no cover
