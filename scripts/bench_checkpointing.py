"""Warmup memory of FISH's per-example Fisher on a decoder, with and without gradient checkpointing.

A random LLaMA (default: 4 layers, 512 wide, 8 heads / 4 KV heads, 1376 FFN, 8000-token vocabulary)
with LoRA r=8 on every projection, trained in fp32 on CPU. For each checkpointing mode (off, HF
non-reentrant, HF reentrant) one warmup step (forward + backward of the batch-mean loss) runs

- ``plain``: without FISH (what a step costs anyway), and
- ``fish``: with the per-example hooks attached, as the callback does during warmup
  (``PerExampleSquaredGrads``: ``start_batch(n, n**2)``, backward, ``finish_batch``; the hooks object,
  hence its fp32 Fisher accumulators, is created inside the measured step).

Peak memory = the peak of live CPU tensor bytes allocated during the step, from the CPU allocator's
events (``torch.profiler`` with ``profile_memory=True``: every allocation and free in order; the
running sum's maximum), so what was live before the step (weights) is not counted. Target: ``fish``
within 10% of ``plain`` + one fp32 accumulator (4 bytes per trainable entry), i.e. no ``[B, *shape]``
per-example buffers. Also printed: the bytes of multi-call buffers left at the end of the backward
(0: every module squared in place), the step times (profiler off) and the hooks' max relative error
against the batch-size-1 loop on the first ``--check`` examples.

Usage: python scripts/bench_checkpointing.py [--layers 4] [--hidden 512] [--batch 8] [--length 256]
       [--modes off,gc,gc_reentrant] [--rounds 3] [--out ckpt.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fish_lightning.adapters.decoders import apply_decoder_peft, build_causal_lm
from fish_lightning.core.fisher import PerExampleSquaredGrads, per_example_fisher

MODES = ("off", "gc", "gc_reentrant")
CPU = DeviceType.CPU


def build(args, mode: str):
    cfg = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
               num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
               max_position_embeddings=max(512, args.length), bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = apply_decoder_peft(build_causal_lm(tiny_config=cfg), r=args.r, lora_alpha=2 * args.r)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at 0 (every dL/dA = 0): give both factors gradients
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    if mode != "off":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": mode == "gc_reentrant"})
    model.train()  # HF checkpoints in training mode only; dropout is 0 here
    ids = torch.randint(3, args.vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def loss_fn(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1), reduction="none")
        return nll.view(b["input_ids"].shape[0], -1).mean(1)

    return model, loss_fn, data


def step(model, loss_fn, data, params, fish: bool) -> int:
    """One warmup step; returns the bytes of multi-call ``[B, *shape]`` buffers at the end of the backward."""
    n = data["input_ids"].shape[0]
    hooks = PerExampleSquaredGrads(model, params).attach() if fish else None
    if hooks is not None:
        hooks.start_batch(n, float(n) ** 2)
    loss_fn(data).mean().backward()
    buffered = 0
    if hooks is not None:
        buffered = sum(t.numel() * t.element_size() for t in hooks._pending.values())
        hooks.finish_batch()
        assert not hooks.uncovered and not hooks.missed, (hooks.uncovered, hooks.missed)
        hooks.detach()
    return buffered


def peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while ``fn`` runs (allocator events in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(args, mode: str) -> dict:
    model, loss_fn, data = build(args, mode)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    accumulator = sum(p.numel() for p in params.values()) * 4
    row: dict = {"mode": mode, "trainable": accumulator // 4, "accumulator_bytes": accumulator}
    for fish in (False, True):
        key = "fish" if fish else "plain"
        model.zero_grad(set_to_none=True)
        step(model, loss_fn, data, params, fish)  # warm the allocator and any lazy init
        model.zero_grad(set_to_none=True)
        buffered = [0]
        row[f"{key}_peak_bytes"] = peak_bytes(
            lambda out=buffered, fish=fish: out.__setitem__(0, step(model, loss_fn, data, params, fish))
        )
        if fish:
            row["buffered_bytes"] = buffered[0]
    times: dict[str, list[float]] = {"plain": [], "fish": []}
    for _ in range(args.rounds):
        for key in ("plain", "fish"):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(model, loss_fn, data, params, key == "fish")
            times[key].append(time.perf_counter() - t0)
    row.update({f"{k}_s": statistics.median(v) for k, v in times.items()})
    row["memory_ratio"] = row["fish_peak_bytes"] / (row["plain_peak_bytes"] + accumulator)
    row["time_ratio"] = row["fish_s"] / row["plain_s"]

    # exactness on the first `check` examples: hooks (checkpointing as configured) vs the batch-size-1 loop
    sub = {k: v[: args.check] for k, v in data.items()}
    model.zero_grad(set_to_none=True)
    hooks = PerExampleSquaredGrads(model, params).attach()
    hooks.start_batch(args.check)
    loss_fn(sub).sum().backward()
    hooks.finish_batch()
    hooks.detach()
    if mode != "off":  # the loop oracle without checkpointing (reentrant checkpointing refuses autograd.grad)
        model.activation_checkpointing_disable()
    ref, _ = per_example_fisher(loss_fn, sub, params)
    row["rel_err_vs_loop"] = max(float((hooks.sums[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check", type=int, default=2, help="examples compared against the batch-size-1 loop")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mib = 2.0**20
    print(f"LLaMA {args.layers}x{args.hidden} (ffn {args.ffn}, vocab {args.vocab}) + LoRA r={args.r}, "
          f"batch {args.batch}x{args.length}, fp32, CPU, threads={args.threads}")  # fmt: skip
    print(f"{'checkpointing':14s} {'plain MiB':>10s} {'FISH MiB':>9s} {'acc MiB':>8s} {'FISH/(plain+acc)':>17s} "
          f"{'buffered':>9s} {'plain s':>8s} {'FISH s':>7s} {'rel err':>8s}")  # fmt: skip
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: {mode!r} is not one of {MODES}")
        r = measure(args, mode)
        rows.append(r)
        print(f"{mode:14s} {r['plain_peak_bytes'] / mib:10.1f} {r['fish_peak_bytes'] / mib:9.1f} "
              f"{r['accumulator_bytes'] / mib:8.2f} {r['memory_ratio']:17.3f} {r['buffered_bytes']:9d} "
              f"{r['plain_s']:8.3f} {r['fish_s']:7.3f} {r['rel_err_vs_loop']:8.1e}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
