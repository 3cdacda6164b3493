"""Mask selection: exactly ``k`` entries by index, with a deterministic tie-break.

Pure torch; no Lightning import. Scores are per-entry importances (higher = keep), e.g. the
diagonal Fisher. A threshold mask ``score >= kth`` keeps *every* tied entry (with LoRA's
zero-initialised B, all of A scores 0), so selection here always counts entries by index.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

SELECTIONS = ("fisher", "random", "reverse", "magnitude")
SCOPES = ("global", "per_tensor")


class TieWarning(UserWarning):
    """The k-th score is shared by entries on both sides of the cut; ties were broken by index."""


def num_kept(n: int, sparsity: float) -> int:
    """Number of entries kept out of ``n`` at ``sparsity``: ``round((1 - sparsity) * n)``.

    Rounds half to even (Python's ``round``).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is out of range: expected 0 <= sparsity < 1")
    return int(round((1.0 - sparsity) * n))


def topk_mask(scores: Tensor, k: int) -> tuple[Tensor, int]:
    """Boolean mask of exactly ``k`` largest entries of a 1-D ``scores`` tensor.

    Ties at the cut are broken by the lowest flat index (deterministic on every device/rank).

    Returns:
        ``(mask, n_tied)`` where ``mask`` is a bool tensor shaped like ``scores`` and ``n_tied`` is
        the number of entries equal to the k-th value that competed for the remaining slots
        (0 when the cut is clean).
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is out of range for {n} entries: expected 0 <= k <= {n}")
    flat = scores.reshape(-1)
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k == 0:
        return mask.view_as(scores), 0
    if k == n:
        return mask.fill_(True).view_as(scores), 0
    if torch.isnan(flat).any():
        raise ValueError("scores contain NaN; cannot rank entries (check for NaN gradients)")
    # k-th largest == (n - k + 1)-th smallest
    kth = torch.kthvalue(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat, n - k + 1).values
    above = flat > kth
    mask |= above
    need = k - int(above.sum())
    tied = (flat == kth).nonzero().squeeze(1)  # ascending flat index
    mask[tied[:need]] = True
    n_tied = int(tied.numel()) if tied.numel() > need else 0
    return mask.view_as(scores), n_tied


def select_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    scope: str = "global",
    warn_ties: bool = True,
) -> dict[str, Tensor]:
    """Keep exactly ``num_kept(n, sparsity)`` entries, globally or per tensor.

    Args:
        scores: name -> score tensor (any shape); higher is kept first.
        sparsity: fraction of entries frozen, in [0, 1).
        scope: ``"global"`` (one top-k over all tensors, in the mapping's order) or
            ``"per_tensor"`` (each tensor keeps ``num_kept(numel, sparsity)``).
        warn_ties: emit a :class:`TieWarning` when the cut falls inside a run of equal scores.

    Returns:
        name -> bool mask with the tensor's shape (on the scores' device).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not valid: expected one of {SCOPES}")
    if not scores:
        raise ValueError("no score tensors to select from")
    names = list(scores)
    masks: dict[str, Tensor] = {}
    if scope == "global":
        flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
        k = num_kept(flat.numel(), sparsity)
        mask, n_tied = topk_mask(flat, k)
        if n_tied and warn_ties:
            _warn_ties(n_tied, flat.numel(), k, "all candidates")
        offset = 0
        for n in names:
            numel = scores[n].numel()
            masks[n] = mask[offset : offset + numel].view(scores[n].shape).clone()
            offset += numel
    else:
        for n in names:
            s = scores[n].detach().float()
            k = num_kept(s.numel(), sparsity)
            m, n_tied = topk_mask(s.reshape(-1), k)
            if n_tied and warn_ties:
                _warn_ties(n_tied, s.numel(), k, n)
            masks[n] = m.view(s.shape)
    return masks


def _order_keys(scores: Tensor) -> Tensor:
    """int64 keys with the order of the float32 ``scores`` (-0.0 counted as +0.0, as ``==`` does)."""
    bits = (scores.detach().reshape(-1).float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -1 - (bits & 0x7FFFFFFF))


def select_masks_sharded(
    scores: Mapping[str, Tensor],
    numels: Mapping[str, int],
    offsets: Mapping[str, int],
    sparsity: float,
    all_reduce_sum: Callable[[Tensor], Tensor],
    rank: int,
    world_size: int,
    scope: str = "global",
    warn_ties: bool = True,
) -> dict[str, Tensor]:
    """:func:`select_masks` over tensors whose entries are split across ranks (FSDP shards): exactly
    ``k`` kept entries in total, and the same entries :func:`select_masks` keeps on the gathered scores.

    Every rank calls this with its own local slices; the k-th value is found by a bisection over
    order-preserving integer keys (~33 all-reduces of one count per selection group), and ties at
    the cut go to the lowest global flat index (in ``scores``' order), as in :func:`topk_mask`.

    Args:
        scores: name -> this rank's scores, the flat range ``[offsets[n], offsets[n] + numel)`` of the
            tensor's row-major flattening (any shape; may be empty). Same names and order on every rank.
        numels: name -> the whole tensor's number of entries.
        offsets: name -> flat index of this rank's first entry.
        all_reduce_sum: sums an int64 tensor over ranks and returns the result (e.g. ``dist.all_reduce``).
        rank, world_size: this rank and the number of ranks taking part.

    Returns:
        name -> bool mask shaped like this rank's ``scores[n]``.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not valid: expected one of {SCOPES}")
    if not scores:
        raise ValueError("no score tensors to select from")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is out of range for world_size={world_size}")
    names = list(scores)
    device = next(iter(scores.values())).device
    keys = {n: _order_keys(scores[n]) for n in names}
    groups = [names] if scope == "global" else [[n] for n in names]
    group_of = {n: g for g, members in enumerate(groups) for n in members}
    n_groups = len(groups)
    ks = torch.tensor([num_kept(sum(numels[n] for n in m), sparsity) for m in groups], dtype=torch.int64)
    nan = torch.tensor([sum(int(torch.isnan(scores[n]).sum()) for n in names)], dtype=torch.int64, device=device)
    if int(all_reduce_sum(nan)[0]):
        raise ValueError("scores contain NaN; cannot rank entries (check for NaN gradients)")

    def counts(threshold: Tensor, strict: bool) -> Tensor:
        c = torch.zeros(n_groups, dtype=torch.int64, device=device)
        for n in names:
            g = group_of[n]
            c[g] += int((keys[n] > threshold[g]).sum() if strict else (keys[n] >= threshold[g]).sum())
        return all_reduce_sum(c).cpu()

    # largest key t with count(key >= t) >= k, per group (k = 0 or all: decided without a search)
    lo = torch.full((n_groups,), -(2**31), dtype=torch.int64)
    hi = torch.full((n_groups,), 2**31 - 1, dtype=torch.int64)
    for _ in range(33):  # the int32 key range halves each time: 32 rounds close it
        mid = (lo + hi + 1) // 2
        enough = counts(mid.to(device), strict=False) >= ks
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid - 1)
    kth = lo.to(device)
    need = ks - counts(kth, strict=True)  # slots left for entries equal to the k-th value
    # ties in global flat order: (group order, tensor order, rank's offset) -> this rank's quota
    tied_local = {n: (keys[n] == kth[group_of[n]]) for n in names}
    table = torch.zeros(2, world_size, len(names), dtype=torch.int64, device=device)
    for j, n in enumerate(names):
        table[0, rank, j] = int(tied_local[n].sum())
        table[1, rank, j] = offsets[n]
    table = all_reduce_sum(table).cpu()
    quota: dict[str, int] = {}
    for g, members in enumerate(groups):
        left = int(need[g])
        total_tied = int(sum(int(table[0, :, names.index(n)].sum()) for n in members))
        for n in members:
            j = names.index(n)
            for r in sorted(range(world_size), key=lambda r: (int(table[1, r, j]), r)):
                take = min(left, int(table[0, r, j]))
                if r == rank:
                    quota[n] = take
                left -= take
        n_all = sum(numels[n] for n in members)
        if warn_ties and 0 < int(ks[g]) < n_all and total_tied > int(need[g]):
            _warn_ties(total_tied, n_all, int(ks[g]), "all candidates" if scope == "global" else members[0])
    masks = {}
    for n in names:
        g = group_of[n]
        m = keys[n] > kth[g]
        if quota.get(n, 0):
            idx = tied_local[n].nonzero().squeeze(1)[: quota[n]]
            m[idx] = True
        if int(ks[g]) == 0:
            m.zero_()
        masks[n] = m.view(scores[n].shape)
    return masks


def _warn_ties(n_tied: int, n: int, k: int, where: str) -> None:
    warnings.warn(
        f"mask selection over {where}: {n_tied} of {n} entries share the score at the cut "
        f"(k={k}); kept the lowest-index ones. With LoRA, a Fisher taken before any update "
        "scores all of A as 0 (B starts at zero): use dense warmup steps before the freeze.",
        TieWarning,
        stacklevel=3,
    )


def selection_scores(
    selection: str,
    fisher: Mapping[str, Tensor] | None,
    params: Mapping[str, Tensor],
    seed: int = 0,
) -> dict[str, Tensor]:
    """Per-entry scores for a selection rule (higher = kept).

    ``"fisher"``: the Fisher; ``"reverse"``: minus the Fisher (keeps the lowest);
    ``"random"``: uniform noise from a CPU generator seeded with ``seed`` (same on every rank);
    ``"magnitude"``: ``|w|`` of the current parameter values.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not valid: expected one of {SELECTIONS}")
    if selection in ("fisher", "reverse"):
        if fisher is None:
            raise ValueError(f"selection={selection!r} needs a Fisher estimate, but none was accumulated")
        sign = 1.0 if selection == "fisher" else -1.0
        return {n: sign * fisher[n].float() for n in params}
    if selection == "magnitude":
        return {n: p.detach().abs().float() for n, p in params.items()}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in params.items()}


def density_report(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """name -> fraction of kept entries, plus ``"__total__"`` over all masks."""
    out = {n: float(m.float().mean()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    out["__total__"] = kept / total if total else math.nan
    return out
