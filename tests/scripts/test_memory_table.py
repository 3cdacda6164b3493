"""scripts/memory_table.py: its counts on a tiny LLaMA (checked by hand), its computed verdicts, its
allocation measurement, that the counts are what the callback actually allocates in a run (the
Fisher, into which the per-example hooks add directly; masks; compact optimizer state) and what the
hooks hold under FSDP2's scatter path, and that docs/memory_7b.md's FSDP2 figures are the script's."""

import gc
import importlib.util
import math
import sys
import weakref
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_causal_lm import lm_batch, lm_loader

from conftest import make_trainer
from fish_lightning import FisherMaskCallback
from fish_lightning.adapters.decoders import apply_decoder_peft, build_causal_lm
from fish_lightning.app.causal_lm import CausalLM
from fish_lightning.core.fisher import PerExampleSquaredGrads

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "memory_table.py"
spec = importlib.util.spec_from_file_location("memory_table", SCRIPT)
memory_table = importlib.util.module_from_spec(spec)
sys.modules["memory_table"] = memory_table  # dataclasses look their module up there
spec.loader.exec_module(memory_table)

# hidden 8, MLP 12, 2 layers; vocab 97 so that test_causal_lm's token batches fit (embeddings are no candidates)
TINY = dict(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=97)  # fmt: skip
# LoRA r=2, by hand, per layer: q/k/v/o: A [2, 8] + B [8, 2] = 32 each; gate/up: A [2, 8] + B [12, 2] = 40 each;
# down: A [2, 12] + B [8, 2] = 40. 248 per layer, 496 in 28 tensors. Bit-packed: ceil(16/8) = 2, ceil(24/8) = 3 bytes
# per tensor -> q/k/v/o 4 x (2 + 2) + gate/up 2 x (2 + 3) + down (3 + 2) = 31 per layer.
N, TENSORS, PACKED = 496, 28, 62
# FSDP2: one module call (one LoRA matrix, an nn.Linear) at a time; the largest, down's A or gate/up's B: 24 entries
CALL, GATE_B = 4 * 24, "base_model.model.model.layers.0.mlp.gate_proj.lora_B.default"  # the first of them
DOC = Path(__file__).resolve().parents[2] / "docs" / "memory_7b.md"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def test_counts_on_a_tiny_llama_match_hand_computed_numbers():
    model = memory_table.build_meta_lora_llama(TINY, r=2)
    shapes = memory_table.candidate_shapes(model)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"] == (2, 12)
    mem = memory_table.fish_memory(shapes, (0.9, 0.99), (2,))
    assert (mem.candidates, mem.tensors, mem.largest) == (N, TENSORS, 24)
    assert mem.fisher_fp32 == mem.lora_fp32 == 4 * N == 1984
    assert (mem.call_buffer_fp32, mem.call_module) == (CALL, GATE_B)
    # per_example adds into cb.fisher (no second buffer): half of AdamW's exp_avg + exp_avg_sq
    assert mem.warmup_per_example == mem.warmup_batch_grad == 1984 and mem.adamw_dense == 3968
    assert mem.adamw_steps == 4 * TENSORS
    assert mem.mask_bool == N and mem.mask_packed == PACKED
    # k = round(0.1 * 496) = round(49.6) = 50; round(0.01 * 496) = round(4.96) = 5
    # int32 indices (4 B x k); the dense masked step's two indices of the smaller side: 2 x 4 B x min(k, n - k)
    assert mem.sparse[0.9] == {"kept": 50, "state": 400, "indices": 200, "values": 200, "dense_indices": 400}
    assert mem.sparse[0.99] == {"kept": 5, "state": 40, "indices": 20, "values": 20, "dense_indices": 40}
    # FSDP2 on 2 ranks: every dim 0 (2, 8 or 12) halves -> 248 local entries; plus one call's whole buffer
    assert mem.fsdp2[2] == {"fisher": 992, "call_buffer": CALL, "warmup": 992 + CALL, "adamw": 1984}
    peak = memory_table.FreezePeak(peak=N + 100, after=N, events=1)
    page = memory_table.render(mem, "tiny", "cmd", None, peak)
    assert '**Warmup, `fisher_estimator="per_example"` (default), one process or DDP: yes.**' in page
    assert "(4 B/candidate; the hooks add into it, no second buffer) is 1/2 of AdamW's dense state" in page
    assert "**Warmup, `per_example`, FSDP2 on 2 ranks (per rank): yes.**" in page  # 1088 B vs 1984 B
    assert "= 0.0 MiB, 0.548x the rank's AdamW shard" in page
    assert f"the largest call here is `{GATE_B}` (24 entries)" in page
    assert "whole-shaped per-step sums" not in page and "leave that step out" not in page
    assert "the Fisher restarts from zero" in page and "`batch_grad` adds after the step's check" in page
    assert "**After the freeze, dense optimizer state: yes**" in page and "are 1/8 of AdamW's" in page
    # sparse state: cb.masks derived from the int32 indices: the indices alone, half the compact state (20 B vs 40 B)
    assert "**After the freeze, `sparse_optimizer_state=True`, sparsity 0.99: yes.**" in page
    assert "the indices alone (0.0 MiB, 0.0403 B/candidate), below the compact AdamW state" in page  # 20 B / 496
    # what bool masks + int32 indices cost (0.1.0): 696 B vs 400 B, 516 B vs 40 B
    assert "1.74x that state (no)" in page and "12.9x that state (no)" in page
    assert "**After the freeze, dense masked step, sparsity 0.99: yes.**" in page  # 496 + 40 B vs 3968 B
    # every table row states its verdict against AdamW's state
    rows = [ln for ln in page.splitlines() if ln.startswith("| ") and not ln.startswith("| what")
            and not ln.startswith("| sparsity") and not ln.startswith("| ranks")]  # fmt: skip
    assert len(rows) == 3 + 2 + 2 + 1
    assert all("**yes**" in ln or "**no**" in ln for ln in rows), rows
    assert "**At the freeze (transient, measured on CPU): yes.**" in page  # 1984 + 596 B vs 3968 B
    assert "**At the freeze under DDP (per rank, counted from the code path): no.**" in page  # 2 x 1984 B
    assert "(8 B/candidate), equal to AdamW's dense state" in page
    # the verdicts follow the numbers: a larger selection peak turns the freeze's verdict
    page = memory_table.render(mem, "tiny", "cmd", None, memory_table.FreezePeak(peak=2000, after=N, events=1))
    assert "**At the freeze (transient, measured on CPU): no.**" in page


def test_allocation_peak_replays_allocations_and_frees():
    x = torch.rand(10_000)

    def work():
        kept = x > 0.5  # 10,000 B, returned
        tmp = (x * 2).cumsum(0)  # 40,000 B for the product, 40,000 B for its cumsum, both freed
        del tmp
        return kept

    peak, kept = memory_table.allocation_peak(work)
    assert kept.dtype == torch.bool and peak.after == 10_000
    assert 90_000 <= peak.peak < 90_100  # (plus a few 0-dim scalars)


def test_measured_freeze_peak_is_the_masks_plus_small_temporaries():
    shapes = {f"t{i}": (16, 64) if i % 2 else (64, 16) for i in range(20)}  # 20,480 entries
    peak = memory_table.measure_freeze_peak(shapes, sparsity=0.9)
    assert peak.after == 20_480  # the bool masks
    # one tensor's temporaries at a time: at most 17 B/entry of one 1,024-entry tensor (bools; the tied
    # entries' int64 running count and its int64 copy); a concatenation would add 4 B x 20,480 alone
    assert peak.peak <= 20_480 + 20 * 1024


class _Probe(pl.Callback):
    """Records what the FISH callback holds: warmup accumulators and, at the end of training, the
    optimizer state and compact tensors (place it before that callback; private attributes on purpose:
    this test pins the script's counts to the callback's actual allocations)."""

    def __init__(self, fish: FisherMaskCallback) -> None:
        self.fish, self.fisher_bytes, self.warmup_bytes, self.direct = fish, set(), set(), set()
        self.state_bytes = self.steps = self.index_bytes = self.value_bytes = None
        self.accumulators: list[weakref.ref] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.fish.fisher is not None and not self.fish.frozen:
            self.fisher_bytes.add(_nbytes(self.fish.fisher.values()))
            hooks = self.fish.warmup.hooks  # PerExampleSquaredGrads while attached
            self.direct.add(hooks.direct if hooks else None)
            # every distinct fp32 buffer FISH holds in warmup (Fisher and hooks' sums, counted once by storage)
            buffers = [*self.fish.fisher.values(), *(hooks.sums.values() if hooks else ())]
            self.warmup_bytes.add(_nbytes({t.untyped_storage().data_ptr(): t for t in buffers}.values()))
            self.accumulators = [weakref.ref(t) for t in buffers]

    def on_train_end(self, trainer, pl_module) -> None:  # before teardown removes the compact optimizer
        opt = trainer.optimizers[0]
        self.state_bytes = _nbytes(v for st in opt.state.values() for v in st.values())
        self.steps = 4 * len(opt.state)
        compact = getattr(self.fish.enforcer, "compact", [])  # CompactState's sparse_state.CompactOptimizers
        pairs = [pair for c in compact for pair in c.pairs]
        self.index_bytes, self.value_bytes = _nbytes(i for _, i, _ in pairs), _nbytes(c for _, _, c in pairs)
        self.resident_index_bytes = sum(c.index_bytes for c in compact)
        self.guard_index_bytes = sum(g.index_bytes for g in getattr(self.fish.enforcer, "guards", []))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _one_backward(model, hooks) -> dict:
    """One forward + backward of an LM batch through ``hooks``; returns what multi-call modules buffered."""
    batch = lm_batch()
    hooks.start_batch(batch["input_ids"].shape[0])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.autograd.grad(out.loss, list(hooks._params.values()))
    pending = dict(hooks._pending)
    hooks.finish_batch()
    hooks.detach()
    return pending


def test_fsdp2_scatter_path_holds_one_module_calls_buffer():
    """FSDP2's path without processes (``warmup.attach``: ``into=`` the shard-shaped Fisher, ``scatter=`` a
    reduce-scatter; here rank 0's rows of one rank): the shards are the table's, each call scatters the
    module's candidates whole-shaped, and the whole-shaped buffers alive at once never exceed the table's."""
    model = apply_decoder_peft(build_causal_lm(tiny_config={"model_type": "llama", **TINY}), r=2, lora_alpha=4)
    with torch.no_grad():  # B starts at 0, which would make every dL/dA exactly 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    shapes = memory_table.candidate_shapes(model)
    mem = memory_table.fish_memory(shapes, (0.9,), (2,))
    params = dict(model.named_parameters())
    candidates = {n: params[n] for n in shapes}
    owned = [list(o.values()) for _, _, o in PerExampleSquaredGrads(model, candidates)._rules]  # per module
    assert all(len(o) == 1 for o in owned)  # LoRA: A and B are each an nn.Linear
    calls = {o[0].rpartition(".")[0]: math.prod(shapes[o[0]]) for o in owned}
    assert calls == memory_table.module_calls(shapes)
    rows = {n: -(-s[0] // 2) for n, s in shapes.items()}  # rank 0's rows (torch.chunk)
    shards = {n: torch.zeros(rows[n], *s[1:]) for n, s in shapes.items()}
    assert _nbytes(shards.values()) == mem.fsdp2[2]["fisher"]
    live, seen, peak = [], [], 0

    def scatter(name):
        def part(whole):
            nonlocal live, peak
            assert whole.shape == shapes[name] and whole.dtype == torch.float32
            live = [(r, b) for r, b in live if r() is not None] + [(weakref.ref(whole), _nbytes([whole]))]
            peak = max(peak, sum(b for _, b in live))
            seen.append(name)
            return whole[: rows[name]].clone()

        return part

    hooks = PerExampleSquaredGrads(model, candidates).attach(into=shards, scatter={n: scatter(n) for n in shapes})
    assert not _one_backward(model, hooks)  # no multi-call module: nothing buffered until the end of the backward
    assert sorted(seen) == sorted(shapes) and not hooks.missed  # one call per LoRA matrix, each scattered once
    assert peak == mem.call_buffer_fp32 == CALL  # one call's candidates at a time, whole-shaped
    ref = PerExampleSquaredGrads(model, candidates).attach()  # unsharded: whole-shaped sums
    _one_backward(model, ref)
    assert all(bool(s.ne(0).any()) for s in ref.sums.values())
    for n in shapes:
        torch.testing.assert_close(shards[n], ref.sums[n][: rows[n]], rtol=1e-6, atol=0)


def test_the_7b_doc_has_the_scripts_fsdp2_figures():
    """LLaMA-2-7B + LoRA r=16 on the meta device: under FSDP2 the per-example warmup per rank (Fisher shard +
    one call's buffer: the largest LoRA matrix, 16 x 11,008 entries) is below the rank's AdamW shard, and
    docs/memory_7b.md states exactly the script's FSDP2 rows and verdicts."""
    shapes = memory_table.candidate_shapes(memory_table.build_meta_lora_llama(memory_table.LLAMA2_7B, r=16))
    mem = memory_table.fish_memory(shapes)
    n = mem.candidates
    assert mem.call_buffer_fp32 == 4 * 16 * 11008 == 4 * max(memory_table.module_calls(shapes).values())
    for w in (2, 8):  # every dim 0 (16, 4,096 or 11,008) divides by 2 and 8: shards are n / w
        d = mem.fsdp2[w]
        assert (d["fisher"], d["adamw"]) == (4 * n // w, 8 * n // w)
        assert d["warmup"] == d["fisher"] + mem.call_buffer_fp32 < d["adamw"]
    page, doc = memory_table.render(mem, "7b", "cmd", None, None), DOC.read_text()
    lines = [ln for ln in page.splitlines() if "FSDP2 on" in ln or ln.startswith(("| 2 |", "| 8 |"))]
    assert len(lines) == 4 and all("**yes**" in ln or ": yes.**" in ln for ln in lines), lines
    missing = [ln for ln in lines if ln not in doc.splitlines()]
    assert not missing, f"docs/memory_7b.md is stale (scripts/memory_table.py --out docs/memory_7b.md): {missing}"


@pytest.mark.parametrize("sparse_state", [False, True])
def test_counts_are_what_the_callback_allocates(sparse_state):
    model = apply_decoder_peft(build_causal_lm(tiny_config={"model_type": "llama", **TINY}), r=2, lora_alpha=4)
    module = CausalLM(model, lr=1e-2, warmup_ratio=None)
    mem = memory_table.fish_memory(memory_table.candidate_shapes(module.model), (0.9,))
    cb = FisherMaskCallback(sparsity=0.9, warmup_steps=2, mask_epoch=None, sparse_optimizer_state=sparse_state)
    probe = _Probe(cb)
    make_trainer([probe, cb], max_epochs=1, limit_val_batches=0).fit(module, lm_loader())
    # per_example (the default): the hooks add into cb.fisher, so warmup holds the Fisher only
    assert cb.estimator_in_use == "per_example" and probe.direct == {True}
    assert probe.fisher_bytes == probe.warmup_bytes == {mem.warmup_per_example}
    gc.collect()
    assert probe.accumulators and all(ref() is None for ref in probe.accumulators)  # freed after the freeze
    assert _nbytes(cb.masks.values()) == mem.mask_bool
    assert sum(t.numel() for t in cb.state_dict()["masks"].values()) == mem.mask_packed
    assert cb.fisher is None and cb.num_kept == mem.sparse[0.9]["kept"]
    if not sparse_state:
        assert (probe.state_bytes - probe.steps, probe.steps) == (mem.adamw_dense, mem.adamw_steps)
        assert probe.index_bytes == probe.value_bytes == 0
        assert probe.guard_index_bytes == mem.sparse[0.9]["dense_indices"] // 2  # the guard's index; mask_gradients'
        return
    assert probe.state_bytes - probe.steps == mem.sparse[0.9]["state"]
    assert (probe.index_bytes, probe.value_bytes) == (mem.sparse[0.9]["indices"], mem.sparse[0.9]["values"])
    assert probe.resident_index_bytes == mem.sparse[0.9]["indices"]  # int32, no mask in CompactOptimizer
