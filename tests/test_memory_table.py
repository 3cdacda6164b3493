"""scripts/memory_table.py: its counts on a tiny LLaMA (checked by hand), and that they are what the
callback actually allocates in a run (Fisher accumulators, masks, compact optimizer state)."""

import importlib.util
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import make_trainer
from fish_lightning import FisherMaskCallback
from fish_lightning.causal_lm import CausalLM
from fish_lightning.decoders import apply_decoder_peft, build_causal_lm
from test_causal_lm import lm_loader

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_table.py"
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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run fastest on one thread (two spin-wait under CPU contention); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_counts_on_a_tiny_llama_match_hand_computed_numbers():
    model = memory_table.build_meta_lora_llama(TINY, r=2)
    shapes = memory_table.candidate_shapes(model)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"] == (2, 12)
    mem = memory_table.fish_memory(shapes, (0.9, 0.99))
    assert (mem.candidates, mem.tensors) == (N, TENSORS)
    assert mem.fisher_fp32 == mem.hook_sums_fp32 == mem.lora_fp32 == 4 * N == 1984
    assert mem.warmup_per_example == mem.adamw_dense == 3968 and mem.adamw_steps == 4 * TENSORS
    assert mem.mask_bool == N and mem.mask_packed == PACKED
    # k = round(0.1 * 496) = round(49.6) = 50; round(0.01 * 496) = round(4.96) = 5
    assert mem.sparse[0.9] == {"kept": 50, "state": 400, "indices": 400, "values": 200}
    assert mem.sparse[0.99] == {"kept": 5, "state": 40, "indices": 40, "values": 20}
    page = memory_table.render(mem, "tiny", "cmd", None, None)
    assert '**Warmup, `fisher_estimator="per_example"` (default): no, equal.**' in page
    assert "sparsity 0.99: no.** The bool masks (0.0 MiB) are 12.40x" in page  # 496 B vs 40 B


class _Probe(pl.Callback):
    """Records what the FISH callback holds: warmup accumulators and, at the end of training, the
    optimizer state and compact tensors (place it before that callback; private attributes on purpose:
    this test pins the script's counts to the callback's actual allocations)."""

    def __init__(self, fish: FisherMaskCallback) -> None:
        self.fish, self.fisher_bytes, self.hook_bytes = fish, set(), set()
        self.state_bytes = self.steps = self.index_bytes = self.value_bytes = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.fish.fisher is not None and not self.fish.frozen:
            self.fisher_bytes.add(_nbytes(self.fish.fisher.values()))
            hooks = self.fish._per_example  # PerExampleSquaredGrads while attached
            self.hook_bytes.add(_nbytes(hooks.sums.values()) if hooks else 0)

    def on_train_end(self, trainer, pl_module) -> None:  # before teardown removes the compact optimizer
        opt = trainer.optimizers[0]
        self.state_bytes = _nbytes(v for st in opt.state.values() for v in st.values())
        self.steps = 4 * len(opt.state)
        pairs = [pair for c in self.fish._compact for pair in c.pairs]  # sparse_state.CompactOptimizer
        self.index_bytes, self.value_bytes = _nbytes(i for _, i, _ in pairs), _nbytes(c for _, _, c in pairs)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("sparse_state", [False, True])
def test_counts_are_what_the_callback_allocates(sparse_state):
    model = apply_decoder_peft(build_causal_lm(tiny_config={"model_type": "llama", **TINY}), r=2, lora_alpha=4)
    module = CausalLM(model, lr=1e-2, warmup_ratio=None)
    mem = memory_table.fish_memory(memory_table.candidate_shapes(module.model), (0.9,))
    cb = FisherMaskCallback(sparsity=0.9, warmup_steps=2, mask_epoch=None, sparse_optimizer_state=sparse_state)
    probe = _Probe(cb)
    make_trainer([probe, cb], max_epochs=1, limit_val_batches=0).fit(module, lm_loader())
    assert probe.fisher_bytes == {mem.fisher_fp32} and probe.hook_bytes == {mem.hook_sums_fp32}
    assert _nbytes(cb.masks.values()) == mem.mask_bool
    assert sum(t.numel() for t in cb.state_dict()["masks"].values()) == mem.mask_packed
    assert cb.fisher is None and cb.num_kept == mem.sparse[0.9]["kept"]
    if not sparse_state:
        assert (probe.state_bytes - probe.steps, probe.steps) == (mem.adamw_dense, mem.adamw_steps)
        assert probe.index_bytes == probe.value_bytes == 0
        return
    assert probe.state_bytes - probe.steps == mem.sparse[0.9]["state"]
    assert (probe.index_bytes, probe.value_bytes) == (mem.sparse[0.9]["indices"], mem.sparse[0.9]["values"])
