"""Benchmark FISH against vanilla PEFT on the same model and batch; prints a table and writes JSON.

Measures, interleaved round by round (median over rounds), on MiniLM-L6 + LoRA (r=8, query/value)
at batch 32 x 64 tokens (``--tiny``: a 2-layer 32-wide random BERT, seconds):

* Fisher estimators vs one plain forward+backward: per-example by hooks (the default), the
  batch-size-1 loop (the original FISH procedure, our test oracle) and the squared batch gradient;
  and the hooks' max relative error against the loop;
* training steps vs a vanilla PEFT step (forward, backward, AdamW): a warmup step that accumulates
  the per-example Fisher, and a masked step after the freeze (gradient masking + frozen-entry guard);
* the callback's resident memory after the freeze (bytes per candidate entry) and peak RSS.

Usage: python scripts/bench.py [--tiny] [--rounds N] [--out bench.json] [--method lora|dora]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.core.candidates import find_candidates
from fish_lightning.core.fisher import (
    PerExampleSquaredGrads,
    accumulate_squared_grads,
    per_example_fisher,
    per_example_fisher_hooks,
    zeros_like_params,
)
from fish_lightning.core.masking import FrozenEntryGuard, mask_gradients
from fish_lightning.core.selection import select_masks

TINY = tiny_config("bert", vocab_size=1000, max_position_embeddings=128)


def build(tiny: bool, method: str, batch: int, length: int, seed: int = 0):
    torch.manual_seed(seed)
    if tiny:
        model = build_sequence_classifier(num_labels=2, tiny_config=TINY)
    else:
        model = build_sequence_classifier("minilm", num_labels=2)
    model = apply_peft(model, method, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    model.eval()  # deterministic timings and exact comparisons: dropout off
    with torch.no_grad():  # a trained-looking adapter: B != 0, so A gets gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    data = {
        "input_ids": torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }
    return model, data


def per_example_losses(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer random BERT (seconds)")
    ap.add_argument("--method", default="lora", choices=["lora", "dora"])
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7, tiny 3)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench.json")
    return ap.parse_args(argv)


def variants(model, batch, params: dict, hook_f: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """The timed functions (Fisher estimators, training steps) and the masks of the masked step."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(b):
        return per_example_losses(model, b)

    fisher = zeros_like_params(params)

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(batch).mean().backward()

    def batch_grad():
        plain()
        accumulate_squared_grads(fisher, params)

    def hooks():
        per_example_fisher_hooks(loss_fn, batch, model, params, fisher)

    def loop():
        per_example_fisher(loss_fn, batch, params, fisher)

    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    pe = PerExampleSquaredGrads(model, params)
    masks = select_masks(hook_f, args.sparsity)

    def vanilla_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(batch).mean().backward()
        opt.step()

    def warmup_step():  # what the callback does during warmup: hooks on the training backward
        pe.attach().start_batch(args.batch, float(args.batch) ** 2)
        opt.zero_grad(set_to_none=True)
        loss_fn(batch).mean().backward()
        pe.finish_batch()
        for n, acc in pe.sums.items():
            fisher[n].add_(acc)
        pe.reset()
        opt.step()
        pe.detach()

    masked_opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)  # its step hooks: the frozen-entry guard
    FrozenEntryGuard(masked_opt, {params[n]: m for n, m in masks.items()})

    def masked_step():  # after the freeze: masked gradients + frozen-entry guard around the step
        masked_opt.zero_grad(set_to_none=True)
        loss_fn(batch).mean().backward()
        mask_gradients(params, masks)
        masked_opt.step()

    fns = {"plain_fwd_bwd": plain, "fisher_hooks": hooks, "fisher_batch_grad": batch_grad,
           "fisher_loop": loop, "step_vanilla": vanilla_step, "step_warmup_fisher": warmup_step,
           "step_masked": masked_step}  # fmt: skip
    return fns, masks


def print_result(result: dict, args: argparse.Namespace) -> None:
    med, rounds = result["median_s"], result["rounds"]
    print(f"{result['model']} + {args.method} r=8 (query,value), batch {args.batch} x {args.length} tokens, "
          f"{args.threads} threads, median of {rounds} interleaved rounds")  # fmt: skip
    print(f"{'measurement':38s} {'median s':>10s}")
    for k, v in med.items():
        print(f"{k:38s} {v:10.4f}")
    print(f"\n{'ratio':38s} {'value':>10s}")
    for k, v in result["ratios"].items():
        print(f"{k:38s} {v:10.3f}")
    print(f"\nper-example Fisher, hooks vs loop: max rel. error {result['hooks_vs_loop_max_rel_err']:.2e}")
    print(f"callback memory after the freeze: {result['resident_bytes_per_candidate_after_freeze']:.2f} B/candidate "
          f"(bool masks); peak RSS {result['peak_rss_mib']:.0f} MiB")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rounds = args.rounds or (3 if args.tiny else 7)
    torch.set_num_threads(args.threads)

    model, batch = build(args.tiny, args.method, args.batch, args.length)
    names = find_candidates(model)
    named = dict(model.named_parameters())
    params = {n: named[n] for n in names}

    # correctness: hooks vs loop
    loop_f, _ = per_example_fisher(lambda b: per_example_losses(model, b), batch, params)
    hook_f, _ = per_example_fisher_hooks(lambda b: per_example_losses(model, b), batch, model, params)
    floor = 1e-6 * max(float(f.max()) for f in loop_f.values())
    rel_err = max(float((hook_f[n] - loop_f[n]).abs().max()) / max(float(loop_f[n].abs().max()), floor) for n in names)

    fns, masks = variants(model, batch, params, hook_f, args)
    for fn in fns.values():  # warm up allocator and kernels
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}

    candidates = sum(p.numel() for p in params.values())
    mask_bytes = sum(m.numel() * m.element_size() for m in masks.values())
    result = {
        "model": "tiny_bert" if args.tiny else "minilm",
        "method": args.method,
        "batch": args.batch,
        "length": args.length,
        "threads": args.threads,
        "rounds": rounds,
        "candidates": candidates,
        "sparsity": args.sparsity,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "median_s": med,
        "ratios": {
            "fisher_hooks / plain_fwd_bwd": med["fisher_hooks"] / med["plain_fwd_bwd"],
            "fisher_loop / plain_fwd_bwd": med["fisher_loop"] / med["plain_fwd_bwd"],
            "fisher_batch_grad / plain_fwd_bwd": med["fisher_batch_grad"] / med["plain_fwd_bwd"],
            "step_warmup_fisher / step_vanilla": med["step_warmup_fisher"] / med["step_vanilla"],
            "step_masked / step_vanilla": med["step_masked"] / med["step_vanilla"],
        },
        "hooks_vs_loop_max_rel_err": rel_err,
        "resident_bytes_per_candidate_after_freeze": mask_bytes / candidates,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print_result(result, args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
