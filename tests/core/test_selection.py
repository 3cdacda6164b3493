import pytest
import torch

from fish_lightning.core.selection import (
    TieWarning,
    density_report,
    num_kept,
    select_masks,
    selection_scores,
    topk_mask,
)


def test_num_kept_rounds_and_validates():
    assert num_kept(1000, 0.9) == 100
    assert num_kept(10, 0.0) == 10
    assert num_kept(7, 0.5) == 4  # round(3.5) -> 4 (half to even)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"sparsity={bad}"):
            num_kept(10, bad)


@pytest.mark.parametrize("k", [0, 1, 5, 37, 100])
def test_topk_mask_exact_k_and_largest(k):
    s = torch.randn(100, generator=torch.Generator().manual_seed(1))
    m, ties = topk_mask(s, k)
    assert int(m.sum()) == k and ties == 0
    if 0 < k < 100:
        assert s[m].min() > s[~m].max()


def test_ties_broken_by_lowest_index_and_reported():
    s = torch.tensor([0.0, 5.0, 0.0, 0.0, 3.0, 0.0])
    m, ties = topk_mask(s, 4)
    assert m.tolist() == [True, True, True, False, True, False]
    assert ties == 4  # four zeros competing for two slots


def test_all_zero_scores_keep_exactly_k_with_warning():
    # LoRA's A before any update: every score is 0; a `>= kth` threshold would keep everything.
    scores = {"A": torch.zeros(8, 4), "B": torch.zeros(4, 8)}
    with pytest.warns(TieWarning, match="64 of 64 entries share the score"):
        masks = select_masks(scores, sparsity=0.75)
    assert sum(int(m.sum()) for m in masks.values()) == 16
    flat_a = masks["A"].reshape(-1)
    assert flat_a[:16].all() and not flat_a[16:].any() and not masks["B"].any()  # lowest global index first


def test_global_vs_per_tensor():
    scores = {"big": torch.full((10,), 10.0) + torch.arange(10.0), "small": torch.arange(10.0)}
    g = select_masks(scores, sparsity=0.5, scope="global")
    assert int(g["big"].sum()) == 10 and int(g["small"].sum()) == 0
    p = select_masks(scores, sparsity=0.5, scope="per_tensor")
    assert int(p["big"].sum()) == 5 and int(p["small"].sum()) == 5
    assert p["small"][5:].all()


def test_sparsity_zero_keeps_everything():
    scores = {"a": torch.randn(3, 3), "b": torch.zeros(5)}
    masks = select_masks(scores, 0.0)
    assert all(m.all() for m in masks.values())


def test_bad_scope_and_selection_named():
    with pytest.raises(ValueError, match="scope='layer'.*global"):
        select_masks({"a": torch.ones(2)}, 0.5, scope="layer")
    with pytest.raises(ValueError, match="selection='best'.*fisher"):
        selection_scores("best", None, {"a": torch.ones(2)})


def test_nan_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([1.0, float("nan"), 2.0]), 1)


def test_selection_rules():
    params = {"w": torch.tensor([[-3.0, 1.0], [0.5, 2.0]])}
    fisher = {"w": torch.tensor([[1.0, 4.0], [2.0, 3.0]])}
    keep = lambda sel: select_masks(selection_scores(sel, fisher, params, seed=0), 0.5)["w"]  # noqa: E731
    assert keep("fisher").tolist() == [[False, True], [False, True]]
    assert keep("reverse").tolist() == [[True, False], [True, False]]
    assert keep("magnitude").tolist() == [[True, False], [False, True]]
    r1, r2 = keep("random"), keep("random")
    assert torch.equal(r1, r2) and int(r1.sum()) == 2
    other = select_masks(selection_scores("random", None, {"w": torch.zeros(100)}, seed=1), 0.5)["w"]
    same = select_masks(selection_scores("random", None, {"w": torch.zeros(100)}, seed=0), 0.5)["w"]
    assert not torch.equal(other, same)
    with pytest.raises(ValueError, match="needs a Fisher"):
        selection_scores("fisher", None, params)


def test_density_report():
    d = density_report({"a": torch.tensor([True, False]), "b": torch.tensor([True, True])})
    assert d == {"a": 0.5, "b": 1.0, "__total__": 0.75}
