"""Mask selection: exactly ``k`` entries by index, with a deterministic tie-break.

Pure torch; no Lightning import. Scores are per-entry importances (higher = keep), e.g. the
diagonal Fisher. A threshold mask ``score >= kth`` keeps *every* tied entry (with LoRA's
zero-initialised B, all of A scores 0), so selection here always counts entries by index.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

SELECTIONS = ("fisher", "random", "reverse", "magnitude")
SCOPES = ("global", "per_tensor", "normalized")


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
    k: int | None = None,
) -> dict[str, Tensor]:
    """Keep exactly ``num_kept(n, sparsity)`` entries (or ``k``), globally or per tensor.

    The same entries as :func:`topk_mask` on the concatenated scores (ties at the cut go to the lowest
    flat index, in the mapping's order), found without concatenating or sorting: a bisection for the
    k-th value counts entries above a threshold tensor by tensor (see :func:`select_masks_sharded`),
    so the only memory beyond the scores is the masks (1 B/entry) and one tensor's temporaries.

    Args:
        scores: name -> score tensor (any shape); higher is kept first.
        sparsity: fraction of entries frozen, in [0, 1).
        scope: ``"global"`` (one top-k over all tensors, in the mapping's order), ``"per_tensor"`` (each
            tensor keeps ``num_kept(numel, sparsity)``) or ``"normalized"`` (one global top-k over scores
            divided by their tensor's mean ``|score|``: scale-aware, so a tensor whose gradients are orders
            of magnitude smaller, LoRA A against B, is not starved, yet densities still differ by tensor;
            costs one copy of the scores).
        warn_ties: emit a :class:`TieWarning` when the cut falls inside a run of equal scores.
        k: keep exactly this many entries instead (``"global"``/``"normalized"`` scopes; ``sparsity`` unused).

    Returns:
        name -> bool mask with the tensor's shape (on the scores' device).
    """
    return select_masks_sharded(
        scores, {n: t.numel() for n, t in scores.items()}, dict.fromkeys(scores, 0), sparsity,
        lambda t: t, rank=0, world_size=1, scope=scope, warn_ties=warn_ties, k=k,
    )  # fmt: skip


_NEG_INF_KEY = -1 - 0x7F800000  # order key of -inf; +inf's is 0x7F800000 (NaN patterns lie outside)


def _threshold(key: int) -> float:
    """The float32 value with order key ``key`` (keys: float32 bits, negatives mirrored so order is kept)."""
    bits = key if key >= 0 else (-1 - key) | 0x80000000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


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
    k: int | None = None,
) -> dict[str, Tensor]:
    """:func:`select_masks` over tensors whose entries are split across ranks (FSDP shards): exactly
    ``k`` kept entries in total, the same entries :func:`select_masks` keeps on the gathered scores.

    Every rank calls this with its own local slices. The k-th largest value is found by a bisection over
    the ordered float32 values (34 rounds; each counts ``score >= threshold`` tensor by tensor and does one
    all-reduce of a per-group count), then one all-reduce of a ``[2, world, tensors]`` table of tie counts
    and offsets gives each rank its share of the entries equal to the k-th value, lowest global flat index
    first (in ``scores``' order), as :func:`topk_mask` breaks ties. Scores are compared as float32 (fp16/
    bf16 are widened exactly); ``-0.0`` equals ``0.0``.

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
    flat = {n: scores[n].detach().reshape(-1) for n in names}
    flat = {n: f if f.dtype == torch.float32 else f.float() for n, f in flat.items()}
    if scope == "normalized":
        flat = _normalized(flat, numels, all_reduce_sum, device)
    groups = [[n] for n in names] if scope == "per_tensor" else [names]
    group_of = {n: g for g, members in enumerate(groups) for n in members}
    n_groups = len(groups)
    sizes = [sum(numels[n] for n in members) for members in groups]
    if k is not None:
        if scope == "per_tensor" or isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= sizes[0]:
            raise ValueError(f"k={k!r} must be an integer in [0, {sizes[0]}] with scope 'global' or 'normalized'")
        ks = torch.tensor([k], dtype=torch.int64)
    else:
        ks = torch.tensor([num_kept(size, sparsity) for size in sizes], dtype=torch.int64)
    nan = torch.tensor([sum(int(torch.isnan(flat[n]).sum()) for n in names)], dtype=torch.int64, device=device)
    if int(all_reduce_sum(nan)[0]):
        raise ValueError("scores contain NaN; cannot rank entries (check for NaN gradients)")

    counts = _ShardCounts(flat, group_of, n_groups, all_reduce_sum, device)
    kth = counts.kth_values(ks)
    need = (ks - counts(kth, strict=True)).tolist()  # slots left for entries equal to the k-th value
    quota, tied = _tie_quotas(flat, offsets, groups, kth, need, all_reduce_sum, rank, world_size, device)
    for g, (members, total_tied) in enumerate(zip(groups, tied)):
        if warn_ties and 0 < int(ks[g]) < sizes[g] and total_tied > need[g]:
            _warn_ties(total_tied, sizes[g], int(ks[g]), members[0] if scope == "per_tensor" else "all candidates")
    masks = {}
    for n in names:
        g = group_of[n]
        if int(ks[g]) == 0:
            masks[n] = torch.zeros(scores[n].shape, dtype=torch.bool, device=device)
            continue
        m = flat[n] > kth[g]
        if quota.get(n, 0):
            tied = flat[n] == kth[g]
            m |= tied & (tied.cumsum(0) <= quota[n])
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


@dataclass(frozen=True)
class Scorer:
    """A selection rule: per-entry scores (higher = kept) from the Fisher (``None`` unless ``needs_fisher``), the
    candidate parameters and a seed."""

    name: str
    score: Callable[[Mapping[str, Tensor] | None, Mapping[str, Tensor], int], dict[str, Tensor]]
    needs_fisher: bool


#: name -> scorer; ``selection=<name>`` picks one (:func:`register_scorer` adds a user's own)
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, needs_fisher: bool) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn(fisher, params, seed) -> {name: scores}`` as ``selection=name``. With
    ``needs_fisher=True`` the warmup (or calibration) Fisher is accumulated and passed; else ``fisher`` is
    ``None`` and no Fisher is computed."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_scorer: name={name!r} must be a non-empty string")

    def deco(fn: Callable) -> Callable:
        SCORERS[name] = Scorer(name, fn, bool(needs_fisher))
        return fn

    return deco


@register_scorer("fisher", needs_fisher=True)
def _fisher(fisher: Mapping[str, Tensor], params: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    # the accumulators themselves (no copy: the freeze's peak memory)
    return {n: fisher[n] if fisher[n].dtype == torch.float32 else fisher[n].float() for n in params}


@register_scorer("random", needs_fisher=False)
def _random(fisher: Mapping[str, Tensor] | None, params: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in params.items()}


@register_scorer("reverse", needs_fisher=True)
def _reverse(fisher: Mapping[str, Tensor], params: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    return {n: -fisher[n].float() for n in params}


@register_scorer("magnitude", needs_fisher=False)
def _magnitude(fisher: Mapping[str, Tensor] | None, params: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    return {n: p.detach().abs().float() for n, p in params.items()}


def get_scorer(selection: str) -> Scorer:
    """The registered scorer ``selection`` (``ValueError`` listing the registered names otherwise)."""
    if not isinstance(selection, str) or selection not in SCORERS:
        raise ValueError(f"selection={selection!r} is not valid: expected one of {tuple(SCORERS)}")
    return SCORERS[selection]


def selection_scores(
    selection: str,
    fisher: Mapping[str, Tensor] | None,
    params: Mapping[str, Tensor],
    seed: int = 0,
) -> dict[str, Tensor]:
    """Per-entry scores for a selection rule (higher = kept).

    ``"fisher"``: the Fisher (the same tensors when fp32: do not modify them); ``"reverse"``: minus the
    Fisher (a copy; keeps the lowest);
    ``"random"``: uniform noise from a CPU generator seeded with ``seed`` (same on every rank);
    ``"magnitude"``: ``|w|`` of the current parameter values; any name registered with :func:`register_scorer`.
    """
    scorer = get_scorer(selection)
    if scorer.needs_fisher and fisher is None:
        raise ValueError(f"selection={selection!r} needs a Fisher estimate, but none was accumulated")
    return scorer.score(fisher, params, seed)


def density_report(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """name -> fraction of kept entries, plus ``"__total__"`` over all masks."""
    out = {n: float(m.float().mean()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    out["__total__"] = kept / total if total else math.nan
    return out


def _normalized(flat: dict[str, Tensor], numels: Mapping[str, int], all_reduce_sum: Callable[[Tensor], Tensor],
                device: torch.device) -> dict[str, Tensor]:  # fmt: skip
    """Each tensor's scores divided by its mean ``|score|`` over all ranks (one all-reduce; 1 where it is 0)."""
    sums = torch.stack([f.double().abs().sum() for f in flat.values()]) if flat else torch.zeros(0)
    sums = all_reduce_sum(sums.to(device)).cpu()
    out = {}
    for (n, f), total in zip(flat.items(), sums.tolist()):
        mean = total / max(1, numels[n])
        out[n] = f / mean if mean > 0 and math.isfinite(mean) else f.clone()
    return out


class _ShardCounts:
    """``score > t`` / ``score >= t`` counts per group over every rank's shards (one all-reduce per call)."""

    def __init__(self, flat: dict[str, Tensor], group_of: dict[str, int], n_groups: int,
                 all_reduce_sum: Callable[[Tensor], Tensor], device: torch.device) -> None:  # fmt: skip
        self.flat, self.group_of, self.n_groups, self.all_reduce_sum, self.device = (
            flat, group_of, n_groups, all_reduce_sum, device)  # fmt: skip

    def __call__(self, thresholds: list[float], strict: bool) -> Tensor:
        c = torch.zeros(self.n_groups, dtype=torch.int64, device=self.device)
        for n, f in self.flat.items():
            g = self.group_of[n]
            t = torch.tensor(thresholds[g], dtype=torch.float32, device=self.device)
            c[g] += torch.count_nonzero(f > t if strict else f >= t)  # (.sum() would copy to int64)
        return self.all_reduce_sum(c).cpu()

    def kth_values(self, ks: Tensor) -> list[float]:
        """Per group, the k-th largest score: the largest key t with count(score >= value(t)) >= k, by
        bisection over the ordered float32 keys within [-inf, +inf] (34 rounds)."""
        lo = [_NEG_INF_KEY] * self.n_groups
        hi = [0x7F800000] * self.n_groups
        for _ in range(34):  # the key range holds < 2**33 values
            mid = [(a + b + 1) // 2 for a, b in zip(lo, hi)]
            enough = self([_threshold(m) for m in mid], strict=False) >= ks
            lo = [m if e else a for m, a, e in zip(mid, lo, enough.tolist())]
            hi = [b if e else m - 1 for m, b, e in zip(mid, hi, enough.tolist())]
        return [_threshold(t) for t in lo]


def _tie_quotas(
    flat: dict[str, Tensor], offsets: Mapping[str, int], groups: list[list[str]], kth: list[float], need: list[int],
    all_reduce_sum: Callable[[Tensor], Tensor], rank: int, world_size: int, device: torch.device,
) -> tuple[dict[str, int], list[int]]:  # fmt: skip
    """(name -> how many of this rank's entries equal to its group's k-th value are kept, tied entries per group
    over all ranks): ties in global flat order (group order, tensor order, rank's offset), from one all-reduce
    of a ``[2, world, tensors]`` table."""
    names = list(flat)
    group_of = {n: g for g, members in enumerate(groups) for n in members}
    table = torch.zeros(2, world_size, len(names), dtype=torch.int64, device=device)
    for j, n in enumerate(names):
        table[0, rank, j] = torch.count_nonzero(flat[n] == kth[group_of[n]])
        table[1, rank, j] = offsets[n]
    table = all_reduce_sum(table).cpu()
    quota: dict[str, int] = {}
    tied: list[int] = []
    for g, members in enumerate(groups):
        left, total_tied = need[g], 0
        for n in members:
            j = names.index(n)
            total_tied += int(table[0, :, j].sum())
            for r in sorted(range(world_size), key=lambda r: (int(table[1, r, j]), r)):
                take = min(left, int(table[0, r, j]))
                if r == rank:
                    quota[n] = take
                left -= take
        tied.append(total_tied)
    return quota, tied
