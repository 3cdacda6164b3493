"""File size of the sparse adapter export vs the dense adapter, at several densities.

Builds MiniLM-L6 (offline, ``fish_lightning.adapters.models``) + LoRA r=8 on query/value, applies
``seeded_init_``, keeps a random ``density`` fraction of the LoRA entries (moved to new random values,
as training would), saves with ``save_sparse``, reloads into a fresh model to check that it is
exact, and prints one table row per density. ``--tiny`` uses a tiny random BERT (seconds, for tests).

    python scripts/export_size.py [--tiny] [--densities 0.01 0.1 0.5] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from fish_lightning.adapters.export import load_sparse_into_base, read_sparse, save_sparse  # noqa: E402
from fish_lightning.adapters.models import apply_peft, build_sequence_classifier  # noqa: E402
from fish_lightning.adapters.seeded_init import seeded_init_  # noqa: E402
from fish_lightning.adapters.tiny import tiny_config  # noqa: E402

TINY = tiny_config("bert", hidden_size=64, num_attention_heads=4, intermediate_size=128)


def build(tiny: bool, seed: int) -> torch.nn.Module:
    """The base model (same weights on every call; MiniLM's random head is trained densely anyway)."""
    if tiny:
        return build_sequence_classifier(num_labels=2, tiny_config=TINY, seed=seed)
    return build_sequence_classifier("minilm", num_labels=2)


def random_masks(model: torch.nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Exactly ``round(density * n)`` kept entries, uniformly over all LoRA A/B entries."""
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    total = sum(p.numel() for p in params.values())
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=g)[: round(density * total)]] = True
    masks, offset = {}, 0
    for n, p in params.items():
        masks[n] = flat[offset : offset + p.numel()].view(p.shape).clone()
        offset += p.numel()
    return masks


def describe_encodings(path: Path) -> str:
    """E.g. ``gaps/uint16 x24``: per encoding (and index dtype), the number of tensors."""
    meta, tensors = read_sparse(path)
    counts: collections.Counter[str] = collections.Counter()
    for key, spec in meta["tensors"].items():
        enc = spec["encoding"]
        if enc in ("bitmask", "gaps"):
            enc += "/" + str(tensors[f"{key}:{enc}"].dtype).removeprefix("torch.")
        counts[enc] += 1
    return ", ".join(f"{e} x{c}" for e, c in sorted(counts.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT instead of MiniLM-L6")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    lora = dict(r=8, lora_alpha=16, target_modules=["query", "value"])
    print(f"model: {'tiny BERT' if args.tiny else 'MiniLM-L6'} + LoRA r=8 on query/value (+ dense classifier head)")
    header = f"{'density':>8} {'kept':>9} {'file bytes':>11} {'dense bytes':>11} {'ratio':>7} {'exact':>6}  encoding"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for density in args.densities:
            model = apply_peft(build(args.tiny, args.seed), "lora", **lora)
            seeded_init_(model, args.seed)
            masks = random_masks(model, density, args.seed)
            g = torch.Generator().manual_seed(args.seed + 1)
            with torch.no_grad():  # "training": kept entries move, the head changes too
                for n, p in model.named_parameters():
                    if n in masks:
                        p[masks[n]] += 0.01 * torch.randn(int(masks[n].sum()), generator=g)
                    elif p.requires_grad:
                        p += 0.01 * torch.randn(p.shape, generator=g)
            path = Path(tmp) / f"adapter-{density:g}.safetensors"
            report = save_sparse(model, masks, path)
            loaded = load_sparse_into_base(path, build(args.tiny, args.seed))
            want = {n: p for n, p in model.named_parameters() if p.requires_grad}
            got = dict(loaded.named_parameters())
            exact = all(torch.equal(want[n], got[n]) for n in want)
            print(
                f"{density:>8.2%} {report['kept']:>9,} {report['bytes']:>11,} {report['dense_bytes']:>11,} "
                f"{report['ratio']:>7.4f} {'yes' if exact else 'NO':>6}  {describe_encodings(path)}"
            )
    print("ratio = file bytes / dense bytes (same tensors stored dense by safetensors, no metadata)")


if __name__ == "__main__":
    main()
