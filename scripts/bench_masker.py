"""The masker's own per-step work, measured apart from the step it guards.

What ``FishMasker`` adds to every masked step beyond the enforcer's kernels (counted by ``bench.py --ops-only``):
the check that the optimizers still hold what the enforcer installed (parameter ids of every param group) and the
freeze-due test, called from the adapters' hooks. Timed with ``timeit`` (median of rounds) on random BERTs of
MiniLM's width with LoRA r=8 on every projection (6 and 32 layers: 72 and 384 LoRA tensors), and set against the
same model's vanilla training step (forward, backward, AdamW) at batch 8 x 32 tokens, measured in the same run.

Usage: python scripts/bench_masker.py [--rounds N] [--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch
import torch.nn.functional as F

from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.masker.masker import FishMasker

ALL_PROJECTIONS = r".*layer\.\d+\..*(query|key|value|dense)$"
WIDTH = dict(vocab_size=30522, hidden_size=384, num_attention_heads=12, intermediate_size=1536,
             max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


def build(layers: int):
    torch.manual_seed(0)
    model = build_sequence_classifier(num_labels=2, tiny_config=dict(WIDTH, num_hidden_layers=layers))
    model = apply_peft(model, "lora", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_PROJECTIONS)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 30522, (8, 32), generator=g),
             "attention_mask": torch.ones(8, 32, dtype=torch.long), "labels": torch.randint(0, 2, (8,), generator=g)}
    return model, batch


def measure(layers: int, rounds: int) -> tuple[int, float, float]:
    """(LoRA tensors, vanilla step seconds, masker checks seconds per step)."""
    model, batch = build(layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        F.cross_entropy(model(**batch).logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad()

    step()
    vanilla = statistics.median(timeit.repeat(step, number=1, repeat=rounds))
    masker = FishMasker(model, sparsity=0.9, warmup_steps=1, mask_epoch=None, selection="random")
    masker.wrap(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    masker.freeze(model)

    def checks() -> None:
        masker.check_enforced()
        masker.freeze_if_due(model)

    per_call = statistics.median(timeit.repeat(checks, number=200, repeat=rounds)) / 200
    return sum(1 for n in masker.params if "lora_" in n), vanilla, per_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'layers':>6} {'LoRA tensors':>12} {'vanilla step ms':>15} {'masker checks us':>16} {'share':>8}")
    for layers in (6, 32):
        n, vanilla, per_call = measure(layers, args.rounds)
        print(f"{layers:>6} {n:>12} {vanilla * 1e3:>15.1f} {per_call * 1e6:>16.1f} {per_call / vanilla:>8.2%}")


if __name__ == "__main__":
    main()
