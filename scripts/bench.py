"""Benchmark FISH against vanilla PEFT on the same model and batch; prints a table and writes JSON.

Measures, interleaved round by round (median over rounds), on MiniLM-L6 + LoRA (r=8, query/value)
at batch 32 x 64 tokens (``--tiny``: a 2-layer 32-wide random BERT, seconds):

* Fisher estimators vs one plain forward+backward: per-example by hooks (the default), the
  batch-size-1 loop (the original FISH procedure, our test oracle) and the squared batch gradient;
  and the hooks' max relative error against the loop;
* training steps vs a vanilla PEFT step (forward, backward, AdamW): a warmup step that accumulates
  the per-example Fisher, and a masked step after the freeze (gradient masking + frozen-entry guard);
* the callback's resident memory after the freeze (bytes per candidate entry) and peak RSS;
* the callback's aten ops per masked step (``torch.profiler``: what ``MaskEnforcer`` runs after the
  backward, before the step and in the optimizer's step hooks; dense masked state and
  ``sparse_optimizer_state``) on a MiniLM-shaped random BERT and a 32-layer one of the same width,
  LoRA r=8 on every projection (query, key, value, attention output, intermediate, output), with
  the masked step's time against a vanilla step at a small batch, where per-tensor work shows most
  (``--tiny``: 2 and 8 layers of the tiny BERT). The counts must not grow with the layers.

Usage: python scripts/bench.py [--tiny] [--rounds N] [--out bench.json] [--method lora|dora] [--ops-only]
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
#: all-MiniLM-L6-v2's shapes (random init: the bundled weights are not needed to count ops)
MINILM_SHAPED = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # fmt: skip
#: every projection of every BERT layer (not the pooler)
ALL_PROJECTIONS = r".*layer\.\d+\..*(query|key|value|dense)$"
#: ops that only make views or read metadata: no kernel, no allocation
VIEW_OPS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::narrow", "aten::slice",
            "aten::split", "aten::split_with_sizes", "aten::detach", "aten::alias", "aten::unsqueeze",
            "aten::squeeze", "aten::flatten", "aten::_unsafe_view", "aten::t", "aten::expand", "aten::select",
            "aten::unbind", "aten::chunk", "aten::is_nonzero"}  # fmt: skip


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
    ap.add_argument("--ops-only", action="store_true", help="only the callback's op counts per masked step")
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
    print_op_counts(result["callback_ops_per_masked_step"])


def op_count_configs(tiny: bool) -> dict[str, dict]:
    if tiny:
        return {"tiny_bert_2_layers": TINY, "tiny_bert_8_layers": {**TINY, "num_hidden_layers": 8}}
    return {"minilm_shaped": MINILM_SHAPED, "bert_32_layers": {**MINILM_SHAPED, "num_hidden_layers": 32}}


def callback_ops(config: dict, sparse: bool, sparsity: float, batch: int, length: int, rounds: int) -> dict:
    """Aten ops the callback's enforcement runs per masked step, and the step times.

    What :class:`~fish_lightning.masker.enforcer.MaskEnforcer` does in a Lightning step is replayed:
    ``after_backward`` (on_after_backward), ``before_step`` (on_before_optimizer_step) and the optimizer's step
    hooks, each wrapped in a ``record_function("fish")`` range; every aten op inside one is counted, the
    top-level ones (called by FISH, not by another aten op) apart, and view/metadata ops apart.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from fish_lightning.masker.enforcer import MaskEnforcer

    torch.manual_seed(0)
    model = build_sequence_classifier(num_labels=2, tiny_config=config)
    model = apply_peft(model, "lora", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_PROJECTIONS)
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    names = find_candidates(model)
    named = dict(model.named_parameters())
    params = {n: named[n] for n in names}
    gen = torch.Generator().manual_seed(1)
    masks = select_masks({n: torch.rand(p.shape, generator=gen) for n, p in params.items()}, sparsity)
    vocab = model.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, length), generator=gen)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def fresh_opt():
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(input_ids=ids).logits, labels).backward()
        opt.step()  # dense "warmup": state for every entry
        return opt

    def backward(opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(input_ids=ids).logits, labels).backward()

    vanilla = fresh_opt()

    def vanilla_step():
        backward(vanilla)
        vanilla.step()

    opt = fresh_opt()
    enforcer = MaskEnforcer(sparse=sparse)
    enforcer.install([opt], params, masks)
    spent = [0.0]  # seconds inside the enforcement (its calls and its step hooks)
    for hooks in (opt._optimizer_step_pre_hooks, opt._optimizer_step_post_hooks):  # the enforcer's hooks, labelled
        for k, hook in list(hooks.items()):
            hooks[k] = (lambda h: lambda *a: _labelled(record_function, h, spent, *a))(hook)

    def masked_step():
        backward(opt)
        t0 = time.perf_counter()
        with record_function("fish"):
            enforcer.after_backward(params, masks)
        with record_function("fish"):
            enforcer.before_step(params, masks)
        spent[0] += time.perf_counter() - t0
        opt.step()

    masked_step()  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        masked_step()
    top = nested = views = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        chain, parent, under = [], e.cpu_parent, False
        while parent is not None:
            if parent.name == "fish":
                under = True
                break
            chain.append(parent)
            parent = parent.cpu_parent
        if not under:
            continue
        nested += 1
        if not any(p.name.startswith("aten::") for p in chain):
            top += 1
            views += e.name in VIEW_OPS
    times: dict[str, list[float]] = {"vanilla": [], "masked": [], "fish": []}
    for fn in (vanilla_step, masked_step):
        fn()
    for _ in range(rounds):
        times["vanilla"].append(timed(vanilla_step))
        spent[0] = 0.0
        times["masked"].append(timed(masked_step))
        times["fish"].append(spent[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    enforcer.remove()
    return {
        "tensors": len(params),
        "partly_masked_tensors": sum(1 for m in masks.values() if not bool(m.all()) and bool(m.any())),
        "candidates": sum(p.numel() for p in params.values()),
        "aten_ops_top_level": top,
        "aten_ops_top_level_compute": top - views,
        "aten_ops_all": nested,
        "step_vanilla_s": med["vanilla"],
        "step_masked_s": med["masked"],
        "step_masked / step_vanilla": med["masked"] / med["vanilla"],
        "callback_s_per_masked_step": med["fish"],
    }


def _labelled(record_function, hook, spent, *args):
    t0 = time.perf_counter()
    with record_function("fish"):
        out = hook(*args)
    spent[0] += time.perf_counter() - t0
    return out


def op_counts(tiny: bool, sparsity: float, rounds: int) -> dict:
    """:func:`callback_ops` for both configurations, dense masked state and ``sparse_optimizer_state``."""
    batch, length = (4, 16) if tiny else (2, 32)
    out = {}
    for name, config in op_count_configs(tiny).items():
        for sparse in (False, True):
            out[f"{name} {'sparse_state' if sparse else 'dense'}"] = callback_ops(
                config, sparse, sparsity, batch, length, rounds
            )
    return out


def print_op_counts(counts: dict) -> None:
    print(f"\n{'callback per masked step':34s} {'tensors':>7s} {'top ops':>7s} {'compute':>7s} {'all ops':>7s} "
          f"{'callback ms':>11s} {'vanilla ms':>10s} {'masked/vanilla':>14s}")  # fmt: skip
    for k, d in counts.items():
        print(f"{k:34s} {d['tensors']:7d} {d['aten_ops_top_level']:7d} {d['aten_ops_top_level_compute']:7d} "
              f"{d['aten_ops_all']:7d} {1e3 * d['callback_s_per_masked_step']:11.2f} {1e3 * d['step_vanilla_s']:10.1f} "
              f"{d['step_masked / step_vanilla']:14.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rounds = args.rounds or (3 if args.tiny else 7)
    torch.set_num_threads(args.threads)
    counts = op_counts(args.tiny, args.sparsity, rounds)
    if args.ops_only:
        print_op_counts(counts)
        result = {"model": "tiny_bert" if args.tiny else "minilm", "threads": args.threads,
                  "torch": torch.__version__, "callback_ops_per_masked_step": counts}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
        return result

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
        "callback_ops_per_masked_step": counts,
    }
    print_result(result, args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
