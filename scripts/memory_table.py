"""FISH memory for LLaMA-2-7B + LoRA r=16 on every linear layer, counted from the parameter shapes.

Builds the architecture from its config values on the ``meta`` device (no weights, no download),
adds LoRA with peft (q/k/v/o/gate/up/down projections), takes FISH's default candidates
(:func:`fish_lightning.core.candidates.find_candidates`: every LoRA A/B matrix) and counts, per
candidate entry, what :class:`~fish_lightning.FisherMaskCallback` allocates (see
``callback.py``/``fisher.py``/``sparse_state.py``):

* warmup: ``cb.fisher``, one fp32 accumulator per candidate. With ``fisher_estimator="per_example"``
  (the default) the hooks add the squares straight into it (``attach(into=cb.fisher)``: no second
  buffer). Under FSDP2 ``cb.fisher`` is shard-shaped; each module call in the backward builds the
  whole-shaped fp32 sum of its own candidates, reduce-scatters it at once (mean over ranks) into the
  rank's shard and frees it (``attach(scatter=...)``): one call's candidates at a time, whole-shaped;
* after the freeze: ``cb.masks``, one bool (1 byte) per candidate; checkpoints bit-pack them
  (``pack_mask``: ``ceil(numel / 8)`` bytes per tensor);
* AdamW: ``exp_avg`` + ``exp_avg_sq`` in fp32 per trained entry (plus a 4-byte ``step`` per tensor);
  with ``sparse_optimizer_state=True`` only kept entries have state, plus their int32 indices
  (``CompactOptimizer``: no bool mask of its own) and the compact fp32 copy of their values;
* the dense masked step's indices: ``mask_gradients`` and ``FrozenEntryGuard`` each keep an int32
  index of the kept or the frozen entries, whichever are fewer (``core/flat.py``), not a bool mask.

``--measure-freeze`` also measures, on CPU, the peak of the bytes torch allocates during the
selection the callback runs at the freeze (``selection_scores`` + global ``select_masks``) on a random
Fisher of these shapes: every allocation and free of torch's CPU allocator is recorded by
``torch.profiler`` (``profile_memory=True``) and replayed in time order.

    python scripts/memory_table.py [--out docs/memory_7b.md] [--measure-freeze]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fish_lightning.core.candidates import find_candidates
from fish_lightning.core.flat import GROUP_ENTRIES
from fish_lightning.core.selection import num_kept
from fish_lightning.masker.collectives import REDUCE_BUCKET_ENTRIES

#: LLaMA-2-7B (meta-llama/Llama-2-7b-hf config.json values).
LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP32, BOOL, INT32, INT64 = 4, 1, 4, 8
ADAM_STEP = 4  # AdamW's per-tensor ``step`` (a 0-dim fp32 tensor)
REDUCE_BUCKET = REDUCE_BUCKET_ENTRIES  # entries per all-reduce of the Fisher at the freeze
MiB = 2**20
TIE_TEMPS = BOOL + 2 * INT64  # selection's largest per-tensor temporaries: tied bools, int64 copy, running count


def build_meta_lora_llama(config: dict, r: int = 16, targets: Sequence[str] = LLAMA_LINEAR) -> nn.Module:
    """``LlamaForCausalLM(LlamaConfig(**config))`` on the meta device with peft LoRA (rank ``r``) on ``targets``."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
        return peft.get_peft_model(
            model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM")
        )


def candidate_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """FISH's default candidates of ``model``: name -> shape."""
    params = dict(model.named_parameters())
    return {n: tuple(params[n].shape) for n in find_candidates(model)}


def shard_entries(shape: tuple[int, ...], world_size: int) -> int:
    """Entries of the largest FSDP2 shard (rank 0's: ``fully_shard`` splits dim 0 like ``torch.chunk``)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


@dataclass(frozen=True)
class FishMemory:
    """Bytes FISH and AdamW hold for candidates of the given shapes (fp32 trainable parameters)."""

    tensors: int
    candidates: int  # n, entries
    largest: int  # entries of the largest candidate tensor (bounds the selection's per-tensor temporaries)
    fisher_fp32: int  # cb.fisher (per_example hooks add into it directly, batch_grad too)
    call_buffer_fp32: int  # FSDP2, per rank: the largest module call's whole-shaped fp32 sum of its candidates
    call_module: str  # a module making that largest buffer
    mask_bool: int  # cb.masks after the freeze
    mask_packed: int  # bit-packed, as in checkpoints
    lora_fp32: int  # the LoRA weights themselves (for scale)
    adamw_dense: int  # exp_avg + exp_avg_sq over all candidates (no step counters)
    adamw_steps: int  # AdamW's step counters, one per tensor
    sparse: dict[float, dict[str, int]]  # sparsity -> kept, state, indices, values (sparse_optimizer_state),
    #   dense_indices (mask_gradients' + FrozenEntryGuard's int32 indices of the smaller side, dense masked step)
    fsdp2: dict[int, dict[str, int]]  # world size -> per rank (largest shards): fisher, call_buffer, warmup, adamw

    @property
    def warmup_per_example(self) -> int:
        """Warmup, ``fisher_estimator="per_example"``, unsharded (one process, or per rank under DDP)."""
        return self.fisher_fp32  # the hooks' squares go straight into cb.fisher

    @property
    def warmup_batch_grad(self) -> int:
        return self.fisher_fp32


def module_calls(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Module -> entries of its candidates: what one call of it scatters under FSDP2. A per-example rule claims
    its own module's parameters (LoRA's A and B are each an ``nn.Linear``: one matrix per call)."""
    calls: dict[str, int] = {}
    for name, shape in shapes.items():
        module = name.rpartition(".")[0]
        calls[module] = calls.get(module, 0) + math.prod(shape)
    return calls


def fish_memory(
    shapes: dict[str, tuple[int, ...]], sparsities: Sequence[float] = (0.9, 0.99), world_sizes: Sequence[int] = (2, 8)
) -> FishMemory:
    """Count the bytes (see the module doc) for candidate tensors of these shapes."""
    sizes = [math.prod(s) for s in shapes.values()]
    n = sum(sizes)
    calls = module_calls(shapes)
    call_module = max(calls, key=calls.__getitem__)  # (the first of the largest)
    call_buffer = FP32 * calls[call_module]
    sparse = {}
    for s in sparsities:
        k = num_kept(n, s)
        sparse[s] = {"kept": k, "state": 2 * FP32 * k, "indices": INT32 * k, "values": FP32 * k,
                     "dense_indices": 2 * INT32 * min(k, n - k)}  # fmt: skip
    fsdp2 = {}
    for w in world_sizes:
        local = sum(shard_entries(s, w) for s in shapes.values())
        fsdp2[w] = {"fisher": FP32 * local, "call_buffer": call_buffer, "warmup": FP32 * local + call_buffer,
                    "adamw": 2 * FP32 * local}  # fmt: skip
    return FishMemory(
        tensors=len(sizes),
        candidates=n,
        largest=max(sizes),
        fisher_fp32=FP32 * n,
        call_buffer_fp32=call_buffer,
        call_module=call_module,
        mask_bool=BOOL * n,
        mask_packed=sum((x + 7) // 8 for x in sizes),
        lora_fp32=FP32 * n,
        adamw_dense=2 * FP32 * n,
        adamw_steps=ADAM_STEP * len(sizes),
        sparse=sparse,
        fsdp2=fsdp2,
    )


@dataclass(frozen=True)
class FreezePeak:
    """Bytes torch allocated during the freeze's selection, above what was live before it (the Fisher)."""

    peak: int  # highest live total during the selection
    after: int  # still live once it returned (the masks)
    events: int  # allocation/free events recorded


def allocation_peak(fn) -> tuple[FreezePeak, object]:
    """Run ``fn()`` under ``torch.profiler`` (CPU, ``profile_memory=True``); replay every allocation and
    free of torch's allocator in time order. Returns the peak and final live bytes above the start (what
    existed before is not counted; frees of it would count negative) and ``fn``'s result."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # raw events: per-op aggregates (prof.events()) net out allocations freed inside an op
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in mem:
        live += nbytes
        peak = max(peak, live)
    return FreezePeak(peak=peak, after=live, events=len(mem)), out


def measure_freeze_peak(shapes: dict[str, tuple[int, ...]], sparsity: float = 0.9) -> FreezePeak:
    """Peak bytes torch allocates in the callback's selection at the freeze, on a random CPU Fisher.

    The selection runs on one thread (every allocation on the profiled thread); a check that the
    returned masks were seen allocated guards against a profiler that recorded nothing.
    """
    from fish_lightning.core.selection import select_masks, selection_scores

    gen = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(s, generator=gen) for n, s in shapes.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result, masks = allocation_peak(
            lambda: select_masks(selection_scores("fisher", fisher, fisher), sparsity, "global", warn_ties=False)
        )
    finally:
        torch.set_num_threads(threads)
    mask_bytes = sum(m.numel() * m.element_size() for m in masks.values())  # type: ignore[union-attr]
    if result.after < mask_bytes:
        raise RuntimeError(f"the profiler saw {result.after} live bytes after the selection, below its masks' "
                           f"{mask_bytes}: allocations were not recorded")  # fmt: skip
    return result


def _mib(b: float) -> str:
    return f"{b / MiB:,.1f}"


def _per(b: float, n: int) -> str:
    return f"{b / n:.3g}"


def _yes_no(fish: int, other: int) -> str:
    """The verdict on "is FISH's memory below the other's?" from the numbers."""
    return "yes" if fish < other else "no"


def _relation(fish: int, other: int) -> str:
    return "below" if fish < other else ("equal to" if fish == other else "above")


def _ratio(fish: int, other: int) -> str:
    """``fish`` relative to ``other``, to precede a noun: "1/m of" (``other`` is m times ``fish``), "equal to",
    or a multiple ("1.5x")."""
    if fish == other:
        return "equal to"
    if 0 < fish < other and other % fish == 0:
        return f"1/{other // fish} of"
    return f"{fish / other:.3g}x" if other else "more than"


def _against(b: int, adam: int) -> str:
    """A table cell: ``b`` against AdamW's state ``adam``, with the verdict."""
    return f"{_ratio(b, adam)} AdamW's: **{_yes_no(b, adam)}**" if b else "none: **yes**"


def render(mem: FishMemory, title: str, command: str, base_params: int | None, freeze_peak: FreezePeak | None) -> str:
    """The Markdown page."""
    n, adam = mem.candidates, mem.adamw_dense
    rows = [
        ('**Warmup**: `cb.fisher` (fp32 accumulator; the per-example hooks add into it): the warmup total with '
         '`fisher_estimator="per_example"` (default; one process, or per rank under DDP) and with `batch_grad`',
         mem.fisher_fp32),
        ("**After the freeze**, dense masked step: `cb.masks` (bool, as the callback keeps them)", mem.mask_bool),
        ("masks bit-packed (checkpoints)", mem.mask_packed),
    ]  # fmt: skip
    out = [
        f"# {title}",
        "",
        f"Made by `{command}`: counted from the parameter shapes of the model built on the `meta` device "
        "(no weights, no download); `--measure-freeze` also runs the freeze's selection on CPU. Every row "
        "says whether FISH's bytes are below AdamW's optimizer state for the same entries (**yes**/**no**).",
        "",
        f"Candidates: **{n:,} entries** in {mem.tensors} LoRA tensors (FISH's default: every LoRA A/B matrix; "
        f"the largest has {mem.largest:,} entries)."
        + (f" Base model: {base_params:,} parameters ({_mib(2 * base_params)} MiB in bf16)." if base_params else ""),
        "",
        f"For scale: the LoRA weights (fp32) are {_mib(mem.lora_fp32)} MiB ({_per(mem.lora_fp32, n)} B/candidate); "
        f"AdamW's dense state (`exp_avg` + `exp_avg_sq`, fp32) is **{_mib(adam)} MiB** ({_per(adam, n)} B/candidate; "
        f"plus {mem.adamw_steps:,} B of `step` counters, 4 B per tensor, in no row below).",
        "",
        "| what | bytes | MiB | bytes / candidate | against AdamW's dense state |",
        "|---|---:|---:|---:|---|",
    ]
    out += [f"| {what} | {b:,} | {_mib(b)} | {_per(b, n)} | {_against(b, adam)} |" for what, b in rows]
    out += [
        "",
        "After the freeze, per sparsity. Dense masked step (`sparse_optimizer_state=False`): `mask_gradients` and "
        "`FrozenEntryGuard` each keep an int32 index of the kept or the frozen entries, whichever are fewer, next "
        "to `cb.masks`; against AdamW's dense state:",
        "",
        "| sparsity | kept k | int32 indices (2 × 4 B × min(k, n − k)) | + `cb.masks` (bool) | against AdamW's dense "
        "state |",
        "|---:|---:|---:|---:|---|",
    ]
    for s, d in mem.sparse.items():
        tot = d["dense_indices"] + mem.mask_bool
        out.append(f"| {s:g} | {d['kept']:,} | {_mib(d['dense_indices'])} MiB | {_mib(tot)} MiB | "
                   f"{_against(tot, adam)} |")  # fmt: skip
    out += [
        "",
        "With `sparse_optimizer_state=True`: `CompactOptimizer` keeps int32 indices of the kept entries (4 B × k) and "
        "no mask; a tensor kept whole stays dense in the optimizer and needs no indices or compact copy, so those "
        "columns are upper bounds. Against the compact AdamW state (8 B × k), FISH's mask and index overhead: with "
        "bool masks (the callback of 0.1.0), bit-packed masks, and masks derived from the indices (what the callback "
        "does since 0.2.0: `cb.masks` is a view rebuilt from the indices on access, nothing resident beyond them):",
        "",
        "| sparsity | kept k | AdamW state (8 B × k) | int32 indices (4 B × k) | compact values (4 B × k) "
        "| indices + bool `cb.masks` | indices + bit-packed masks | indices only (masks derived) |",
        "|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for s, d in mem.sparse.items():
        state, idx = d["state"], d["indices"]
        cells = []
        for extra in (mem.mask_bool, mem.mask_packed, 0):
            b = idx + extra
            cells.append(f"{_mib(b)} MiB ({_per(b, n)} B/cand.), {_ratio(b, state)} the state: **{_yes_no(b, state)}**")
        out.append(f"| {s:g} | {d['kept']:,} | {_mib(state)} MiB | {_mib(idx)} MiB | {_mib(d['values'])} MiB | "
                   + " | ".join(cells) + " |")  # fmt: skip
    if mem.fsdp2:
        out += [
            "",
            "Warmup per rank under FSDP2 (`fully_shard`: dim 0 split across ranks; largest shard, rank 0), "
            '`fisher_estimator="per_example"`: the Fisher shard plus, transient in the backward, one module '
            "call's whole-shaped fp32 sum of its own candidates, reduce-scattered at once (mean over ranks) "
            f"into the shard and freed; the largest call here is `{mem.call_module}` "
            f"({mem.call_buffer_fp32 // FP32:,} entries). Against the rank's AdamW shard:",
            "",
            "| ranks | `cb.fisher` shard | one call's buffer (whole, transient) | warmup peak | AdamW state shard "
            "| per rank, bytes / candidate of the model (warmup vs AdamW) | against the rank's AdamW shard |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for w, d in mem.fsdp2.items():
            out.append(
                f"| {w} | {_mib(d['fisher'])} MiB | {_mib(d['call_buffer'])} MiB | {_mib(d['warmup'])} MiB | "
                f"{_mib(d['adamw'])} MiB | {_per(d['warmup'], n)} vs {_per(d['adamw'], n)} | "
                f"{_against(d['warmup'], d['adamw'])} |"
            )
    out += ["", "## Is FISH's memory below the optimizer state's?", ""]
    out += verdict(mem, freeze_peak)
    out += ["", "## Not in the tables", ""]
    out += notes(mem, freeze_peak)
    return "\n".join(out) + "\n"


def verdict(mem: FishMemory, freeze_peak: FreezePeak | None = None) -> list[str]:
    """Plain statements comparing FISH's memory with AdamW's state, phase by phase (computed, not written)."""
    n, adam = mem.candidates, mem.adamw_dense
    pe, bg = mem.warmup_per_example, mem.warmup_batch_grad
    lines = [
        f'- **Warmup, `fisher_estimator="per_example"` (default), one process or DDP: {_yes_no(pe, adam)}.** '
        f"`cb.fisher` = {_mib(pe)} MiB ({_per(pe, n)} B/candidate; the hooks add into it, no second buffer) is "
        f"{_ratio(pe, adam)} AdamW's dense state ({_mib(adam)} MiB, {_per(adam, n)} B/candidate).",
        f"- **Warmup, `batch_grad`: {_yes_no(bg, adam)}**, {_mib(bg)} MiB = {_ratio(bg, adam)} AdamW's state.",
    ]
    for w, d in mem.fsdp2.items():
        lines.append(
            f"- **Warmup, `per_example`, FSDP2 on {w} ranks (per rank): {_yes_no(d['warmup'], d['adamw'])}.** "
            f"The Fisher shard ({_mib(d['fisher'])} MiB) plus one module call's whole-shaped buffer "
            f"({_mib(d['call_buffer'])} MiB, transient) = {_mib(d['warmup'])} MiB, {_ratio(d['warmup'], d['adamw'])} "
            f"the rank's AdamW shard "
            f"({_mib(d['adamw'])} MiB). With `batch_grad` the Fisher shard alone is "
            f"{_ratio(d['fisher'], d['adamw'])} it ({_yes_no(d['fisher'], d['adamw'])})."
        )
    lines.append(
        f"- **After the freeze, dense optimizer state: {_yes_no(mem.mask_bool, adam)}**, the bool masks "
        f"({_mib(mem.mask_bool)} MiB, {_per(mem.mask_bool, n)} B/candidate) are {_ratio(mem.mask_bool, adam)} "
        f"AdamW's {_mib(adam)} MiB (bit-packed: {_ratio(mem.mask_packed, adam)} it)."
    )
    for s, d in mem.sparse.items():
        dense = d["dense_indices"] + mem.mask_bool
        lines.append(
            f"- **After the freeze, dense masked step, sparsity {s:g}: {_yes_no(dense, adam)}.** The bool masks plus "
            f"the two int32 indices ({_mib(d['dense_indices'])} MiB) are {_mib(dense)} MiB, {_ratio(dense, adam)} "
            f"AdamW's dense state."
        )
    for s, d in mem.sparse.items():
        state, idx = d["state"], d["indices"]
        today, packed = idx + mem.mask_bool, idx + mem.mask_packed
        lines.append(
            f"- **After the freeze, `sparse_optimizer_state=True`, sparsity {s:g}: {_yes_no(idx, state)}.** "
            f"`cb.masks` is rebuilt on access from the compact optimizer's int32 indices, so the mask costs the "
            f"indices alone ({_mib(idx)} MiB, {_per(idx, n)} B/candidate), {_relation(idx, state)} the compact AdamW "
            f"state ({_mib(state)} MiB). Kept as bool masks (0.1.0) it was {_mib(today)} MiB, {_ratio(today, state)} "
            f"that state ({_yes_no(today, state)}); bit-packed masks plus the indices would be {_mib(packed)} MiB "
            f"({_per(packed, n)} B/candidate, {_yes_no(packed, state)})."
        )
    if freeze_peak is not None:
        total = mem.fisher_fp32 + freeze_peak.peak
        lines.append(
            f"- **At the freeze (transient, measured on CPU): {_yes_no(total, adam)}.** `cb.fisher` plus the "
            f"selection's allocations peak at {_mib(total)} MiB ({_per(total, n)} B/candidate), "
            f"{_ratio(total, adam)} AdamW's dense state, which is allocated at the same time."
        )
        # DDP: reduce_mean_ all-reduces in place in buckets (a bucket's flat copy + its averaged copy next to
        # cb.fisher); then the selection, and rank 0's packed masks unpacked next to the selected ones
        bucket = min(mem.fisher_fp32, 2 * FP32 * REDUCE_BUCKET)
        ddp = max(mem.fisher_fp32 + bucket, mem.fisher_fp32 + freeze_peak.peak + mem.mask_packed + mem.mask_bool)
        lines.append(
            f"- **At the freeze under DDP (per rank, counted from the code path): {_yes_no(ddp, adam)}.** The "
            f"larger of `cb.fisher` + one all-reduce bucket of `reduce_mean_` (in place, {REDUCE_BUCKET:,} entries "
            f"at most, flat copy + averaged copy), and the reduced Fisher + the "
            f"selection's peak + rank 0's masks (packed, then unpacked next to the selected ones): {_mib(ddp)} MiB "
            f"({_per(ddp, n)} B/candidate), {_ratio(ddp, adam)} AdamW's dense state (see the notes)."
        )
    return lines


def notes(mem: FishMemory, freeze_peak: FreezePeak | None = None) -> list[str]:
    """What the tables leave out (sizes computed from ``mem``)."""
    n, big = mem.candidates, mem.largest
    lines = [
        '- Transient, at the freeze: `selection_scores("fisher")` returns the fp32 accumulators themselves '
        '(no copy; `"reverse"` makes a negated copy, 4 B/candidate); `select_masks` finds the k-th value by a '
        "bisection that counts entries tensor by tensor (no concatenation, no sort), so beyond the new masks "
        "(1 B/candidate) its temporaries are one tensor's at a time: a bool comparison and the int64 copy its "
        "`.sum()` counts (9 B/entry), or, for a tensor holding entries tied at the cut, the tied bools, their "
        "int64 copy and running count (17 B/entry); the largest candidate has "
        f"{big:,} entries ({_mib(TIE_TEMPS * big)} MiB at 17 B/entry)."
        + (
            f" Measured here (`--measure-freeze`: `torch.profiler` with `profile_memory=True` records every "
            f"allocation and free of torch's CPU allocator during the selection, at sparsity 0.9 on a random "
            f"Fisher, {freeze_peak.events:,} events replayed in time order): peak {_mib(freeze_peak.peak)} MiB = "
            f"{_per(freeze_peak.peak, n)} B/candidate above the Fisher, of which {_mib(freeze_peak.after)} MiB "
            f"({_per(freeze_peak.after, n)} B/candidate) stay: the masks (the peak exceeds them by "
            f"{_mib(freeze_peak.peak - freeze_peak.after)} MiB; a tensor's temporaries come and go while its "
            "masks are still being made, so the peak can be reached at the end)."
            if freeze_peak is not None
            else ""
        ),
        "- Transient, after the selection: `frozen_digest` hashes each tensor's frozen entries (a copy of one "
        "tensor's frozen entries at a time); `rewind_frozen` writes through `torch.where`, one tensor at a time.",
        "- Transient, each warmup step: the hooks materialise per-example gradients in chunks of at most 2^24 fp32 "
        "entries (64 MiB) per LoRA call, and keep a reference to each LoRA layer's input until the backward "
        "(autograd keeps it anyway).",
        "- Non-finite warmup steps: with `per_example` the squares go straight into `cb.fisher` (under FSDP2 "
        "too, each call's share reduce-scattered into the shard during the backward), so a step with a "
        "non-finite gradient cannot be left out after the fact: the Fisher restarts from zero (and the warmup "
        "count with it); `batch_grad` adds after the step's check and leaves that step out instead.",
        "- Per masked step (dense state): `FrozenEntryGuard` copies the partly frozen tensors from "
        f"`on_before_optimizer_step` to the end of `optimizer.step()` (4 B/candidate in fp32: {_mib(FP32 * n)} MiB, "
        "freed after the step). The batched ops (`core/flat.py`) work on groups of tensors of at most "
        f"{GROUP_ENTRIES:,} entries: `mask_gradients`, the guard's restore and the compact gather/scatter each hold "
        f"one group's flat fp32 copy at a time ({_mib(FP32 * GROUP_ENTRIES)} MiB at most), and CUDA's `index_put_` "
        "widens an int32 index to int64 for the call (8 B per indexed entry of one group, transient).",
        "- Optional: `rewind_frozen=True` keeps the fit-start values until the freeze (4 B/candidate in fp32); "
        "`keep_fisher=True` keeps `cb.fisher` on CPU after it (4 B/candidate); a checkpoint written during warmup "
        "carries the Fisher (4 B/candidate).",
        "- Gradients of the LoRA weights (4 B/candidate in fp32) exist with or without FISH; with "
        "`sparse_optimizer_state` the dense `.grad` is released once the kept entries are gathered.",
        "- Per rank under DDP: every rank holds all of the above. At the freeze `reduce_mean_` averages the Fisher "
        f"in place, in all-reduces of at most {REDUCE_BUCKET:,} consecutive entries (a flat fp32 copy of one bucket "
        f"and its averaged copy: {_mib(2 * FP32 * REDUCE_BUCKET)} MiB at most), and rank 0's masks are broadcast "
        "bit-packed and unpacked into new bool masks (1 B/candidate more while the selected ones are replaced).",
        "- Per rank under FSDP2: `cb.fisher`, the masks and AdamW's state are per shard. The per-example hooks "
        f"hold one module call's whole-shaped fp32 sum at a time ({_mib(mem.call_buffer_fp32)} MiB at most here, "
        "table above) and the reduce-scatter's shard-shaped result until it is added: one reduce-scatter per "
        "module call, in the backward, in the same order on every rank. A module called more than once per "
        "forward (tied weights) instead buffers its per-example gradients (`[B, numel]` fp32) until the end of "
        "the backward; no LoRA matrix here is.",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.99])
    parser.add_argument("--world-sizes", type=int, nargs="*", default=[2, 8], help="FSDP2 ranks for the per-rank table")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown page here (else print it)")
    parser.add_argument("--measure-freeze", action="store_true", help="measure the selection's peak allocation on CPU")
    args = parser.parse_args(argv)
    for s in args.sparsities:
        if not 0.0 <= s < 1.0:
            parser.error(f"sparsity {s} is out of range: expected 0 <= sparsity < 1")
    if args.r < 1:
        parser.error(f"--r {args.r} must be >= 1")
    if any(w < 2 for w in args.world_sizes):
        parser.error(f"--world-sizes {args.world_sizes}: FSDP2 sharding needs at least 2 ranks")
    model = build_meta_lora_llama(LLAMA2_7B, r=args.r)
    shapes = candidate_shapes(model)
    base = sum(p.numel() for n, p in model.named_parameters() if n not in shapes)
    del model
    mem = fish_memory(shapes, args.sparsities, args.world_sizes)
    peak = measure_freeze_peak(shapes) if args.measure_freeze else None
    command = "python " + " ".join(["scripts/memory_table.py", *(argv if argv is not None else sys.argv[1:])])
    page = render(mem, f"FISH memory: LLaMA-2-7B + LoRA r={args.r} on every linear layer", command, base, peak)
    if args.out is None:
        print(page)
    else:
        args.out.write_text(page)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
