"""Sparse adapter export: save only the trained entries, reload / merge them exactly."""

import inspect
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_peft_e2e import token_batches as e2e_token_batches

from conftest import make_trainer
from fish_lightning import FisherMaskCallback
from fish_lightning.adapters.export import (
    DenseFallbackWarning,
    decode_indices,
    encode_indices,
    load_sparse,
    load_sparse_into_base,
    merge_sparse,
    read_sparse,
    safetensors_nbytes,
    save_sparse,
)
from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.adapters.seeded_init import canonical_names, init_values, recorded_seed, seeded_init_
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.app.classifier import SequenceClassifier

ROOT = Path(__file__).resolve().parents[2]
LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"])
BASE_SEED, INIT_SEED = 0, 1234

TINY = tiny_config("bert")


def token_batches(n=32, **kw):
    return e2e_token_batches(n=n, **kw)


def base(seed=BASE_SEED):
    return build_sequence_classifier(num_labels=2, tiny_config=TINY, seed=seed)


def peft_model(method="lora", seed=INIT_SEED, **overrides):
    model = apply_peft(base(), method, **{**LORA, **overrides})
    if seed is not None:
        seeded_init_(model, seed)
    return model


def train(method="lora", **fish):
    """A LoRA/DoRA tiny BERT trained through lightning.Trainer with FISH; returns (module, callback)."""
    module = SequenceClassifier(peft_model(method), num_labels=2, lr=1e-2, warmup_ratio=None)
    fish = {"sparsity": 0.9, "warmup_steps": 0, "mask_epoch": None, "calibration_samples": 16, **fish}
    cb = FisherMaskCallback(**fish)
    make_trainer([cb], max_epochs=1, limit_val_batches=0, limit_train_batches=4).fit(module, token_batches())
    return module, cb


@torch.no_grad()
def logits(model):
    batch = next(iter(token_batches(n=8)))
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module", params=["lora", "dora"])
def trained(request):
    module, cb = train(request.param)
    return request.param, module, cb


def max_diff(a, b):
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------ seeded_init_
def test_seeded_init_independent_of_global_rng_and_visiting_order():
    torch.manual_seed(1)
    a = apply_peft(base(), "dora", **LORA)  # peft draws A from the global RNG: differs between a and b
    torch.manual_seed(2)
    b = apply_peft(base(), "dora", **LORA)
    state = torch.get_rng_state()
    seeded_init_(a, 7)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG neither read nor advanced
    torch.manual_seed(99)
    seeded_init_(b, 7, include="value")  # another order: value layers first, then the rest
    seeded_init_(b, 7, include="query")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    adapter = [n for n in pa if "lora_" in n]
    assert adapter and all(torch.equal(pa[n], pb[n]) for n in adapter)
    assert recorded_seed(a) == 7
    # peft's default distribution: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0
    for n in adapter:
        if "lora_A" in n:
            assert 0 < float(pa[n].detach().abs().max()) <= 1 / math.sqrt(pa[n].shape[1])
        if "lora_B" in n:
            assert float(pa[n].detach().abs().max()) == 0.0
    # init_values rebuilds exactly the values seeded_init_ wrote (magnitudes included), without the model changing
    canon = canonical_names(a)
    ref = init_values(a, 7)
    assert len(ref) == len(adapter) and all(torch.equal(pa[n], ref[canon[n]]) for n in adapter)
    seeded_init_(b, 8)
    assert not torch.equal(pa[adapter[0]], dict(b.named_parameters())[adapter[0]])


def test_seeded_init_rejects_unreproducible_inits_and_ignores_plain_models():
    with pytest.raises(ValueError, match="init_lora_weights='olora'"):
        seeded_init_(apply_peft(base(), "lora", init_lora_weights="olora", **LORA), 0)
    plain = base()
    before = {n: p.clone() for n, p in plain.named_parameters()}
    seeded_init_(plain, 0)  # no LoRA layers: nothing to do
    assert all(torch.equal(before[n], p) for n, p in plain.named_parameters())


# ------------------------------------------------------------------------------------------ round trip
def test_reload_and_merge_reproduce_the_trained_logits(trained, tmp_path):
    method, module, cb = trained
    path = tmp_path / "adapter.safetensors"
    report = save_sparse(module, cb.masks, path)
    assert report["dense_fallback"] == []
    assert set(report["encodings"]) >= set(cb.masks)
    assert any(report["encodings"][n] in ("bitmask", "gaps") for n in cb.masks)
    want = logits(module.model)
    start = {f"model.{n}": p for n, p in peft_model(method).named_parameters()}  # fit-start state
    now = dict(module.named_parameters())
    moved = [n for n, m in cb.masks.items() if not torch.equal(now[n][m], start[n][m])]
    assert moved and max_diff(logits(peft_model(method)), want) > 1e-4

    loaded = load_sparse_into_base(path, base())
    trained_params = dict(module.model.named_parameters())
    for n, p in loaded.named_parameters():  # every parameter bit-identical, adapter and base
        assert torch.equal(p, trained_params[n]), n
    assert max_diff(logits(loaded), want) < 1e-5

    wrapped = apply_peft(base(), method, **LORA)  # caller-built model, peft's random init: load overwrites it
    assert max_diff(logits(load_sparse(path, wrapped)), want) < 1e-5

    merged = merge_sparse(path, base())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    # merging folds B @ A (and DoRA's rescaling) into W: same function, float ops in another order
    assert max_diff(logits(merged), want) < 1e-5


def test_file_is_density_plus_index_overhead_of_the_dense_adapter(trained, tmp_path):
    _, module, cb = trained
    report = save_sparse(module, cb.masks, tmp_path / "sparse.safetensors")
    named = dict(module.named_parameters())
    canon = canonical_names(module)
    saved = [n for n, p in named.items() if p.requires_grad or n in cb.masks]
    dense_path = tmp_path / "dense.safetensors"
    save_file({canon[n]: named[n].detach().contiguous() for n in saved}, str(dense_path))
    dense_bytes = dense_path.stat().st_size
    assert report["dense_bytes"] == dense_bytes
    assert report["bytes"] == (tmp_path / "sparse.safetensors").stat().st_size

    masked = sum(named[n].numel() for n in cb.masks)
    head = sum(named[n].numel() for n in saved if n not in cb.masks)
    density = (cb.num_kept + head) / (masked + head)  # the head trains densely
    sparse = [n for n in cb.masks if report["encodings"][n] in ("bitmask", "gaps")]
    assert sparse and report["value_bytes"] == 4 * sum(int(cb.masks[n].sum()) for n in sparse)
    # index bytes: per partially kept tensor, at most the bitmask (1 bit per entry) or 4 bytes per kept entry
    index_bound = sum(min(math.ceil(m.numel() / 8), 4 * int(m.sum())) for m in cb.masks.values() if not m.all())
    assert report["index_bytes"] <= index_bound
    data = report["value_bytes"] + report["index_bytes"] + report["dense_tensor_bytes"]
    assert data <= 4 * (cb.num_kept + head) + index_bound  # = density * dense data + index overhead
    with open(tmp_path / "sparse.safetensors", "rb") as f:
        assert report["header_bytes"] == struct.unpack("<Q", f.read(8))[0]
    assert report["bytes"] <= density * dense_bytes + index_bound + report["header_bytes"] + 8
    assert report["ratio"] == pytest.approx(report["bytes"] / dense_bytes)


def test_metadata_is_json_with_config_seed_shapes_and_encodings(trained, tmp_path):
    method, module, cb = trained
    path = tmp_path / "a.safetensors"
    save_sparse(module, cb.masks, path, metadata={"task": "sst2"})
    meta, tensors = read_sparse(path)
    assert meta["init_seed"] == INIT_SEED and meta["peft_config"]["r"] == LORA["r"]
    assert meta["peft_config"]["use_dora"] is (method == "dora")
    canon = canonical_names(module)
    for n, m in cb.masks.items():
        spec = meta["tensors"][canon[n]]
        if spec["encoding"] != "dense":
            assert spec["shape"] == list(m.shape) and spec["kept"] == int(m.sum())
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert header["__metadata__"]["task"] == "sst2"


# ------------------------------------------------------------------------------------------ fallbacks
def test_dense_warmup_without_rewind_falls_back_to_dense_and_still_reloads(tmp_path):
    module, cb = train("lora", warmup_steps=2, calibration_samples=None)  # dense steps move frozen entries
    path = tmp_path / "a.safetensors"
    with pytest.warns(DenseFallbackWarning, match="frozen entries differ") as record:
        report = save_sparse(module, cb.masks, path)
    assert len([w for w in record if w.category is DenseFallbackWarning]) == 1  # once, naming all
    moved = [n for n in cb.masks if 0 < int(cb.masks[n].sum()) < cb.masks[n].numel()]
    assert moved and set(moved) <= set(report["dense_fallback"])
    assert all(report["encodings"][n] == "dense" for n in report["dense_fallback"])
    assert max_diff(logits(load_sparse_into_base(path, base())), logits(module.model)) < 1e-5


def test_unknown_seed_stores_lora_A_dense_but_B_sparse(trained, tmp_path):
    _, module, cb = trained
    path = tmp_path / "a.safetensors"
    with pytest.warns(DenseFallbackWarning):
        report = save_sparse(module, cb.masks, path, init_seed=INIT_SEED + 1)  # wrong seed: A cannot be rebuilt
    assert report["dense_fallback"] and all("lora_A" in n for n in report["dense_fallback"])
    assert max_diff(logits(load_sparse_into_base(path, base())), logits(module.model)) < 1e-5


@pytest.mark.skipif(
    "rewind_frozen" not in inspect.signature(FisherMaskCallback).parameters,
    reason="FisherMaskCallback(rewind_frozen=...) is not available yet",
)
def test_rewind_frozen_after_dense_warmup_stores_sparse(tmp_path):
    module, cb = train("lora", warmup_steps=2, calibration_samples=None, rewind_frozen=True)
    path = tmp_path / "a.safetensors"
    report = save_sparse(module, cb.masks, path)
    assert report["dense_fallback"] == []
    assert max_diff(logits(load_sparse_into_base(path, base())), logits(module.model)) < 1e-5


def random_masks(model, pattern, density=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if pattern in n}


@torch.no_grad()
def fake_training(model, masks, seed=3):
    """Move the kept entries and every other trainable tensor, as training would."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if n in masks:
            p[masks[n]] += torch.randn(int(masks[n].sum()), generator=g)
        elif p.requires_grad:
            p += 0.1


@pytest.mark.parametrize("method", ["pissa", "ia3"])
def test_other_deterministic_peft_inits_use_base_model_as_reference(method, tmp_path):
    from peft import IA3Config, LoraConfig, get_peft_model

    if method == "pissa":  # A/B from the SVD of W, W replaced by the residual: deterministic, no seed
        config = LoraConfig(task_type="SEQ_CLS", init_lora_weights="pissa", **LORA)
    else:  # ia3_l starts at ones
        ffn = ["output.dense"]
        config = IA3Config(task_type="SEQ_CLS", target_modules=["value", *ffn], feedforward_modules=ffn)
    model = get_peft_model(base(), config)
    masks = random_masks(model, "lora_" if method == "pissa" else "ia3_")
    fake_training(model, masks)
    with pytest.warns(DenseFallbackWarning, match="no reference"):
        report = save_sparse(model, masks, tmp_path / "dense.safetensors")  # seeded_init_ does not know them
    assert sorted(report["dense_fallback"]) == sorted(masks)
    report = save_sparse(model, masks, tmp_path / "a.safetensors", base_model=base())
    assert report["dense_fallback"] == [] and all(report["encodings"][n] != "dense" for n in masks)
    loaded = load_sparse_into_base(tmp_path / "a.safetensors", base())
    trained_params = dict(model.named_parameters())
    assert all(torch.equal(p, trained_params[n]) for n, p in loaded.named_parameters())
    assert max_diff(logits(loaded), logits(model)) < 1e-5


def test_full_fine_tuning_from_a_lightning_module_loads_into_the_bare_model(tmp_path):
    module = SequenceClassifier(base(), num_labels=2)  # no peft: names are "model.bert..."
    masks = random_masks(module, "encoder.layer.0", density=0.1)
    fake_training(module, masks)
    report = save_sparse(module, masks, tmp_path / "a.safetensors", base_model=base())
    assert report["dense_fallback"] == [] and report["ratio"] < 1
    loaded = load_sparse(tmp_path / "a.safetensors", base())  # names matched without the "model." prefix
    assert max_diff(logits(loaded), logits(module.model)) < 1e-5
    with pytest.raises(ValueError, match="differs from the exporter's"):  # frozen entries come from another base
        load_sparse(tmp_path / "a.safetensors", base(seed=BASE_SEED + 1))


# ------------------------------------------------------------------------------------------ errors
def test_load_errors_name_the_problem(trained, tmp_path):
    method, module, cb = trained
    path = tmp_path / "a.safetensors"
    save_sparse(module, cb.masks, path)
    with pytest.raises(ValueError, match=r"lora_A\.default\.weight' has shape \[4, 32\].*\[8, 32\]"):
        load_sparse(path, apply_peft(base(), method, **{**LORA, "r": 8}))
    with pytest.raises(ValueError, match="are not parameters of the model"):
        load_sparse(path, apply_peft(base(), method, **{**LORA, "target_modules": ["key"]}))
    with pytest.raises(ValueError, match="base weights differ"):
        load_sparse_into_base(path, base(seed=BASE_SEED + 1))
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a fish sparse export"):
        load_sparse(plain, base())
    with pytest.raises(ValueError, match="must be a bool tensor of shape"):
        save_sparse(module, {n: m.float() for n, m in cb.masks.items()}, tmp_path / "b.safetensors")


def test_load_leaves_the_global_rng_alone(trained, tmp_path):
    _, module, cb = trained
    path = tmp_path / "a.safetensors"
    save_sparse(module, cb.masks, path)
    state = torch.get_rng_state()
    load_sparse_into_base(path, base())
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------ encoding
@pytest.mark.parametrize(
    ("density", "encoding", "dtype"),
    [(0.01, "gaps", torch.uint16), (0.1, "gaps", torch.uint8), (0.5, "bitmask", torch.uint8)],
)
def test_index_encoding_choice(density, encoding, dtype):
    n = 100_000
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: int(density * n)]] = True
    enc, index = encode_indices(mask.view(100, 1000))
    assert (enc, index.dtype) == (encoding, dtype)
    assert index.numel() * index.element_size() < math.ceil(n / 8) or enc == "bitmask"
    assert torch.equal(decode_indices(enc, index, n), mask.nonzero().reshape(-1))


def test_index_encoding_edge_cases():
    far = torch.zeros(200_000, dtype=torch.bool)
    far[[0, 199_999]] = True  # a gap beyond uint16
    enc, index = encode_indices(far)
    assert (enc, index.dtype) == ("gaps", torch.uint32)
    assert decode_indices(enc, index, far.numel()).tolist() == [0, 199_999]
    one = torch.zeros(5, dtype=torch.bool)
    one[4] = True
    assert decode_indices(*encode_indices(one), 5).tolist() == [4]


def test_safetensors_nbytes_is_exact(tmp_path):
    tensors = {
        "a": torch.zeros(3, 5),
        "b:gaps": torch.zeros(7, dtype=torch.uint8),
        "c:gaps": torch.zeros(2, dtype=torch.int64).to(torch.uint16),
        "d": torch.zeros(4, dtype=torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"k": json.dumps({"x": [1, "é"]})})
    spec = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    assert safetensors_nbytes(spec, {"k": json.dumps({"x": [1, "é"]})}) == path.stat().st_size


# ------------------------------------------------------------------------------------------ size script
def test_export_size_script_prints_the_table():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_size.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "density" in out and "ratio" in out
    rows = [line.split() for line in out.splitlines() if line.strip().endswith(("x2", "x6", "x8")) or "%" in line]
    rows = [r for r in rows if r[0].endswith("%")]
    assert [r[0] for r in rows] == ["1.00%", "10.00%", "50.00%"]
    assert all(r[5] == "yes" for r in rows)  # reloaded exactly
    ratios = [float(r[4]) for r in rows]
    assert ratios == sorted(ratios) and ratios[-1] < 1
    assert "gaps" in " ".join(rows[0]) and "bitmask" in " ".join(rows[2])
