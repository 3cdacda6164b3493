"""One-command single-GPU check of fish-lightning: exactness, frozen entries, step times and memory on CUDA.

Needs, exactly (no network, no Hydra, no datasets, no pretrained weights: every model is a random-initialised
config of the named shapes):

    torch >= 2.4 with CUDA (written for 2.11; uses torch._foreach_copy_, torch._C._nn.flatten_dense_tensors)
    lightning >= 2.2 (written for 2.6; imports lightning.pytorch)
    transformers >= 4.40 (BertConfig, LlamaConfig; written against 5.x)
    peft >= 0.10 (LoRA; DoRA via use_dora=True)
    torchmetrics (a dependency of lightning; not used here directly)
    bitsandbytes (optional: the QLoRA section runs only when it imports)
    fish-lightning itself: ``pip install --no-deps --no-build-isolation -e .`` or ``PYTHONPATH=src``

Usage:

    python scripts/check_gpu.py --out DIR            # on one CUDA GPU, a few minutes
    python scripts/check_gpu.py --out DIR --dry-run  # the same code paths on CPU, tiny shapes, seconds

Writes DIR/gpu_check.json and DIR/gpu_check.md (rewritten after every section, so a run cut short keeps
what it measured) and exits 1 when a check failed. Sections:

1. exactness: per-example Fisher by hooks vs the batch-size-1 loop (the FISH oracle), LoRA and DoRA on a
   MiniLM-L6-shaped BERT, fp32 (TF32 off) and bf16 autocast;
2. frozen entries bit-identical through Lightning ``Trainer.fit`` with ``FisherMaskCallback``: bf16-mixed with
   fused and foreach AdamW, dense masked step and ``sparse_optimizer_state``; 16-mixed with a GradScaler
   (dense; sparse state is refused with a scaler), fused and foreach;
3. step times, interleaved in one process (median over rounds): vanilla LoRA, FISH warmup step (per-example
   hooks), masked step (dense state: masked gradients + frozen-entry guard) and sparse optimizer state, on a
   MiniLM-L6-shaped BERT and on a ~1.1B-parameter random LLaMA (TinyLlama's shapes) with LoRA r=16 on every
   linear projection, bf16 autocast, with and without gradient checkpointing; peak CUDA memory of each step;
4. QLoRA (if bitsandbytes imports): the same step times on the LLaMA with a 4-bit NF4 base, and the
   hooks-vs-loop exactness on it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

#: the shapes (random init): all-MiniLM-L6-v2, TinyLlama-1.1B
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
LLAMA_1B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)  # fmt: skip
#: dry run: the same code on CPU with these
TINY_BERT = dict(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
TINY_LLAMA = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
BERT_PROJECTIONS = r".*layer\.\d+\..*(query|key|value|dense)$"  # every projection of every layer (not the pooler)
TOL = {"fp32": 1e-4, "bf16_autocast": 0.1}
VARIANTS = ("vanilla", "fish_warmup", "masked", "sparse_state")  # hooks vs loop, max relative error per tensor


class Ctx:
    """Run settings: device, shapes, rounds (GPU run or dry run)."""

    def __init__(self, dry: bool, rounds: int | None, out: Path) -> None:
        self.dry, self.out = dry, out
        self.device = torch.device("cpu" if dry else "cuda")
        self.rounds = rounds or (2 if dry else 10)
        self.bert = TINY_BERT if dry else MINILM
        self.llama = TINY_LLAMA if dry else LLAMA_1B
        self.bert_batch = (4, 16) if dry else (32, 128)
        self.llama_batch = (2, 16) if dry else (4, 512)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast(self, enabled: bool = True):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------------------------------- models
def build_bert(ctx: Ctx, method: str = "lora", r: int = 8, seed: int = 0):
    from fish_lightning.adapters.models import apply_peft, build_sequence_classifier

    model = build_sequence_classifier(num_labels=2, tiny_config=ctx.bert, seed=seed)
    model = apply_peft(model, method, r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=BERT_PROJECTIONS)
    _nonzero_lora_b(model, seed)
    return model.to(ctx.device)


def build_llama(ctx: Ctx, quantized: bool = False, r: int = 16, seed: int = 0):
    """Random LLaMA of ``ctx.llama``'s shapes, bf16 base (or 4-bit NF4 with bf16 compute), LoRA r on every linear
    projection (fp32 adapter weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fish_lightning.adapters.decoders import apply_decoder_peft

    fields = dict(ctx.llama)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, **_dtype_kw(torch.bfloat16))
    if quantized:
        from transformers import BitsAndBytesConfig

        from fish_lightning.adapters.decoders import _no_cpu_repacking

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        with tempfile.TemporaryDirectory(prefix="fish-gpu-check-") as tmp:
            model.save_pretrained(tmp)
            del model
            _free(ctx)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb, **_dtype_kw(torch.bfloat16),
                                                         device_map={"": str(ctx.device)})  # fmt: skip
        model = _no_cpu_repacking(model)
    model = apply_decoder_peft(model, "lora", r=r, lora_alpha=2 * r, lora_dropout=0.0)
    for _, p in model.named_parameters():  # adapters in fp32 (peft autocasts them; make sure)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    _nonzero_lora_b(model, seed)
    return model


def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 names it ``dtype``, older versions ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _nonzero_lora_b(model, seed: int) -> None:
    """A trained-looking adapter: B != 0, so A gets gradients too."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _free(ctx: Ctx) -> None:
    import gc

    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def candidates(model) -> dict[str, torch.nn.Parameter]:
    from fish_lightning.core.candidates import find_candidates

    named = dict(model.named_parameters())
    return {n: named[n] for n in find_candidates(model)}


def bert_batch(ctx: Ctx, b: int, t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vocab = ctx.bert["vocab_size"]
    return {"input_ids": torch.randint(1, vocab, (b, t), generator=gen).to(ctx.device),
            "labels": torch.randint(0, 2, (b,), generator=gen).to(ctx.device)}  # fmt: skip


def lm_batch(ctx: Ctx, b: int, t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, ctx.llama["vocab_size"], (b, t), generator=gen).to(ctx.device)}


def bert_losses(model, batch) -> torch.Tensor:
    """Per-example losses [b] (fp32)."""
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def lm_losses(model, batch) -> torch.Tensor:
    """Per-example mean next-token losses [b] (fp32); their mean is the model's usual LM loss."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1].float()
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1)


# ---------------------------------------------------------------------------------------------- 1. exactness
def fisher_error(model, loss_fn, batch) -> dict[str, Any]:
    """Max over tensors of max|hooks - loop| / max|loop|, and how many of the top-10% entries both select."""
    from fish_lightning.core.fisher import PerExampleSquaredGrads, per_example_fisher, per_example_fisher_hooks
    from fish_lightning.core.selection import select_masks

    params = candidates(model)
    probe = PerExampleSquaredGrads(model, params)
    loop, _ = per_example_fisher(loss_fn, batch, params)
    hooks, _ = per_example_fisher_hooks(loss_fn, batch, model, params)
    floor = 1e-6 * max(float(f.max()) for f in loop.values())
    errs = {n: float((hooks[n] - loop[n]).abs().max()) / max(float(loop[n].abs().max()), floor) for n in params}
    worst = max(errs, key=errs.get)
    m_loop = select_masks(loop, 0.9, warn_ties=False)
    m_hooks = select_masks(hooks, 0.9, warn_ties=False)
    kept = sum(int(m.sum()) for m in m_loop.values())
    agree = sum(int((m_loop[n] & m_hooks[n]).sum()) for n in params)
    return {"max_rel_err": errs[worst], "worst_tensor": worst, "tensors": len(params),
            "candidates": sum(p.numel() for p in params.values()), "uncovered_by_hooks": probe.uncovered,
            "top10pct_agreement": agree / max(kept, 1)}  # fmt: skip


def check_exactness(ctx: Ctx) -> dict[str, Any]:
    rows = []
    b, t = (4, 16) if ctx.dry else (8, 64)
    batch = bert_batch(ctx, b, t, seed=3)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for method in ("lora", "dora"):
            model = build_bert(ctx, method).eval()
            for prec in ("fp32", "bf16_autocast"):

                def loss_fn(bt, model=model, prec=prec):
                    with ctx.autocast(prec != "fp32"):
                        return bert_losses(model, bt)

                r = fisher_error(model, loss_fn, batch)
                r.update(model="minilm_shaped_bert" if not ctx.dry else "tiny_bert", method=method, precision=prec,
                         batch=b, tol=TOL[prec])  # fmt: skip
                r["status"] = "pass" if r["max_rel_err"] <= TOL[prec] else "fail"
                rows.append(r)
            del model
            _free(ctx)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {"status": _worst(rows), "rows": rows}


# ---------------------------------------------------------------------------------------------- 2. frozen entries
def check_frozen(ctx: Ctx) -> dict[str, Any]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from fish_lightning import FisherMaskCallback

    class Module(pl.LightningModule):
        def __init__(self, model, fused: bool) -> None:
            super().__init__()
            self.model, self.fused = model, fused

        def training_step(self, batch, batch_idx):
            ids, labels = batch
            return F.cross_entropy(self.model(input_ids=ids).logits.float(), labels)

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            kind = {"fused": True} if self.fused else {"foreach": True}
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kind)

    class Snapshot(pl.Callback):  # values at the first step after the freeze (place after the FISH callback)
        def __init__(self, fish) -> None:
            self.fish, self.values, self.masks = fish, None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.fish.frozen and self.values is None:
                named = dict(pl_module.named_parameters())
                self.masks = {n: m.clone() for n, m in self.fish.masks.items()}
                self.values = {n: named[n].detach().clone() for n in self.masks}

    cfg = dict(TINY_BERT) if ctx.dry else dict(MINILM, num_hidden_layers=2)
    b, t = (4, 16) if ctx.dry else (16, 64)
    gen = torch.Generator().manual_seed(0)
    steps = 6 if ctx.dry else 12  # warmup 3, then masked steps
    ids = torch.randint(1, cfg["vocab_size"], (steps * b, t), generator=gen)
    labels = torch.randint(0, 2, (steps * b,), generator=gen)
    rows = []
    cases = [("bf16-mixed", fused, sparse) for fused in (True, False) for sparse in (False, True)]
    cases += [("16-mixed", fused, False) for fused in (True, False)]
    for precision, fused, sparse in cases:
        row: dict[str, Any] = {"precision": precision, "optimizer": "AdamW fused" if fused else "AdamW foreach",
                               "state": "sparse_optimizer_state" if sparse else "dense masked"}  # fmt: skip
        try:
            from fish_lightning.adapters.models import apply_peft, build_sequence_classifier

            model = build_sequence_classifier(num_labels=2, tiny_config=cfg, seed=0)
            model = apply_peft(model, "lora", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=BERT_PROJECTIONS)
            _nonzero_lora_b(model, 0)
            module = Module(model, fused)
            fish = FisherMaskCallback(sparsity=0.9, warmup_steps=3, mask_epoch=None, sparse_optimizer_state=sparse)
            snap = Snapshot(fish)
            trainer = pl.Trainer(accelerator=ctx.device.type, devices=1, precision=precision, max_epochs=1,
                                 logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=[fish, snap])  # fmt: skip
            with _quiet():
                trainer.fit(module, DataLoader(TensorDataset(ids, labels), batch_size=b))
            named = dict(module.named_parameters())
            bits_equal, kept_moved = True, False
            for n, m in snap.masks.items():
                now, then = named[n].detach(), snap.values[n]
                bits_equal &= torch.equal(_bits(now[~m]), _bits(then[~m]))
                kept_moved |= not torch.equal(now[m], then[m])
            report = fish.verify(module)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            row.update(frozen_bit_identical=bool(bits_equal), verify_frozen_unchanged=bool(report["frozen_unchanged"]),
                       kept_trained=bool(kept_moved), kept=report["kept"], candidates=report["candidates"],
                       steps=trainer.global_step, grad_scaler=scaler is not None,
                       precision_used=str(trainer.precision),
                       final_loss_scale=float(scaler.get_scale()) if scaler is not None else None)  # fmt: skip
            ok = bits_equal and report["frozen_unchanged"] and kept_moved
            ok = ok and (precision != "16-mixed" or ctx.dry or scaler is not None)  # fp16 on CUDA: with a GradScaler
            row["status"] = "pass" if ok else "fail"
        except Exception as err:  # noqa: BLE001 - reported, the other cases still run
            row.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
        rows.append(row)
        _free(ctx)
    return {"status": _worst(rows), "rows": rows}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


@contextlib.contextmanager
def _quiet():
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------- 3. step times
def time_steps(ctx: Ctx, model, loss_fn, batch, n: int, checkpointing: bool) -> dict[str, Any]:
    """Interleaved medians of the four steps on one model (each variant has its own AdamW)."""
    from fish_lightning.core.fisher import PerExampleSquaredGrads, zeros_like_params
    from fish_lightning.core.selection import select_masks
    from fish_lightning.masker.enforcer import MaskEnforcer

    if checkpointing:
        with _quiet():
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = candidates(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    masks = select_masks({k: torch.rand(p.shape, generator=gen) for k, p in params.items()}, 0.9, warn_ties=False)
    masks = {k: m.to(p.device) for (k, m), p in zip(masks.items(), params.values())}
    opts = {k: torch.optim.AdamW(trainable, lr=1e-6, weight_decay=0.01) for k in VARIANTS}

    def backward(opt):
        model.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss = loss_fn(model, batch).mean()
        loss.backward()

    for opt in opts.values():  # a dense step each: optimizer state for every entry, as after warmup
        backward(opt)
        opt.step()
    fisher = zeros_like_params(params)
    hooks = PerExampleSquaredGrads(model, params)
    dense, sparse = MaskEnforcer(sparse=False), MaskEnforcer(sparse=True)

    dense.install([opts["masked"]], params, masks)
    sparse.install([opts["sparse_state"]], params, masks)

    def vanilla():
        backward(opts["vanilla"])
        opts["vanilla"].step()

    def warmup():  # as the callback's warmup: hooks add the per-example squares into the Fisher
        hooks.attach(into=fisher)
        hooks.start_batch(n, float(n) ** 2)  # the loss is a batch mean
        backward(opts["fish_warmup"])
        hooks.finish_batch()
        hooks.reset()
        opts["fish_warmup"].step()
        hooks.detach()

    def masked():
        backward(opts["masked"])
        dense.after_backward(params, masks)
        dense.before_step(params, masks)
        opts["masked"].step()

    def sparse_step():
        backward(opts["sparse_state"])
        sparse.after_backward(params, masks)
        sparse.before_step(params, masks)
        opts["sparse_state"].step()

    fns = {"vanilla": vanilla, "fish_warmup": warmup, "masked": masked, "sparse_state": sparse_step}
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, int] = {k: 0 for k in fns}
    above: dict[str, int] = {k: 0 for k in fns}
    for fn in fns.values():  # warm up kernels and the allocator
        fn()
    for _ in range(ctx.rounds):
        for k, fn in fns.items():
            ctx.sync()
            if ctx.device.type == "cuda":
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn()
            ctx.sync()
            times[k].append(time.perf_counter() - t0)
            if ctx.device.type == "cuda":
                peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated())
                above[k] = max(above[k], torch.cuda.max_memory_allocated() - start)
    dense.remove()
    sparse.remove()
    if checkpointing:
        with _quiet():
            model.gradient_checkpointing_disable()
    med = {k: statistics.median(v) for k, v in times.items()}
    from fish_lightning.core.sparse_state import optimizer_state_bytes

    return {
        "checkpointing": checkpointing,
        "batch": list(batch["input_ids"].shape),
        "candidates": sum(p.numel() for p in params.values()),
        "tensors": len(params),
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "ratio_to_vanilla": {k: v / med["vanilla"] for k, v in med.items()},
        "peak_mib": {k: v / 2**20 for k, v in peaks.items()} if ctx.device.type == "cuda" else None,
        "step_peak_above_start_mib": {k: v / 2**20 for k, v in above.items()} if ctx.device.type == "cuda" else None,
        "optimizer_state_mib": {k: optimizer_state_bytes(o) / 2**20 for k, o in opts.items()},
        "hooks_uncovered": hooks.uncovered,
        "hooks_missed": sorted(hooks.missed),
    }


def check_step_times(ctx: Ctx) -> dict[str, Any]:
    rows = []
    model = build_bert(ctx)
    b, t = ctx.bert_batch
    batch = bert_batch(ctx, b, t)
    r = time_steps(ctx, model, bert_losses, batch, b, checkpointing=False)
    rows.append({"model": "tiny_bert" if ctx.dry else "minilm_shaped_bert (LoRA r=8, every projection)", **r})
    del model
    _free(ctx)
    model = build_llama(ctx)
    b, t = ctx.llama_batch
    batch = lm_batch(ctx, b, t)
    name = "tiny_llama" if ctx.dry else "llama_1.1b_random (bf16 base, LoRA r=16, every linear projection)"
    for ckpt in (False, True):
        rows.append({"model": name, **time_steps(ctx, model, lm_losses, batch, b, checkpointing=ckpt)})
    del model
    _free(ctx)
    for r in rows:
        r["status"] = "pass" if not r["hooks_missed"] and all(math.isfinite(v) for v in r["median_ms"].values()) \
            else "fail"  # fmt: skip
    return {"status": _worst(rows), "rows": rows}


# ---------------------------------------------------------------------------------------------- 4. QLoRA
def check_qlora(ctx: Ctx) -> dict[str, Any]:
    try:
        importlib.import_module("bitsandbytes")
    except Exception as err:  # noqa: BLE001 - any import failure: skipped
        return {"status": "skip", "reason": f"bitsandbytes does not import: {type(err).__name__}: {err}"}
    model = build_llama(ctx, quantized=True)
    b, t = ctx.llama_batch
    rows = []
    small = lm_batch(ctx, 4 if not ctx.dry else 2, 64 if not ctx.dry else 16, seed=5)
    model.eval()

    def loss_fn(bt):
        with ctx.autocast():
            return lm_losses(model, bt)

    ex = fisher_error(model, loss_fn, small)
    ex.update(precision="bf16 compute, nf4 base", tol=TOL["bf16_autocast"])
    ex["status"] = "pass" if ex["max_rel_err"] <= TOL["bf16_autocast"] else "fail"
    name = "tiny_llama nf4" if ctx.dry else "llama_1.1b_random nf4 (QLoRA r=16, every linear projection)"
    for ckpt in (False, True):
        r = time_steps(ctx, model, lm_losses, lm_batch(ctx, b, t), b, checkpointing=ckpt)
        r["status"] = "pass" if not r["hooks_missed"] else "fail"
        rows.append({"model": name, **r})
    model = None  # (the closure above refers to it: released, not deleted)
    _free(ctx)
    return {"status": _worst([ex, *rows]), "exactness": ex, "rows": rows}


# ---------------------------------------------------------------------------------------------- report
def _worst(rows: list[dict]) -> str:
    states = {r.get("status") for r in rows}
    for s in ("error", "fail"):
        if s in states:
            return s
    return "pass" if "pass" in states else "skip"


def environment(ctx: Ctx) -> dict[str, Any]:
    versions = {}
    for mod in ("torch", "lightning", "transformers", "peft", "torchmetrics", "bitsandbytes", "fish_lightning"):
        try:
            versions[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as err:  # noqa: BLE001
            versions[mod] = f"not importable ({type(err).__name__})"
    env = {"dry_run": ctx.dry, "device": str(ctx.device), "python": platform.python_version(), "versions": versions,
           "rounds": ctx.rounds}  # fmt: skip
    if ctx.device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)  # fmt: skip
    return env


def render(result: dict[str, Any]) -> str:
    env = result["environment"]
    out = ["# fish-lightning GPU check", ""]
    out.append(f"{'**Dry run on CPU (tiny shapes): not a GPU measurement.** ' if env['dry_run'] else ''}"
               f"Device: {env.get('gpu', env['device'])}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
               + f"; {result['seconds']:.0f} s in all. Overall: **{result['status']}**.")  # fmt: skip
    sec = result["sections"]
    if "exactness" in sec:
        out += ["", "## Per-example Fisher: hooks vs the batch-size-1 loop", "",
                "| model | method | precision | batch | max rel. error | tolerance | top-10% agreement | status |",
                "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in sec["exactness"].get("rows", []):
            out.append(f"| {r['model']} | {r['method']} | {r['precision']} | {r['batch']} | {r['max_rel_err']:.2e} | "
                       f"{r['tol']:g} | {r['top10pct_agreement']:.4f} | {r['status']} |")  # fmt: skip
        out += _section_error(sec["exactness"])
    if "frozen" in sec:
        out += ["", "## Frozen entries through `Trainer.fit` (LoRA, MiniLM-width BERT)", "",
                "| precision (used) | grad scaler | optimizer | state | frozen bit-identical | verify() | kept trained "
                "| steps | status |", "|---|---|---|---|---|---|---|---:|---|"]  # fmt: skip
        for r in sec["frozen"].get("rows", []):
            used = f" ({r['precision_used']})" if r.get("precision_used") not in (None, r["precision"]) else ""
            out.append(f"| {r['precision']}{used} | {r.get('grad_scaler')} | {r['optimizer']} | {r['state']} | "
                       f"{r.get('frozen_bit_identical')} | "
                       f"{r.get('verify_frozen_unchanged')} | {r.get('kept_trained')} | {r.get('steps', '')} | "
                       f"{r['status']}{' ' + r['error'] if r.get('error') else ''} |")  # fmt: skip
        out += _section_error(sec["frozen"])
    for key, title in (("step_times", "Step times (interleaved medians, bf16 autocast)"),
                       ("qlora", "QLoRA: 4-bit NF4 base")):  # fmt: skip
        if key not in sec:
            continue
        s = sec[key]
        out += ["", f"## {title}", ""]
        if s.get("status") == "skip":
            out.append(f"Skipped: {s.get('reason')}")
            continue
        if "exactness" in s:
            e = s["exactness"]
            out.append(f"Hooks vs loop on the 4-bit model: max rel. error {e['max_rel_err']:.2e} "
                       f"(tolerance {e['tol']:g}), top-10% agreement {e['top10pct_agreement']:.4f}: "
                       f"{e['status']}.")  # fmt: skip
            out.append("")
        out += ["| model | checkpointing | batch | variant | median ms | / vanilla | peak MiB "
                "| step peak above start MiB | optimizer state MiB |",
                "|---|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in s.get("rows", []):
            for v in r["median_ms"]:
                peak = r["peak_mib"][v] if r["peak_mib"] else float("nan")
                above = r["step_peak_above_start_mib"][v] if r["step_peak_above_start_mib"] else float("nan")
                out.append(f"| {r['model']} | {r['checkpointing']} | {'x'.join(map(str, r['batch']))} | {v} | "
                           f"{r['median_ms'][v]:.1f} | {r['ratio_to_vanilla'][v]:.3f} | {peak:.0f} | {above:.0f} | "
                           f"{r['optimizer_state_mib'][v]:.1f} |")  # fmt: skip
        out += _section_error(s)
    out += ["", "Peak MiB is the process's CUDA peak during that step (all four variants' optimizers and the model are "
            "resident at once); the step peak above start is what the step itself adds."]  # fmt: skip
    return "\n".join(out) + "\n"


def _section_error(s: dict) -> list[str]:
    return ["", f"**Section error:** `{s['error']}`"] if s.get("status") == "error" and s.get("error") else []


SECTIONS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "exactness": check_exactness,
    "frozen": check_frozen,
    "step_times": check_step_times,
    "qlora": check_qlora,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code paths in seconds")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10, dry run 2)")
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), default=None, help="run only these sections")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("check_gpu: no CUDA device (use --dry-run to exercise the code on CPU)", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args.dry_run, args.rounds, args.out)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"environment": environment(ctx), "sections": {}, "status": "running", "seconds": 0.0}
    for name in args.only or list(SECTIONS):
        s0 = time.perf_counter()
        try:
            sec = SECTIONS[name](ctx)
        except Exception as err:  # noqa: BLE001 - one section's failure is reported, the others still run
            sec = {"status": "error", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        sec["seconds"] = time.perf_counter() - s0
        result["sections"][name] = sec
        result["seconds"] = time.perf_counter() - t0
        result["status"] = _worst(list(result["sections"].values()))
        _write(args.out, result)
        print(f"check_gpu: {name}: {sec['status']} ({sec['seconds']:.1f} s)", flush=True)
    print(f"check_gpu: {result['status']} in {result['seconds']:.0f} s; wrote {args.out / 'gpu_check.md'}")
    return 0 if result["status"] in ("pass", "skip") else 1


def _write(out: Path, result: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_check.md").write_text(render(result))


if __name__ == "__main__":
    sys.exit(main())
