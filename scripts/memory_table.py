"""FISH memory for LLaMA-2-7B + LoRA r=16 on every linear layer, counted from the parameter shapes.

Builds the architecture from its config values on the ``meta`` device (no weights, no download),
adds LoRA with peft (q/k/v/o/gate/up/down projections), takes FISH's default candidates
(:func:`fish_lightning.candidates.find_candidates`: every LoRA A/B matrix) and counts, per
candidate entry, what :class:`~fish_lightning.FisherMaskCallback` allocates (see
``callback.py``/``fisher.py``/``sparse_state.py``):

* warmup: ``cb.fisher``, one fp32 accumulator per candidate; with ``fisher_estimator="per_example"``
  (the default) the hooks' per-step sums, a second fp32 copy (the step's squares are added only
  once the step's gradients are known to be finite);
* after the freeze: ``cb.masks``, one bool (1 byte) per candidate; checkpoints bit-pack them
  (``pack_mask``: ``ceil(numel / 8)`` bytes per tensor);
* AdamW: ``exp_avg`` + ``exp_avg_sq`` in fp32 per trained entry (plus a 4-byte ``step`` per tensor);
  with ``sparse_optimizer_state=True`` only kept entries have state, plus their int64 indices and
  the compact fp32 copy of their values.

``--measure-freeze`` also measures, on CPU, the peak RSS increase of the selection the callback runs
at the freeze (``selection_scores`` + global ``select_masks``) on a random Fisher of these shapes.

    python scripts/memory_table.py [--out docs/memory_7b.md] [--measure-freeze]
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fish_lightning.candidates import find_candidates
from fish_lightning.selection import num_kept

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
FP32, BOOL, INT64 = 4, 1, 8
ADAM_STEP = 4  # AdamW's per-tensor ``step`` (a 0-dim fp32 tensor)
MiB = 2**20


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


@dataclass(frozen=True)
class FishMemory:
    """Bytes FISH and AdamW hold for candidates of the given shapes (fp32 trainable parameters)."""

    tensors: int
    candidates: int  # n, entries
    fisher_fp32: int  # cb.fisher
    hook_sums_fp32: int  # PerExampleSquaredGrads.sums (fisher_estimator="per_example", warmup only)
    mask_bool: int  # cb.masks after the freeze
    mask_packed: int  # bit-packed, as in checkpoints
    lora_fp32: int  # the LoRA weights themselves (for scale)
    adamw_dense: int  # exp_avg + exp_avg_sq over all candidates (no step counters)
    adamw_steps: int  # AdamW's step counters, one per tensor
    sparse: dict[float, dict[str, int]]  # sparsity -> kept, state, indices, values (sparse_optimizer_state)

    @property
    def warmup_per_example(self) -> int:
        return self.fisher_fp32 + self.hook_sums_fp32


def fish_memory(shapes: dict[str, tuple[int, ...]], sparsities: Sequence[float] = (0.9, 0.99)) -> FishMemory:
    """Count the bytes (see the module doc) for candidate tensors of these shapes."""
    sizes = [math.prod(s) for s in shapes.values()]
    n = sum(sizes)
    sparse = {}
    for s in sparsities:
        k = num_kept(n, s)
        sparse[s] = {"kept": k, "state": 2 * FP32 * k, "indices": INT64 * k, "values": FP32 * k}
    return FishMemory(
        tensors=len(sizes),
        candidates=n,
        fisher_fp32=FP32 * n,
        hook_sums_fp32=FP32 * n,
        mask_bool=BOOL * n,
        mask_packed=sum((x + 7) // 8 for x in sizes),
        lora_fp32=FP32 * n,
        adamw_dense=2 * FP32 * n,
        adamw_steps=ADAM_STEP * len(sizes),
        sparse=sparse,
    )


def measure_freeze_peak(shapes: dict[str, tuple[int, ...]], sparsity: float = 0.9) -> int:
    """Peak RSS increase (bytes) of the callback's selection at the freeze, on a random CPU Fisher.

    Linux ``ru_maxrss`` (KiB), so the run must not have peaked above the Fisher's footprint before.
    """
    from fish_lightning.selection import select_masks, selection_scores

    gen = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(s, generator=gen) for n, s in shapes.items()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    masks = select_masks(selection_scores("fisher", fisher, fisher), sparsity, "global", warn_ties=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del masks
    return after - before


def _mib(b: float) -> str:
    return f"{b / MiB:,.1f}"


def _per(b: float, n: int) -> str:
    return f"{b / n:.3g}"


def render(mem: FishMemory, title: str, command: str, base_params: int | None, freeze_peak: int | None) -> str:
    """The Markdown page."""
    n = mem.candidates
    rows = [
        ("LoRA weights (fp32), for scale", mem.lora_fp32),
        ("**Warmup**: `cb.fisher` (fp32 accumulator)", mem.fisher_fp32),
        ('**Warmup**: hooks\' per-step sums (fp32; `fisher_estimator="per_example"` only)', mem.hook_sums_fp32),
        ("**Warmup total**, `per_example` (default)", mem.warmup_per_example),
        ("**Warmup total**, `batch_grad`", mem.fisher_fp32),
        ("**After the freeze**: `cb.masks` (bool)", mem.mask_bool),
        ("masks bit-packed (checkpoints)", mem.mask_packed),
        ("AdamW state, dense (`exp_avg` + `exp_avg_sq`, fp32)", mem.adamw_dense),
    ]
    out = [
        f"# {title}",
        "",
        f"Made by `{command}`: counted from the parameter shapes of the model built on the `meta` device "
        "(no weights, no download); `--measure-freeze` also runs the freeze's selection on CPU.",
        "",
        f"Candidates: **{n:,} entries** in {mem.tensors} LoRA tensors (FISH's default: every LoRA A/B matrix)."
        + (f" Base model: {base_params:,} parameters ({_mib(2 * base_params)} MiB in bf16)." if base_params else ""),
        "",
        "| what | bytes | MiB | bytes / candidate |",
        "|---|---:|---:|---:|",
    ]
    out += [f"| {what} | {b:,} | {_mib(b)} | {_per(b, n)} |" for what, b in rows]
    out += [
        f"| AdamW `step` counters (4 B per tensor, not in the other AdamW rows) | {mem.adamw_steps:,} | "
        f"{_mib(mem.adamw_steps)} | {_per(mem.adamw_steps, n)} |",
        "",
        "With `sparse_optimizer_state=True` (after the freeze; `cb.masks` stays resident as well; a tensor kept "
        "whole stays dense in the optimizer and needs no indices or compact copy, so those two columns are upper "
        "bounds):",
        "",
        "| sparsity | kept k | AdamW state (8 B × k) | int64 indices (8 B × k) | compact values (4 B × k) "
        "| state + indices | `cb.masks` (bool) | masks bit-packed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, d in mem.sparse.items():
        out.append(
            f"| {s:g} | {d['kept']:,} | {_mib(d['state'])} MiB | {_mib(d['indices'])} MiB | {_mib(d['values'])} MiB "
            f"| {_mib(d['state'] + d['indices'])} MiB | {_mib(mem.mask_bool)} MiB | {_mib(mem.mask_packed)} MiB |"
        )
    out += ["", "## Is FISH's memory below the optimizer state's?", ""]
    out += verdict(mem, freeze_peak)
    out += [
        "",
        "## Not in the tables",
        "",
        "- Transient, at the freeze: `selection_scores` makes a scored copy of the Fisher (4 B/candidate), global "
        "`select_masks` concatenates it into one flat fp32 tensor (4 B), `torch.kthvalue` works on its own copy "
        "of the values plus int64 indices (12 B on CPU, measured alone), and a few bool temporaries (1 B each) "
        "live next to the new masks; the hooks' sums are already freed then."
        + (
            f" Measured here (`--measure-freeze`, CPU, peak RSS increase of that selection at sparsity 0.9): "
            f"{_mib(freeze_peak)} MiB = {_per(freeze_peak, n)} B/candidate."
            if freeze_peak is not None
            else ""
        ),
        "- Transient, each warmup step: the hooks materialise per-example gradients in chunks of at most 2^24 fp32 "
        "entries (64 MiB) per LoRA call, and keep a reference to each LoRA layer's input until the backward "
        "(autograd keeps it anyway).",
        "- Per masked step (dense state): `FrozenEntryGuard` copies the partly frozen tensors from "
        "`on_before_optimizer_step` to the end of `optimizer.step()` (4 B/candidate in fp32, freed after the step).",
        "- Optional: `rewind_frozen=True` keeps the fit-start values until the freeze (4 B/candidate in fp32); "
        "`keep_fisher=True` keeps `cb.fisher` on CPU after it (4 B/candidate); a checkpoint written during warmup "
        "carries the Fisher (4 B/candidate).",
        "- Gradients of the LoRA weights (4 B/candidate in fp32) exist with or without FISH; with "
        "`sparse_optimizer_state` the dense `.grad` is released once the kept entries are gathered.",
        "- Per rank: under DDP every rank holds all of the above. Under FSDP2 `cb.fisher` and the masks are "
        "per shard, but the hooks' per-step sums are whole-tensor on every rank (reduce-scattered each step).",
    ]
    return "\n".join(out) + "\n"


def verdict(mem: FishMemory, freeze_peak: int | None = None) -> list[str]:
    """Plain statements comparing FISH's memory with AdamW's state, phase by phase."""
    n, adam = mem.candidates, mem.adamw_dense
    lines = [
        f'- **Warmup, `fisher_estimator="per_example"` (default): no, equal.** `cb.fisher` + the hooks\' '
        f"per-step sums = {_mib(mem.warmup_per_example)} MiB (8 B/candidate), the same as AdamW's dense state "
        f"({_mib(adam)} MiB, 8 B/candidate; AdamW is larger only by its {mem.tensors} step counters).",
        f"- **Warmup, `batch_grad`: yes**, {_mib(mem.fisher_fp32)} MiB = half of AdamW's state.",
        f"- **After the freeze, dense optimizer state: yes**, the bool masks ({_mib(mem.mask_bool)} MiB, "
        f"1 B/candidate) are 1/8 of AdamW's {_mib(adam)} MiB (bit-packed: 1/64).",
    ]
    for s, d in mem.sparse.items():
        state = d["state"]
        bool_ok = mem.mask_bool < state
        packed_ok = mem.mask_packed < state
        lines.append(
            f"- **After the freeze, `sparse_optimizer_state=True`, sparsity {s:g}: "
            f"{'yes' if bool_ok else 'no'}.** The bool masks ({_mib(mem.mask_bool)} MiB) are "
            f"{mem.mask_bool / state:.2f}x the compact AdamW state ({_mib(state)} MiB; "
            f"{_mib(state + d['indices'])} MiB with its int64 indices). Bit-packed masks ({_mib(mem.mask_packed)} MiB) "
            f"would be {'below' if packed_ok else 'still above'} the state."
        )
    if freeze_peak is not None:
        total = mem.fisher_fp32 + freeze_peak
        lines.append(
            f"- **At the freeze (transient, measured on CPU): no.** `cb.fisher` plus the selection's temporaries peak "
            f"at {_mib(total)} MiB ({_per(total, n)} B/candidate), {total / adam:.1f}x AdamW's dense state, which "
            "is allocated at the same time (see below)."
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.99])
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown page here (else print it)")
    parser.add_argument("--measure-freeze", action="store_true", help="measure the selection's peak RSS on CPU")
    args = parser.parse_args(argv)
    for s in args.sparsities:
        if not 0.0 <= s < 1.0:
            parser.error(f"sparsity {s} is out of range: expected 0 <= sparsity < 1")
    if args.r < 1:
        parser.error(f"--r {args.r} must be >= 1")
    model = build_meta_lora_llama(LLAMA2_7B, r=args.r)
    shapes = candidate_shapes(model)
    base = sum(p.numel() for n, p in model.named_parameters() if n not in shapes)
    del model
    mem = fish_memory(shapes, args.sparsities)
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
