"""Keeps frozen entries frozen through the trainer's optimizers: guards (dense masked step) or compact
optimizers (``sparse_optimizer_state``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import Tensor, nn
from torch.optim import Optimizer

from fish_lightning.core.masking import FrozenEntryGuard, mask_gradients
from fish_lightning.core.sparse_state import CompactOptimizer, zero_state_entries
from fish_lightning.masker.log import warn as rank_zero_warn


class CompactMasks(Mapping[str, Tensor]):
    """``cb.masks`` under ``sparse_optimizer_state``: name -> bool mask, rebuilt on each access from the compact
    optimizers' int32 indices (see :meth:`MaskEnforcer.mask_view`); holds no optimizer and no byte per candidate.
    """

    def __init__(self, builders: dict[str, Callable[[], Tensor]], rest: dict[str, Tensor], names: list[str]) -> None:
        self._builders, self._rest, self._names = builders, rest, names

    def __getitem__(self, name: str) -> Tensor:
        if name in self._rest:
            return self._rest[name]
        return self._builders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class MaskEnforcer:
    """Frozen-entry enforcement over a list of optimizers.

    Dense (``sparse=False``): frozen gradients are zeroed and a :class:`FrozenEntryGuard` per optimizer writes the
    frozen entries back after every step. Sparse: each optimizer is rewired to train compact tensors of the kept
    entries (:class:`CompactOptimizer`).
    """

    def __init__(self, sparse: bool) -> None:
        self.sparse = sparse
        self.guards: list[FrozenEntryGuard] = []
        self.compact: list[CompactOptimizer] = []
        self._optimizers: list[Optimizer] = []
        self._layouts: list[tuple] = []  # each optimizer's param groups (parameter ids) as installed
        self._params: Mapping[str, nn.Parameter] = {}
        self._handles: list = []  # load_state_dict pre-hooks (sparse)
        self._view: Mapping[str, Tensor] = {}  # sparse: the masks, rebuilt from the compact optimizers' indices

    @property
    def installed(self) -> bool:
        return bool(self.guards or self.compact)

    def covers(self, optimizers: Sequence[Optimizer]) -> bool:
        """Installed on exactly these optimizer objects."""
        return self.installed and len(optimizers) == len(self._optimizers) and all(
            a is b for a, b in zip(optimizers, self._optimizers)
        )

    def install(
        self, optimizers: Sequence[Optimizer], params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]
    ) -> None:
        """Enforce ``masks`` on ``optimizers`` (replacing what was installed before)."""
        self.remove()
        by_param = {params[n]: m for n, m in masks.items()}
        self._optimizers, self._params = list(optimizers), params
        if self.sparse:
            self.compact = [CompactOptimizer(opt, by_param) for opt in optimizers]
            self._view = self.mask_view(params, masks)
            self._layouts = [layout(opt) for opt in optimizers]
            self._handles = [opt.register_load_state_dict_pre_hook(self._before_state_load) for opt in optimizers]
            return
        self.guards = [FrozenEntryGuard(opt, by_param, snapshot_in_pre_hook=False) for opt in optimizers]
        self._layouts = [layout(opt) for opt in optimizers]
        covered = sum(g.num_guarded for g in self.guards)
        partial = sum(1 for m in masks.values() if not bool(m.all()))
        if covered < partial:
            rank_zero_warn(
                f"FISH: {partial - covered} masked tensors are in no optimizer of this trainer; they are not guarded"
            )

    def intact(self) -> bool:
        """The optimizers' param groups still hold exactly the parameters they held when the mask was installed
        (another callback, e.g. ``BaseFinetuning``, may rebuild them). Cheap: parameter ids only."""
        return all(layout(opt) == lay for opt, lay in zip(self._optimizers, self._layouts))

    def repair(self, masks: Mapping[str, Tensor]) -> None:
        """Re-enforce ``masks`` after the param groups were rebuilt. Dense: the guards follow the new groups.
        Compact: only before the optimizer state is loaded (a resume; see :meth:`_before_state_load`): during
        training the compact tensors' state would be lost, so it is refused."""
        if self.sparse:
            raise RuntimeError(
                "FISH: the optimizer's param groups were rebuilt during training (another callback or the "
                "LightningModule replaced its parameters) after sparse_optimizer_state compacted them; the kept "
                "entries' optimizer state would be lost. Use sparse_optimizer_state=False with such a callback"
            )
        self.install(self._optimizers, self._params, masks)

    def _before_state_load(self, optimizer: Optimizer, state_dict: dict) -> None:
        """A resume: another callback's ``on_fit_start`` (``BaseFinetuning``) may have put the dense parameters
        back into the groups after the compact ones were installed; compact them again before the checkpoint's
        (compact) state is loaded into them by position."""
        if self.compact and not self.intact():
            masks = {n: m.clone() for n, m in self._view.items()}
            optimizers, params = self._optimizers, self._params
            self.remove()
            self.install(optimizers, params, masks)

    def untrained(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> list[str]:
        """Names with kept entries that no installed optimizer trains (their parameter, or its compact tensor,
        is in none of the param groups)."""
        if not self.installed:
            return []
        held = {id(p) for opt in self._optimizers for g in opt.param_groups for p in g["params"]}
        for comp in self.compact:  # a compacted parameter trains through its compact tensor only
            for p, c in comp.compacted:
                held.discard(id(p))
                if id(c) in held:
                    held.add(id(p))
        return [n for n, m in masks.items() if id(params[n]) not in held and bool(m.any())]

    def mask_view(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """With compact optimizers: ``masks`` as a read-only view that rebuilds each bool mask from the compact
        int32 indices on access (no byte per candidate kept; masks of parameters in no optimizer stay as given).
        Dense: ``masks`` itself (the guards and the gradient masking use them every step)."""
        if not self.compact:
            return masks
        by_id: dict[int, Callable[[], Tensor]] = {}
        for c in self.compact:
            by_id.update(c.mask_builders())
        builders = {n: by_id[id(params[n])] for n in masks if id(params[n]) in by_id}
        return CompactMasks(builders, {n: m for n, m in masks.items() if n not in builders}, list(masks))

    def after_backward(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
        """Right after each backward, before anything (the user's ``clip_gradients`` under manual optimization,
        Lightning's clipping) reads the gradients: compact gradients gathered (added up over accumulated
        backwards), or frozen gradients zeroed (they then drop out of the clip norm)."""
        if self.compact:
            for c in self.compact:
                c.gather_grads()
        elif self.guards:
            mask_gradients(params, masks)

    def before_step(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
        """Right before the optimizer step: the same for gradients that arrived without a Lightning backward,
        and the guarded tensors snapshot (once per step; now, not in the step pre-hook that precedes the
        closure, so the copy is not held through forward and backward)."""
        self.after_backward(params, masks)
        for g in self.guards:
            g.snapshot()

    def reselect(
        self, optimizers: Sequence[Optimizer], params: Mapping[str, nn.Parameter], old: Mapping[str, Tensor],
        new: Mapping[str, Tensor],
    ) -> None:  # fmt: skip
        """Move to a re-selected mask: back to dense parameters (kept entries' state scattered back), newly kept
        entries start with zero optimizer state, then enforce ``new``."""
        for c in self.compact:
            c.expand()
        self.compact = []
        self.remove()
        for n, m in new.items():
            newly = m & ~old[n]
            for opt in optimizers:
                zero_state_entries(opt, params[n], newly)
        self.install(optimizers, params, new)

    def remove(self) -> None:
        """Detach every hook (the compact optimizers stay rewired: their state is what a checkpoint holds)."""
        for g in self.guards:
            g.remove()
        for c in self.compact:
            c.remove()
        for h in self._handles:
            h.remove()
        self.guards, self.compact, self._optimizers, self._layouts, self._handles = [], [], [], [], []


def layout(optimizer: Optimizer) -> tuple[tuple[int, ...], ...]:
    """An optimizer's param groups as parameter ids."""
    return tuple(tuple(id(p) for p in g["params"]) for g in optimizer.param_groups)
