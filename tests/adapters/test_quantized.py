"""LoRA on a quantized base (QLoRA): a tiny random LLaMA whose block projections are 4-bit (NF4) or 8-bit
(LLM.int8) ``bitsandbytes`` layers, loaded through transformers' ``BitsAndBytesConfig``
(:func:`fish_lightning.adapters.decoders.build_causal_lm`'s ``quantization``). bitsandbytes runs these
layers on CPU. The LoRA factors are plain ``nn.Linear`` and the quantized base layer holds no trainable
parameter, so the per-example rules need nothing new: hooks Fisher = batch-size-1 loop, frozen entries
bit-identical through the callback, and ``fish-train model.net.quantization=4bit``."""

import copy
import json
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from test_causal_lm import CONFIGS, WRAPPED, lm_batch, lm_loader, rel_err  # noqa: E402
from test_config_composition import composed  # noqa: E402

from conftest import SnapshotAtFreeze, make_trainer, params_of  # noqa: E402
from fish_lightning import FisherMaskCallback  # noqa: E402
from fish_lightning.adapters.decoders import QUANTIZATIONS, apply_decoder_peft, build_causal_lm  # noqa: E402
from fish_lightning.app.causal_lm import CausalLM  # noqa: E402
from fish_lightning.core.fisher import PerExampleSquaredGrads, per_example_fisher, per_example_fisher_hooks  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # bitsandbytes' CPU notes (optional 'kernels' package, int8 casts inputs to fp16): not ours to fix
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

LAYER = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


def qlora_lm(quantization, r=4):
    model = apply_decoder_peft(build_causal_lm(tiny_config=CONFIGS["llama"], quantization=quantization),
                               r=r, lora_alpha=2 * r)  # fmt: skip
    g = torch.Generator().manual_seed(1)  # B starts at 0 (dL/dA = 0): give both factors gradients
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return CausalLM(model, lr=1e-2, warmup_ratio=None)


def base_layers(module):
    return [m.base_layer for m in module.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_base_is_quantized_and_frozen(quantization):
    module = qlora_lm(quantization)
    bases = base_layers(module)
    assert len(bases) == 2 * WRAPPED["llama"]
    assert all(isinstance(b, getattr(bnb.nn, LAYER[quantization])) for b in bases)
    assert all(not p.requires_grad for b in bases for p in b.parameters())
    assert {b.weight.dtype for b in bases} == {torch.uint8 if quantization == "4bit" else torch.int8}
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * WRAPPED["llama"] and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_hooks_equal_the_loop_on_a_quantized_base(quantization):
    module = qlora_lm(quantization).eval()
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    batch = lm_batch()
    n = batch["input_ids"].shape[0]
    ref, seen_ref = per_example_fisher(module.fisher_loss, batch, params)
    assert seen_ref == n and all(float(f.max()) > 0 for f in ref.values())

    # warmup's path: the batch-mean training loss through one backward, hooks scaled by n^2 as the callback does
    hooks = PerExampleSquaredGrads(module, params).attach()
    hooks.start_batch(n, float(n) ** 2)
    module.per_example_loss(batch).mean().backward()
    hooks.finish_batch()
    hooks.detach()
    assert hooks.uncovered == [] and hooks.missed == set() and hooks.fallback_modules == []
    assert not hooks.unseen({k: p.grad for k, p in params.items()})
    assert rel_err(hooks.sums, ref) < 1e-4

    got, seen = per_example_fisher_hooks(module.fisher_loss, batch, module, params)  # calibration's path
    assert seen == n and rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_fit_through_the_callback_on_a_quantized_base(quantization):
    module = qlora_lm(quantization)
    loader = lm_loader()
    first = next(iter(loader))
    # the oracle in training mode, as the warmup runs (no dropout here): bitsandbytes' 8-bit layer computes
    # differently in eval mode (measured: 2% apart), a property of the layer, not of the Fisher
    fresh = copy.deepcopy(module).train()
    oracle, _ = per_example_fisher(fresh.fisher_loss, first, {n: p for n, p in fresh.named_parameters()
                                                             if p.requires_grad})  # fmt: skip
    quantized_before = [b.weight.detach().clone() for b in base_layers(module)]
    cb = FisherMaskCallback(sparsity=0.9, warmup_steps=1, mask_epoch=1, keep_fisher=True, strict=True)
    snap = SnapshotAtFreeze(cb)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "FISH: per-example Fisher is not exact")  # no fallback allowed
        make_trainer([cb, snap], max_epochs=2).fit(module, loader, loader)
    assert cb.estimator_in_use == "per_example"
    assert rel_err(cb.fisher, oracle) < 1e-4  # warmup step 1 = the first batch at the initial weights
    n = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert set(cb.masks) == set(oracle) and cb.num_candidates == n and cb.num_kept == round(0.1 * n)
    assert sum(int(m.sum()) for m in cb.masks.values()) == cb.num_kept
    final = params_of(module)
    for name, m in cb.masks.items():
        assert torch.equal(final[name][~m], snap.at_freeze[name][~m]), name  # frozen entries bit-identical
    assert any(not torch.equal(final[k][m], snap.at_freeze[k][m]) for k, m in cb.masks.items())
    assert cb.verify(module)["frozen_unchanged"]
    for b, before in zip(base_layers(module), quantized_before, strict=True):  # the quantized base never moves
        assert torch.equal(b.weight, before)
    assert float(module.trainer.callback_metrics["val/loss"]) > 0


def test_fish_train_with_a_4bit_base(tmp_path, glue_dir):
    from fish_lightning.app.train import run

    overrides = ["experiment=causal_lm_lora_fish", "model.net.quantization=4bit", "data=sst2_instruct",
                 f"data.path={glue_dir}", "fish.warmup_steps=1", "logger=none", "data.batch_size=2",
                 "data.eval_batch_size=4",
                 "trainer.enable_progress_bar=false"]  # fmt: skip
    cfg = composed(overrides, tmp_path)
    assert cfg.model.name == "tiny_llama" and cfg.model.net.quantization == "4bit"
    record = run(cfg, tmp_path / "run", overrides)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok"
    assert saved["candidates"] == 8192  # LoRA r=8 on every projection, as on the fp32 base (test_causal_lm)
    assert saved["kept"] == round(0.1 * 8192) == record["kept"] and saved["always_trained"] == 0
    assert "val/loss" in saved["metrics"]


def test_bad_quantization_names_the_value():
    message = r"quantization='2bit' is not valid: expected null or one of \('4bit', '8bit'\)"
    with pytest.raises(ValueError, match=message):
        build_causal_lm(tiny_config=CONFIGS["llama"], quantization="2bit")


def test_a_validation_pass_leaves_training_gradients_alone():
    """bitsandbytes' CPU inference repacking (eval mode, no input gradient) rewrites 4-bit weights in place and
    then gives wrong training gradients; build_causal_lm turns it off (measured: ~100% off without that)."""
    module = qlora_lm("4bit")
    batch = lm_batch()
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}

    def grads():
        module.train().zero_grad()
        module.per_example_loss(batch).mean().backward()
        return {n: p.grad.clone() for n, p in params.items()}

    before = grads()
    with torch.no_grad():
        module.eval().per_example_loss(batch)
    after = grads()
    assert all(torch.equal(before[n], after[n]) for n in params)
