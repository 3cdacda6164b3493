"""Optimizer memory and step time of FISH full fine-tuning: dense masked state vs compact (kept-only) state.

The original FISH Mask setting: no peft, FISH over all MiniLM-L6 weights, AdamW(weight_decay=0.01).
Each configuration runs in its own child process (so RSS figures do not mix): 2 dense warmup steps
(AdamW state for every weight, as during FISH warmup), then a random mask at the given density is
frozen the way ``FisherMaskCallback`` does it (``FrozenEntryGuard`` for the dense masked state,
``CompactOptimizer`` for ``sparse_optimizer_state=True``), then masked steps are timed.

Reported per configuration: optimizer state bytes after the freeze, resident memory after the
masked steps (VmRSS, after ``malloc_trim``), peak RSS, median masked step time.

Usage: python scripts/bench_sparse_state.py [--tiny] [--steps N] [--out bench_sparse_state.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fish_lightning.adapters.models import build_sequence_classifier
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.core.masking import FrozenEntryGuard, mask_gradients
from fish_lightning.core.sparse_state import CompactOptimizer, optimizer_state_bytes

TINY = tiny_config("bert", vocab_size=1000, max_position_embeddings=128)


def vm_rss_mib() -> float:
    with contextlib.suppress(OSError):  # give freed heap back to the OS, so VmRSS shows what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(tiny: bool, density: float, sparse: bool, steps: int, batch: int, length: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = (
        build_sequence_classifier(num_labels=2, tiny_config=TINY)
        if tiny
        else build_sequence_classifier("minilm", num_labels=2)
    )
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, length))
    labels = torch.randint(0, 2, (batch,))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=1e-5, weight_decay=0.01)

    def backward():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(input_ids=ids).logits, labels).backward()

    for _ in range(2):  # dense warmup: AdamW state for every weight
        backward()
        opt.step()
    dense_state = optimizer_state_bytes(opt)
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) < density for n, p in params.items()}
    by_param = {params[n]: m for n, m in masks.items()}
    compact = CompactOptimizer(opt, by_param) if sparse else None
    guard = None if sparse else FrozenEntryGuard(opt, by_param)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        backward()
        if compact:
            compact.gather_grads()
        else:
            mask_gradients(params, masks)
        opt.step()
        times.append(time.perf_counter() - t0)
    if guard:
        guard.remove()
    kept = sum(int(m.sum()) for m in masks.values())
    return {
        "density": density,
        "state": "sparse (kept only)" if sparse else "dense masked",
        "kept": kept,
        "entries": sum(m.numel() for m in masks.values()),
        "optimizer_state_bytes_warmup": dense_state,
        "optimizer_state_bytes_after_freeze": optimizer_state_bytes(opt),
        "index_bytes": sum(idx.numel() * idx.element_size() for _, idx, _ in compact.pairs) if compact else 0,
        "rss_after_mib": vm_rss_mib(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "median_step_s": statistics.median(times[1:] if len(times) > 1 else times),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="masked steps timed (default 6, tiny 3)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--densities", default="0.01,0.1", help="comma list of kept fractions")
    ap.add_argument("--out", default="bench_sparse_state.json")
    ap.add_argument("--child", nargs=2, metavar=("DENSITY", "SPARSE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.tiny else 6)
    if args.child:
        res = child(args.tiny, float(args.child[0]), args.child[1] == "1", steps, args.batch, args.length)
        print(json.dumps(res))
        return 0
    rows = []
    for density in (float(d) for d in args.densities.split(",")):
        for sparse in (False, True):
            cmd = [sys.executable, __file__, "--child", str(density), "1" if sparse else "0", "--steps", str(steps),
                   "--batch", str(args.batch), "--length", str(args.length)]  # fmt: skip
            cmd += ["--tiny"] if args.tiny else []
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    model = "tiny BERT" if args.tiny else "MiniLM-L6"
    print(f"{model} full fine-tuning + FISH, AdamW(wd=0.01), batch {args.batch} x {args.length}, 2 threads, "
          f"median of {max(1, steps - 1)} masked steps")  # fmt: skip
    head = f"{'density':>7s}  {'state':20s} {'opt. state MiB':>14s} {'vs dense':>8s} {'index MiB':>9s} "
    print(head + f"{'RSS after MiB':>13s} {'peak RSS MiB':>12s} {'step s':>7s}")
    for r in rows:
        ratio = r["optimizer_state_bytes_after_freeze"] / r["optimizer_state_bytes_warmup"]
        print(f"{r['density']:7.0%}  {r['state']:20s} {r['optimizer_state_bytes_after_freeze'] / 2**20:14.1f} "
              f"{ratio:8.4f} {r['index_bytes'] / 2**20:9.1f} {r['rss_after_mib']:13.0f} {r['peak_rss_mib']:12.0f} "
              f"{r['median_step_s']:7.3f}")  # fmt: skip
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
