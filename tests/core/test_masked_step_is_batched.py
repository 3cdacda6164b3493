"""Batched masking (core/flat.py): the same results as the per-tensor reference, bit for bit, with an aten op
count per step that does not grow with the number of tensors; int32 indices, no bool masks kept."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fish_lightning.core import flat
from fish_lightning.core.masking import FrozenEntryGuard, mask_gradients
from fish_lightning.core.sparse_state import CompactOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(6, 4), (5,), (3, 2, 7), (1,), (8, 8), (2, 3)]


def _tensors(n=None, density=0.3, seed=0, dtype=torch.float32):
    n = len(SHAPES) if n is None else n
    gen = torch.Generator().manual_seed(seed)
    shapes = [SHAPES[i % len(SHAPES)] for i in range(n)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    masks = [torch.rand(s, generator=gen) < density for s in shapes]
    masks[0][:] = True  # fully kept: left alone
    if n > 2:
        masks[2][:] = False  # fully frozen
    return ps, masks


def _top_level_ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.7, 0.97])
@pytest.mark.parametrize("group_entries", [None, 40])
def test_mask_gradients_equals_masked_fill(density, group_entries, monkeypatch):
    if group_entries:
        monkeypatch.setattr(flat, "GROUP_ENTRIES", group_entries)  # several groups, some one tensor large
    flat.clear_cache()
    ps, masks = _tensors(density=density)
    grads = [torch.randn(p.shape) for p in ps]
    grads[1][0] = float("inf")
    grads[3][0] = float("nan")
    grads[4][0, 0] = float("-inf")
    grads[4] = grads[4].t().contiguous().t()  # a non-contiguous gradient
    expect = [g.masked_fill(~m, 0.0) for g, m in zip(grads, masks)]
    for p, g in zip(ps, grads):
        p.grad = g
    mask_gradients({str(i): p for i, p in enumerate(ps)}, {str(i): m for i, m in enumerate(masks)})
    for p, e in zip(ps, expect):
        assert torch.equal(p.grad.view(torch.int32), e.view(torch.int32))  # bits: +0.0, inf and NaN as expected


def test_mask_gradients_skips_params_without_grad_and_mixed_dtypes():
    flat.clear_cache()
    ps, masks = _tensors()
    ps[4] = torch.nn.Parameter(ps[4].detach().double())
    ps[5] = torch.nn.Parameter(ps[5].detach().bfloat16())
    ps[4].grad = torch.randn(8, 8, dtype=torch.float64)
    ps[5].grad = torch.randn(2, 3).to(torch.bfloat16)
    expect = {i: ps[i].grad.masked_fill(~masks[i], 0) for i in (4, 5)}
    mask_gradients({str(i): p for i, p in enumerate(ps)}, {str(i): m for i, m in enumerate(masks)})
    for i, e in expect.items():
        assert torch.equal(ps[i].grad, e)
    assert all(ps[i].grad is None for i in (0, 1, 2, 3))


def test_mask_gradients_again_after_an_in_place_change():
    flat.clear_cache()
    ps, masks = _tensors()
    params, ms = {str(i): p for i, p in enumerate(ps)}, {str(i): m for i, m in enumerate(masks)}
    for p in ps:
        p.grad = torch.ones(p.shape)
    mask_gradients(params, ms)
    for p in ps:
        p.grad.fill_(2.0)  # in place: the version counter moves, so the next call masks again
    mask_gradients(params, ms)
    for p, m in zip(ps, masks):
        assert torch.equal(p.grad, torch.where(m, 2.0, 0.0))
    masks[1].logical_not_()  # a mask changed in place makes a new plan
    mask_gradients(params, ms)
    assert not ps[1].grad.any()


def test_mask_gradients_op_count_does_not_grow_with_tensors():
    counts = []
    for n in (6, 60):
        flat.clear_cache()
        ps, masks = _tensors(n)
        params, ms = {str(i): p for i, p in enumerate(ps)}, {str(i): m for i, m in enumerate(masks)}

        for _ in range(2):  # the first call makes the plan; the second is counted
            for p in ps:
                p.grad = torch.randn(p.shape)
            if _:
                counts.append(_top_level_ops(lambda params=params, ms=ms: mask_gradients(params, ms)))
            else:
                mask_gradients(params, ms)
    assert counts[0] == counts[1] <= 8


def _guarded_run(factory, n, density, steps=3, group_entries=None, dtype=torch.float32):
    ps, masks = _tensors(n, density, dtype=dtype)
    opt = factory(ps)
    for _ in range(2):  # dense warmup: momentum everywhere
        opt.zero_grad()
        sum((p.float() ** 2).sum() for p in ps).backward()
        opt.step()
    before = [p.detach().clone() for p in ps]
    guard = FrozenEntryGuard(opt, dict(zip(ps, masks)), snapshot_in_pre_hook=False)
    ops = []
    for _ in range(steps):
        opt.zero_grad()
        sum((p.float() ** 3).sum() for p in ps).backward()
        mask_gradients({str(i): p for i, p in enumerate(ps)}, {str(i): m for i, m in enumerate(masks)})
        ops.append(_top_level_ops(guard.snapshot))
        opt.step()
    guard.remove()
    return before, [p.detach().clone() for p in ps], masks, guard, ops


@pytest.mark.parametrize("density", [0.1, 0.8])
@pytest.mark.parametrize("group_entries", [None, 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guard_frozen_bit_identical_kept_trained(density, group_entries, dtype, monkeypatch):
    if group_entries:
        monkeypatch.setattr(flat, "GROUP_ENTRIES", group_entries)
    adamw = lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1)  # noqa: E731
    before, after, masks, guard, _ = _guarded_run(adamw, 12, density, dtype=dtype)
    assert guard.num_guarded == sum(1 for m in masks if not m.all()) < 12  # fully kept tensors are not guarded
    for b, a, m in zip(before, after, masks):
        assert torch.equal(a[~m].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           b[~m].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # fmt: skip
        if m.any():
            assert not torch.equal(a[m], b[m])
    # kept entries got exactly AdamW's update (it is elementwise): the same as unmasked AdamW's
    ps, masks2 = _tensors(12, density, dtype=dtype)
    opt = adamw(ps)
    for step in range(5):
        opt.zero_grad()
        sum((p.float() ** (2 if step < 2 else 3)).sum() for p in ps).backward()
        opt.step()
    for a, p, m in zip(after, ps, masks):
        assert torch.equal(a[m], p.detach()[m])


def test_guard_index_is_int32_of_the_smaller_side_and_ops_do_not_grow():
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    *_, g_sparse, ops_small = _guarded_run(sgd, 12, 0.05)
    *_, g_dense, _ = _guarded_run(sgd, 12, 0.95)
    *_, _, ops_large = _guarded_run(sgd, 120, 0.05)
    for g in (g_sparse, g_dense):
        assert all(grp.idx.dtype == torch.int32 for grp in g._groups)
    assert g_sparse._groups[0].kept and not g_dense._groups[0].kept
    assert g_sparse.index_bytes < 4 * 0.2 * sum(p.numel() for p in g_sparse._params)
    assert ops_small == ops_large  # the snapshot: one op per group, however many tensors


def test_guard_snapshot_is_kept_until_the_post_hook():
    ps, masks = _tensors(4)
    opt = torch.optim.SGD(ps, lr=1.0)
    guard = FrozenEntryGuard(opt, dict(zip(ps, masks)), snapshot_in_pre_hook=False)
    before = [p.detach().clone() for p in ps]
    guard.snapshot()
    with torch.no_grad():
        for p in ps:
            p.add_(1.0)  # moved after the snapshot (LBFGS evaluates at moved points)
    guard.snapshot()  # a second snapshot in the same step keeps the first copy
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    for b, p, m in zip(before, ps, masks):
        assert torch.equal(p.detach()[~m], b[~m]) and torch.equal(p.detach()[m], b[m] + 1.0)
    with pytest.raises(RuntimeError, match="without a snapshot"):
        opt.step()
    guard.remove()


@pytest.mark.parametrize("group_entries", [None, 30])
def test_compact_optimizer_batched_matches_reference(group_entries, monkeypatch):
    if group_entries:
        monkeypatch.setattr(flat, "GROUP_ENTRIES", group_entries)
    ps, masks = _tensors(12, 0.2)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt, ref_opt = torch.optim.AdamW(ps, lr=0.1), torch.optim.AdamW(ref, lr=0.1)
    comp = CompactOptimizer(opt, dict(zip(ps, masks)))
    assert all(grp.idx.dtype == torch.int32 and grp.kept for grp in comp._groups)
    assert comp.index_bytes == 4 * sum(int(m.sum()) for m in masks[1:] if m.any())
    rebuilt = comp.masks()
    assert all(torch.equal(rebuilt[p], m) for p, m in zip(ps, masks))
    for _ in range(3):
        for _accumulate in range(2):  # two backwards per step: the compact gradients add up
            sum((p**3).sum() for p in ps).backward()
            comp.gather_grads()
            sum((p**3).sum() for p in ref).backward()
        for p, m in zip(ref, masks):
            p.grad.masked_fill_(~m, 0)
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        with torch.no_grad():  # the reference: dense AdamW with masked gradients, frozen entries rewound
            for p, q, m in zip(ref, ps, masks):
                p[~m] = q.detach()[~m]
    for p, q in zip(ps, ref):
        assert torch.allclose(p.detach(), q.detach(), rtol=0, atol=1e-6)
    for (_, idx, _c), m in zip(comp.pairs, [m for m in masks if not m.all() and m.any()]):
        assert idx.dtype == torch.int32 and torch.equal(idx.long(), m.reshape(-1).nonzero().squeeze(1))
    comp.expand()
