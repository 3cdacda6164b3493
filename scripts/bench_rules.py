"""Per-example Fisher rules: the hook step time relative to a plain forward + backward, per method.

For every peft method of conf/peft/ (BERT classifier) plus full fine-tuning, and for a LLaMA decoder
(full fine-tuning, LoRA, LoRA with HF gradient checkpointing in both reentrant modes), on random
models: one training backward with FISH's per-example hooks attached (what the callback does
during warmup) against the same backward without them, interleaved, median over rounds. Also
prints which rule family did the work (dedicated rules / the general torch.func rule), the
hooks' max relative error against the batch-size-1 loop, and the bytes of multi-call
``[B, *shape]`` buffers at the end of the backward (0: squared in place).

Shapes: ``--shape tiny`` (2 layers, 32 wide) or ``--shape minilm`` (MiniLM-L6's shape: 6 layers,
384 wide, 12 heads, 1536 FFN, 30522-token vocabulary; random weights, no download).

Usage: python scripts/bench_rules.py [--shape tiny|minilm] [--batch 32] [--length 64] [--rounds 5]
       [--methods lora,ia3,...] [--out rules.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from fish_lightning.adapters.decoders import apply_decoder_peft, build_causal_lm
from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.core.fisher import PerExampleSquaredGrads, per_example_fisher

CONF = Path(__file__).resolve().parents[1] / "src" / "fish_lightning" / "conf" / "peft"
SHAPES = {
    "tiny": (tiny_config("bert", vocab_size=1000, max_position_embeddings=128),
             tiny_config("llama", vocab_size=1000, max_position_embeddings=128)),
    "minilm": (dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0),
               tiny_config("llama", vocab_size=30522, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                           num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)),
}  # fmt: skip
DECODER_CASES = ("llama:none", "llama:lora", "llama:lora+gc", "llama:lora+gc_reentrant")


def _encoder_methods() -> list[str]:
    return sorted(p.stem for p in CONF.glob("*.yaml") if "apply_peft" in p.read_text())


def _peft_config(method: str) -> dict:
    cfg = yaml.safe_load((CONF / f"{method}.yaml").read_text())
    cfg.pop("_target_"), cfg.pop("_partial_")
    return cfg


def _randomize_zeros(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not bool(p.ne(0).any()):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build(case: str, shape: str, batch: int, length: int):
    """(model, per-example loss fn, batch, reentrant checkpointing?) for an encoder method or a decoder case."""
    torch.manual_seed(0)
    enc, dec = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    if case.startswith("llama:"):
        kind = case.split(":")[1]
        model = build_causal_lm(tiny_config=dec)
        if kind != "none":
            model = apply_decoder_peft(model, r=8, lora_alpha=16)
        ids = torch.randint(3, dec["vocab_size"], (batch, length), generator=g)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def loss_fn(b):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1), reduction="none"
            )
            return nll.view(b["input_ids"].shape[0], -1).mean(1)

        if "+gc" in kind:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": "reentrant" in kind}
            )
        model.train()  # HF checkpoints in training mode only; dropout is 0 in these configs
    else:
        model = build_sequence_classifier(num_labels=2, tiny_config=enc)
        model = apply_peft(model, **_peft_config(case)).eval()
        ids = torch.randint(1, enc["vocab_size"], (batch, length), generator=g)
        data = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=g),
        }

        def loss_fn(b):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return F.cross_entropy(logits, b["labels"], reduction="none")

    _randomize_zeros(model)
    return model, loss_fn, data


def measure(case: str, shape: str, batch: int, length: int, rounds: int, check: int) -> dict:
    model, loss_fn, data = build(case, shape, batch, length)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    hooks = PerExampleSquaredGrads(model, params)
    buffered = [0]

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(data).mean().backward()

    def with_hooks():
        hooks.attach().start_batch(batch, float(batch) ** 2)
        model.zero_grad(set_to_none=True)
        loss_fn(data).mean().backward()
        buffered[0] = sum(t.numel() * t.element_size() for t in hooks._pending.values())
        hooks.finish_batch()
        hooks.reset()
        hooks.detach()

    for fn in (plain, with_hooks):
        fn()
    times: dict[str, list[float]] = {"plain": [], "hooks": []}
    for _ in range(rounds):
        for key, fn in (("plain", plain), ("hooks", with_hooks)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    # exactness on the first `check` examples: hooks vs the batch-size-1 loop (checkpointing off for the loop)
    sub = {k: v[:check] for k, v in data.items()}
    hooks.attach().start_batch(check)
    model.zero_grad(set_to_none=True)
    loss_fn(sub).sum().backward()
    hooks.finish_batch()
    hooks.missed.update(hooks.unseen({k: p.grad for k, p in params.items()}))
    hooks.detach()
    if hasattr(model, "activation_checkpointing_disable") and "+gc" in case:
        model.activation_checkpointing_disable()
    ref, _ = per_example_fisher(loss_fn, sub, params)
    floor = 1e-6 * max(float(f.abs().max()) for f in ref.values())
    err = max(float((hooks.sums[n] - ref[n]).abs().max()) / max(float(ref[n].abs().max()), floor) for n in hooks.sums)
    how = "general torch.func rule" if hooks.fallback_modules else "rules"
    if hooks.fallback_modules and len(hooks.fallback_modules) < len(hooks._rules):
        how = f"rules + torch.func for {len(hooks.fallback_modules)} module(s)"
    return {
        "case": case, "plain_s": med["plain"], "hooks_s": med["hooks"], "ratio": med["hooks"] / med["plain"],
        "how": how, "fallback_modules": hooks.fallback_modules, "uncovered": hooks.uncovered,
        "missed": sorted(hooks.missed), "rel_err_vs_loop": err, "buffered_bytes": buffered[0],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check", type=int, default=4, help="examples compared against the batch-size-1 loop")
    ap.add_argument("--methods", default=None, help="comma list of encoder methods and/or " + ",".join(DECODER_CASES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = args.methods.split(",") if args.methods else [*_encoder_methods(), *DECODER_CASES]
    rows = []
    print(f"shape={args.shape} batch={args.batch}x{args.length} rounds={args.rounds} threads={args.threads}")
    print(f"{'case':26s} {'plain s':>8s} {'hooks s':>8s} {'ratio':>6s} {'rel err':>8s} {'buffered':>9s}  how")
    for case in cases:
        r = measure(case, args.shape, args.batch, args.length, args.rounds, args.check)
        rows.append(r)
        flag = (
            "" if not (r["uncovered"] or r["missed"]) else f"  uncovered={r['uncovered'][:2]} missed={r['missed'][:2]}"
        )
        print(f"{case:26s} {r['plain_s']:8.4f} {r['hooks_s']:8.4f} {r['ratio']:6.2f} {r['rel_err_vs_loop']:8.1e} "
              f"{r['buffered_bytes']:9d}  {r['how']}{flag}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
