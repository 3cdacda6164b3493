"""Keeps frozen entries frozen through the trainer's optimizers: guards (dense masked step) or compact
optimizers (``sparse_optimizer_state``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
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


class Enforcer(ABC):
    """Frozen-entry enforcement over a list of optimizers: what both enforcers share (which optimizers, their
    param-group layouts as installed, the check that another callback did not rebuild them). Build one with
    :func:`MaskEnforcer`; :class:`DenseGuard` and :class:`CompactState` are the two kinds."""

    sparse = False

    def __init__(self) -> None:
        self._optimizers: list[Optimizer] = []
        self._layouts: list[tuple] = []  # each optimizer's param groups (parameter ids) as installed
        self._params: Mapping[str, nn.Parameter] = {}

    @property
    def installed(self) -> bool:
        return bool(self._optimizers)

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
        self._optimizers, self._params = list(optimizers), params
        self._install({params[n]: m for n, m in masks.items()}, masks)
        self._layouts = [layout(opt) for opt in optimizers]

    def intact(self) -> bool:
        """The optimizers' param groups still hold exactly the parameters they held when the mask was installed
        (another callback, e.g. ``BaseFinetuning``, may rebuild them). Cheap: parameter ids only."""
        return all(layout(opt) == lay for opt, lay in zip(self._optimizers, self._layouts))

    def untrained(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> list[str]:
        """Names with kept entries that no installed optimizer trains (their parameter, or its compact tensor,
        is in none of the param groups)."""
        if not self.installed:
            return []
        held = self._held({id(p) for opt in self._optimizers for g in opt.param_groups for p in g["params"]})
        return [n for n, m in masks.items() if id(params[n]) not in held and bool(m.any())]

    def mask_view(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The masks as the masker exposes them while this enforcer holds them."""
        return masks

    def before_step(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
        """Right before the optimizer step: the same as :meth:`after_backward`, for gradients that arrived without
        a Lightning backward."""
        self.after_backward(params, masks)

    def reselect(
        self, optimizers: Sequence[Optimizer], params: Mapping[str, nn.Parameter], old: Mapping[str, Tensor],
        new: Mapping[str, Tensor],
    ) -> None:  # fmt: skip
        """Move to a re-selected mask: back to dense parameters, newly kept entries start with zero optimizer
        state, then enforce ``new``."""
        self._to_dense()
        self.remove()
        for n, m in new.items():
            newly = m & ~old[n]
            for opt in optimizers:
                zero_state_entries(opt, params[n], newly)
        self.install(optimizers, params, new)

    def remove(self) -> None:
        """Detach every hook."""
        self._optimizers, self._layouts = [], []

    # what each kind does
    @abstractmethod
    def _install(self, by_param: dict[nn.Parameter, Tensor], masks: Mapping[str, Tensor]) -> None:
        """Enforce ``by_param`` (parameter -> mask) on the optimizers in ``self._optimizers``."""

    def _held(self, ids: set[int]) -> set[int]:
        return ids

    def _to_dense(self) -> None:  # noqa: B027 (nothing to undo by default: the dense guard trains in place)
        """Put the optimizers back on the dense parameters before a re-selection."""

    @abstractmethod
    def repair(self, masks: Mapping[str, Tensor]) -> None:
        """Enforce again on optimizers whose param groups another callback rebuilt."""

    @abstractmethod
    def after_backward(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
        """Right after a backward, before anyone reads the gradients."""


class DenseGuard(Enforcer):
    """The dense masked step: frozen gradients are zeroed right after each backward and a
    :class:`FrozenEntryGuard` per optimizer writes the frozen entries back after every step (any optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.guards: list[FrozenEntryGuard] = []

    def _install(self, by_param: dict[nn.Parameter, Tensor], masks: Mapping[str, Tensor]) -> None:
        self.guards = [FrozenEntryGuard(opt, by_param, snapshot_in_pre_hook=False) for opt in self._optimizers]
        covered = sum(g.num_guarded for g in self.guards)
        partial = sum(1 for m in masks.values() if not bool(m.all()))
        if covered < partial:
            rank_zero_warn(
                f"FISH: {partial - covered} masked tensors are in no optimizer of this trainer; they are not guarded"
            )

    def repair(self, masks: Mapping[str, Tensor]) -> None:
        """Re-enforce ``masks`` after the param groups were rebuilt: the guards follow the new groups."""
        self.install(self._optimizers, self._params, masks)

    def after_backward(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
        """Right after each backward, before anything (the user's ``clip_gradients``, Lightning's clipping) reads
        the gradients: frozen gradients zeroed (they then drop out of the clip norm)."""
        if self.guards:
            mask_gradients(params, masks)

    def before_step(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
        """Also snapshot the guarded tensors, once per step (now, not in the step pre-hook that precedes the
        closure, so the copy is not held through forward and backward)."""
        super().before_step(params, masks)
        for g in self.guards:
            g.snapshot()

    def remove(self) -> None:
        for g in self.guards:
            g.remove()
        self.guards = []
        super().remove()


class CompactState(Enforcer):
    """``sparse_optimizer_state``: each optimizer is rewired to train compact tensors of the kept entries
    (:class:`CompactOptimizer`), so its state holds the kept entries only; the masks are a view rebuilt from the
    compact int32 indices."""

    sparse = True

    def __init__(self) -> None:
        super().__init__()
        self.compact: list[CompactOptimizer] = []
        self._handles: list = []  # load_state_dict pre-hooks
        self._view: Mapping[str, Tensor] = {}

    def _install(self, by_param: dict[nn.Parameter, Tensor], masks: Mapping[str, Tensor]) -> None:
        self.compact = [CompactOptimizer(opt, by_param) for opt in self._optimizers]
        self._view = self.mask_view(self._params, masks)
        self._handles = [opt.register_load_state_dict_pre_hook(self._before_state_load) for opt in self._optimizers]

    def repair(self, masks: Mapping[str, Tensor]) -> None:
        """Refused during training (only before the optimizer state is loaded, see :meth:`_before_state_load`): the
        compact tensors' state would be lost."""
        raise RuntimeError(
            "FISH: the optimizer's param groups were rebuilt during training (another callback or the "
            "LightningModule replaced its parameters) after sparse_optimizer_state compacted them; the kept "
            "entries' optimizer state would be lost. Use sparse_optimizer_state=False with such a callback"
        )

    def _before_state_load(self, optimizer: Optimizer, state_dict: dict) -> None:
        """A resume: another callback's ``on_fit_start`` (``BaseFinetuning``) may have put the dense parameters
        back into the groups after the compact ones were installed; compact them again before the checkpoint's
        (compact) state is loaded into them by position."""
        if self.compact and not self.intact():
            masks = {n: m.clone() for n, m in self._view.items()}
            optimizers, params = self._optimizers, self._params
            self.remove()
            self.install(optimizers, params, masks)

    def _held(self, ids: set[int]) -> set[int]:
        for comp in self.compact:  # a compacted parameter trains through its compact tensor only
            for p, c in comp.compacted:
                ids.discard(id(p))
                if id(c) in ids:
                    ids.add(id(p))
        return ids

    def mask_view(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """``masks`` as a read-only view that rebuilds each bool mask from the compact int32 indices on access (no
        byte per candidate kept; masks of parameters in no optimizer stay as given)."""
        if not self.compact:
            return masks
        by_id: dict[int, Callable[[], Tensor]] = {}
        for c in self.compact:
            by_id.update(c.mask_builders())
        builders = {n: by_id[id(params[n])] for n in masks if id(params[n]) in by_id}
        return CompactMasks(builders, {n: m for n, m in masks.items() if n not in builders}, list(masks))

    def gather_grads(self) -> None:
        """Compact gradients gathered from the dense ones (added up over accumulated backwards)."""
        for c in self.compact:
            c.gather_grads()

    def after_backward(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
        """Right after each backward, before anything reads the gradients: the compact gradients gathered."""
        self.gather_grads()

    def _to_dense(self) -> None:
        """Back to dense parameters, the kept entries' state scattered back."""
        for c in self.compact:
            c.expand()
        self.compact = []

    def remove(self) -> None:
        """Detach every hook (the compact optimizers stay rewired: their state is what a checkpoint holds)."""
        for c in self.compact:
            c.remove()
        for h in self._handles:
            h.remove()
        self.compact, self._handles = [], []
        super().remove()


def MaskEnforcer(sparse: bool) -> Enforcer:  # noqa: N802 (a factory named for what it builds)
    """The enforcer of ``sparse_optimizer_state=sparse``: :class:`CompactState` or :class:`DenseGuard`."""
    return CompactState() if sparse else DenseGuard()


def layout(optimizer: Optimizer) -> tuple[tuple[int, ...], ...]:
    """An optimizer's param groups as parameter ids."""
    return tuple(tuple(id(p) for p in g["params"]) for g in optimizer.param_groups)
