import pytest
import torch

from fish_lightning.core.masking import FrozenEntryGuard, mask_gradients, pack_mask, unpack_mask


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 11)])
def test_pack_roundtrip(shape):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.6
    packed = pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (m.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), m)


def _train(opt_factory, guard: bool, steps: int = 5, clip: float | None = None):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = opt_factory([w])
    # dense "warmup" steps that build momentum for every entry
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    mask = torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) > 0.5
    before = w.detach().clone()
    g = FrozenEntryGuard(opt, {w: mask}) if guard else None
    for _ in range(steps):
        opt.zero_grad()
        (w**3).sum().backward()
        if guard:
            mask_gradients({"w": w}, {"w": mask})
        if clip:
            torch.nn.utils.clip_grad_norm_([w], clip)
        opt.step()
    if g:
        g.remove()
    return before, w.detach().clone(), mask


OPTIMIZERS = {
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 0.1])
def test_frozen_entries_bit_identical(name, clip):
    before, after, mask = _train(OPTIMIZERS[name], guard=True, clip=clip)
    assert torch.equal(after[~mask], before[~mask])
    assert not torch.equal(after[mask], before[mask])  # kept entries did train


def test_unguarded_adamw_moves_zero_grad_entries():
    # the failure the guard exists for: zero gradients alone do not freeze AdamW entries
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.01)
    for _ in range(2):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
    before = w.detach().clone()
    opt.zero_grad()
    w.grad = torch.zeros_like(w)
    opt.step()
    assert not torch.equal(w.detach(), before)


def test_kept_entries_match_unmasked_elementwise_optimizer():
    # without clipping, Adam's update of a kept entry depends only on that entry's own history
    _, guarded, mask = _train(OPTIMIZERS["adamw_wd"], guard=True)
    _, free, _ = _train(OPTIMIZERS["adamw_wd"], guard=False)
    assert torch.equal(guarded[mask], free[mask])


def test_guard_ignores_params_outside_optimizer_and_fully_kept():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([a], lr=0.1)
    g = FrozenEntryGuard(opt, {a: torch.ones(3, dtype=torch.bool), b: torch.zeros(3, dtype=torch.bool)})
    assert g.num_guarded == 0
    g.remove()
