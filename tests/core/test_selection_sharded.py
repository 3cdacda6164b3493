"""select_masks (bisection, no concatenation) and select_masks_sharded (ranks simulated by threads) keep
exactly the entries topk_mask keeps on the concatenated scores."""

import threading
import warnings

import pytest
import torch

from fish_lightning.core.selection import TieWarning, num_kept, select_masks, select_masks_sharded, topk_mask


class ThreadGroup:
    """An all-reduce (sum) over ``world`` threads: each calls ``all_reduce_sum(t)`` in lockstep."""

    def __init__(self, world: int) -> None:
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world
        self.calls = 0

    def fn(self, rank: int):
        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = sum(self.slots[1:], self.slots[0].clone())
            if rank == 0:
                self.calls += 1
            self.barrier.wait()
            return out

        return all_reduce_sum


def run_sharded(full: dict[str, torch.Tensor], world: int, sparsity: float, scope: str, replicated=()):
    """Shard every tensor on dim 0 like FSDP2 (torch.chunk: uneven, maybe empty), select per rank,
    stitch the local masks back together; ``replicated`` tensors sit whole on rank 0 only."""
    group, out, errors = ThreadGroup(world), [None] * world, []

    def rank_fn(rank: int) -> None:
        try:
            scores, offsets = {}, {}
            for n, t in full.items():
                if n in replicated:
                    scores[n] = t.reshape(-1) if rank == 0 else t.reshape(-1)[:0]
                    offsets[n] = 0 if rank == 0 else t.numel()
                    continue
                chunks = list(torch.chunk(t, world, dim=0)) if t.shape[0] else []
                chunks += [t[:0]] * (world - len(chunks))
                row = t[0].numel() if t.dim() > 1 else 1
                scores[n] = chunks[rank]
                offsets[n] = sum(c.shape[0] for c in chunks[:rank]) * row
            out[rank] = select_masks_sharded(scores, {n: t.numel() for n, t in full.items()}, offsets,
                                             sparsity, group.fn(rank), rank, world, scope=scope)  # fmt: skip
        except Exception as err:  # surfaced in the main thread
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_fn, args=(r,)) for r in range(world)]
    with warnings.catch_warnings(record=True) as caught:  # process-wide: sees every thread's warnings
        warnings.simplefilter("always")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    stitched = {}
    for n, t in full.items():
        if n in replicated:
            stitched[n] = out[0][n].reshape(t.shape)
        else:
            stitched[n] = torch.cat([out[r][n].reshape(-1) for r in range(world)]).reshape(t.shape)
    return stitched, [w.category for w in caught], group.calls


def reference(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """The oracle: topk_mask (kthvalue + lowest-index ties) on the concatenation, or per tensor."""
    if scope == "per_tensor":
        return {n: topk_mask(t.reshape(-1).float(), num_kept(t.numel(), sparsity))[0].view(t.shape)
                for n, t in scores.items()}  # fmt: skip
    flat = torch.cat([t.reshape(-1).float() for t in scores.values()])
    mask, _ = topk_mask(flat, num_kept(flat.numel(), sparsity))
    out, offset = {}, 0
    for n, t in scores.items():
        out[n] = mask[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
    return out


def scores_with_ties(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.zeros(7, 5),  # LoRA A before any update: all tied at 0
        "b": torch.rand(5, 3, generator=g).round(decimals=1),  # many ties
        "c": torch.rand(11, generator=g),
        "d": -torch.rand(1, 4, generator=g),  # negative scores (reverse selection), one row: empty shards
    }


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.97])
def test_sharded_selection_equals_gathered(scope, world, sparsity):
    full = scores_with_ties(world)
    expected = reference(full, sparsity, scope)
    got, _, _ = run_sharded(full, world, sparsity, scope)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TieWarning)
        single = select_masks(full, sparsity, scope)
    for n in full:
        assert torch.equal(got[n], expected[n]), (n, got[n], expected[n])
        assert torch.equal(single[n], expected[n]), n
    if scope == "global":
        assert sum(int(m.sum()) for m in got.values()) == round((1 - sparsity) * sum(t.numel() for t in full.values()))


def test_sharded_selection_negative_zero_ties_with_zero_and_replicated_tensors():
    full = {"x": torch.tensor([[0.0, -0.0], [1.0, -0.0], [0.0, 2.0]]), "head": torch.tensor([0.0, 3.0, -0.0])}
    expected = reference(full, 0.5, "global")
    got, _, _ = run_sharded(full, 2, 0.5, "global", replicated={"head"})
    for n in full:
        assert torch.equal(got[n], expected[n]), n


def test_sharded_selection_warns_on_every_rank_about_ties_and_uses_few_collectives():
    full = scores_with_ties(0)
    _, caught, calls = run_sharded(full, 2, 0.5, "global")  # the cut falls inside the zeros of "a"
    assert caught.count(TieWarning) == 2  # one per rank
    assert calls <= 40  # bisection (33) + NaN check + tie count + tie table


def test_sharded_selection_rejects_nan_on_every_rank():
    full = {"x": torch.tensor([[1.0, float("nan")], [0.5, 0.2]])}
    with pytest.raises(ValueError, match="NaN"):
        run_sharded(full, 2, 0.5, "global")


@pytest.mark.parametrize("seed", range(6))
def test_select_masks_matches_topk_on_wide_ranges_infinities_and_half_precision(seed):
    g = torch.Generator().manual_seed(seed)
    scores = {
        "tiny": torch.rand(9, 7, generator=g) * 1e-30,  # subnormal-adjacent magnitudes
        "big": torch.randn(13, generator=g) * 1e30,
        "inf": torch.tensor([float("inf"), -float("inf"), 0.0, 5.0]),
        "half": (torch.randn(4, 6, generator=g) * 3).half(),  # ties after rounding to fp16
        "rep": torch.randint(0, 3, (20,), generator=g).float(),
    }
    for sparsity in (0.1, 0.5, 0.9):
        for scope in ("global", "per_tensor"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TieWarning)
                got = select_masks(scores, sparsity, scope)
            expected = reference(scores, sparsity, scope)
            for n in scores:
                assert torch.equal(got[n], expected[n]), (seed, sparsity, scope, n)


def normalized_reference(full, sparsity):
    """The oracle over each tensor's scores divided by its mean |score| (the definition of scope='normalized')."""
    norm = {n: t.float() / t.float().abs().mean() if bool(t.abs().sum()) else t.float() for n, t in full.items()}
    return reference(norm, sparsity, "global")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_normalized_scope_is_scale_aware_and_exact(world):
    g = torch.Generator().manual_seed(3)
    full = {"A": torch.rand(7, 5, generator=g) * 1e-4, "B": torch.rand(9, 4, generator=g), "zero": torch.zeros(4, 2)}
    glob = select_masks(full, 0.8, "global", warn_ties=False)
    assert int(glob["A"].sum()) == 0  # raw global top-k starves the small-gradient tensor
    ref = normalized_reference(full, 0.8)
    single = select_masks(full, 0.8, "normalized", warn_ties=False)
    for masks in (single, run_sharded(full, world, 0.8, "normalized")[0]):
        assert sum(int(m.sum()) for m in masks.values()) == num_kept(sum(t.numel() for t in full.values()), 0.8)
        assert int(masks["A"].sum()) > 0
        for n in full:
            assert torch.equal(masks[n], ref[n]), n
