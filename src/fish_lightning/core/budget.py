"""Budget matching: the sparsity at which FISH trains exactly as many entries as a reference.

Counts are numbers of scalar entries. A model's trainable entries split into its FISH
*candidates* (:func:`~fish_lightning.core.candidates.find_candidates`) and its *always-trained*
entries (trainable but not candidates, e.g. the classifier head peft saves whole).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fish_lightning.core.candidates import find_candidates
from fish_lightning.core.selection import num_kept

Patterns = Sequence[str] | str | None


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


def count_candidates(model: nn.Module, include: Patterns = None, exclude: Patterns = None) -> int:
    """Entries in ``model``'s FISH candidates (same ``include``/``exclude`` as the callback)."""
    names = set(find_candidates(model, include, exclude))
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def count_trainable_entries(model: nn.Module) -> int:
    """Entries with ``requires_grad=True`` (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def match_kept(
    model: nn.Module,
    reference: nn.Module | int,
    include: Patterns = None,
    exclude: Patterns = None,
    count_always_trained: bool = False,
) -> int:
    """Candidate entries of ``model`` FISH must keep to match ``reference``'s trainable budget.

    Args:
        model: the model FISH will mask (already PEFT-wrapped).
        reference: a model (e.g. the same base with vanilla LoRA at a smaller rank) or an int,
            an absolute number of trainable entries.
        include, exclude: candidate patterns, as given to ``FisherMaskCallback`` (applied to both models).
        count_always_trained: ``False``: match candidate entries only, i.e. kept = the reference's
            candidate entries (an int reference is that count). ``True``: match total trainable
            entries, i.e. kept = the reference's trainable entries (or the int) minus ``model``'s
            always-trained entries (trainable non-candidates, e.g. the classifier head).

    Raises ``ValueError`` naming the numbers when the result is not in ``1..n_candidates``.
    """
    if not isinstance(count_always_trained, bool):
        raise ValueError(f"count_always_trained={count_always_trained!r} must be True or False")
    n = count_candidates(model, include, exclude)
    always = count_trainable_entries(model) - n
    if isinstance(reference, nn.Module):
        if count_always_trained:
            target, what = count_trainable_entries(reference), "trainable entries of the reference model"
        else:
            target, what = count_candidates(reference, include, exclude), "candidate entries of the reference model"
    elif isinstance(reference, int) and not isinstance(reference, bool):
        if reference < 1:
            raise ValueError(f"reference budget {reference} must be >= 1 trainable entries")
        target, what = reference, "trainable entries asked for"
    else:
        raise TypeError(f"reference must be an nn.Module or an int, got {type(reference).__name__}")
    kept = target - always if count_always_trained else target
    if not 1 <= kept <= n:
        detail = (
            f"{target:,} {what} minus this model's {always:,} always-trained entries = {kept:,} to keep"
            if count_always_trained
            else f"{target:,} {what} to keep"
        )
        hint = (
            "the always-trained entries alone use up the budget: use count_always_trained=False or a larger reference"
            if kept < 1
            else "use a larger rank/model or a smaller reference"
        )
        raise ValueError(
            f"budget is unreachable: {detail}, but FISH can keep only 1..{n:,} of this model's {n:,} candidate "
            f"entries (count_always_trained={count_always_trained}); {hint}"
        )
    return kept


def match_sparsity(
    model: nn.Module,
    reference: nn.Module | int,
    include: Patterns = None,
    exclude: Patterns = None,
    count_always_trained: bool = False,
) -> float:
    """The ``sparsity`` with which ``FisherMaskCallback(include=..., exclude=...)`` keeps exactly
    :func:`match_kept` candidate entries of ``model``; see there for the arguments."""
    kept = match_kept(model, reference, include, exclude, count_always_trained)
    return sparsity_for_kept(count_candidates(model, include, exclude), kept)
