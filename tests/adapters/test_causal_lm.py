"""Causal LMs (tiny random GPT-2 and LLaMA) + LoRA on every projection: response-only labels, exact
per-sequence Fisher (hooks == batch-size-1 loop), a fit through the callback, and the Hydra app."""

import copy
import json
import sys
import types
import warnings

import pytest
import torch
from test_config_composition import composed
from test_peft_e2e import TINY
from torch.utils.data import DataLoader

from conftest import SnapshotAtFreeze, make_trainer, params_of
from fish_lightning import FisherMaskCallback
from fish_lightning.adapters.decoders import DECODER_PROJECTIONS, apply_decoder_peft, build_causal_lm
from fish_lightning.adapters.models import build_sequence_classifier
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.app.causal_lm import IGNORE_INDEX, CausalLM, response_nll
from fish_lightning.app.classification_data import DataError
from fish_lightning.app.instruction_data import Example, InstructionData, encode_example, instruction_collate
from fish_lightning.core.fisher import PerExampleSquaredGrads, per_example_fisher, per_example_fisher_hooks

VOCAB = 97
WRAPPED = {"gpt2": 4, "llama": 7}  # LoRA-wrapped layers per block: GPT-2's c_proj is in attn and mlp
CONFIGS = {arch: tiny_config(arch, vocab_size=VOCAB) for arch in ("gpt2", "llama")}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def lm_batch(b=6, t=14, seed=0):
    """Right-padded sequences of different lengths; prompt (2-4 tokens) and padding labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    lens = torch.randint(7, t + 1, (b,), generator=g)
    lens[0] = t
    prompt = torch.randint(2, 5, (b,), generator=g)
    pos = torch.arange(t)[None]
    mask = (pos < lens[:, None]).long()
    ids[mask == 0] = 0
    labels = ids.masked_fill((pos < prompt[:, None]) | (mask == 0), IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loader(n=24, batch=6):
    full = lm_batch(b=n, seed=1)
    rows = [{k: v[i] for k, v in full.items()} for i in range(n)]
    return DataLoader(rows, batch_size=batch, shuffle=False)


def lora_lm(arch, r=4, random_b=True, **cfg):
    model = apply_decoder_peft(build_causal_lm(tiny_config={**CONFIGS[arch], **cfg}), r=r, lora_alpha=2 * r)
    if random_b:  # B starts at 0, which would make every dL/dA exactly 0: give both factors gradients
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return CausalLM(model, lr=1e-2, warmup_ratio=None)


def rel_err(got, ref):
    return max(float((got[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)


# ---------------------------------------------------------------------------------------------- labels / loss
def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_labels_cover_the_response_only(tmp_path):
    rows = [{"instruction": "Say yes.", "input": "", "response": "yes"},
            {"instruction": "Name the colour.", "input": "the sky at noon", "response": "blue sky"}]  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", rows)
    dm = InstructionData(source="jsonl", path=str(tmp_path), tokenizer="minilm", max_length=64)
    dm.setup()
    tok = dm.tokenizer()
    examples, _ = dm.read_examples()
    for item, row, ex in zip(dm.splits["train"], rows, examples):
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        n_prompt = sum(1 for y in labels if y == IGNORE_INDEX)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in labels[n_prompt:]
        assert ids[:n_prompt] == tok(dm.prompt(ex), add_special_tokens=False)["input_ids"]  # no BOS for this tokenizer
        assert labels[n_prompt:] == ids[n_prompt:]  # the response ids themselves, then EOS
        assert ids[-1] == tok.sep_token_id  # MiniLM's tokenizer has no EOS: [SEP] ends responses
        assert tok.decode(ids[n_prompt:-1]) == row["response"]
    assert "input :" not in tok.decode(dm.splits["train"][0]["input_ids"])  # the no-input template
    assert "input : the sky at noon" in tok.decode(dm.splits["train"][1]["input_ids"])
    batch = instruction_collate(pad_id=0)(dm.splits["train"])
    short = int(dm.splits["train"][0]["input_ids"].numel())
    assert batch["input_ids"].shape[1] > short  # the first row is padded ...
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert (batch["input_ids"][0, short:] == 0).all()  # ... with the pad id and label -100


def test_truncation_keeps_the_response_and_bos():
    ids, labels = encode_example([1, 10, 11, 12, 13, 14], [20, 21, 2], max_length=6, keep_first=True)
    assert ids == [1, 13, 14, 20, 21, 2] and labels == [IGNORE_INDEX] * 3 + [20, 21, 2]
    ids, labels = encode_example([10, 11, 12], [20, 21, 22, 23, 2], max_length=4)
    assert ids == [12, 20, 21, 22] and labels == [IGNORE_INDEX, 20, 21, 22]  # response tail cut, 1 prompt token


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_per_sequence_loss_is_the_mean_response_nll(arch):
    module = lora_lm(arch).eval()
    batch = lm_batch()
    losses = module.per_example_loss(batch)
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        row = {k: v[i : i + 1, :n] for k, v in batch.items()}
        hf = module.model(input_ids=row["input_ids"], labels=row["labels"]).loss  # HF: mean over shifted tokens
        torch.testing.assert_close(losses[i], hf, rtol=1e-5, atol=1e-6)
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 3] = logits[0, 1, 1] = logits[0, 2, 4] = 9.0  # argmax after each position: 3, 1, 4
    _, counts, right = response_nll(logits, torch.tensor([[IGNORE_INDEX, 3, 1, 4]]))
    _, _, wrong = response_nll(logits, torch.tensor([[IGNORE_INDEX, 3, 2, 4]]))
    assert counts.tolist() == [3] and right.tolist() == [True] and wrong.tolist() == [False]


# ---------------------------------------------------------------------------------------------- exact Fisher
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_hooks_equal_the_loop_oracle_with_lora_on_every_projection(arch):
    module = lora_lm(arch).eval()
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    wrapped = {n.split(".lora_")[0].split(".")[-1] for n in params}
    assert wrapped == set(DECODER_PROJECTIONS[arch]) and len(params) == 2 * 2 * WRAPPED[arch]  # 2 layers, A and B
    batch = lm_batch()
    ref, _ = per_example_fisher(module.fisher_loss, batch, params)  # sum_b (d loss_b / d theta)^2, one at a time
    assert all(float(f.max()) > 0 for f in ref.values())

    # warmup: the training loss (batch mean) through one backward, hooks scaled by n^2 as the callback does
    hooks = PerExampleSquaredGrads(module, params).attach()
    n = batch["input_ids"].shape[0]
    hooks.start_batch(n, float(n) ** 2)
    module.per_example_loss(batch).mean().backward()
    hooks.finish_batch()
    hooks.detach()
    assert hooks.uncovered == [] and hooks.missed == set()  # no fallback: exact from the hooks themselves
    assert not hooks.unseen({k: p.grad for k, p in params.items()})
    assert rel_err(hooks.sums, ref) < 1e-5

    # calibration: fisher_loss (per-sequence losses) through per_example_fisher_hooks
    got, seen = per_example_fisher_hooks(module.fisher_loss, batch, module, params)
    assert seen == n and rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_full_finetuning_tied_embeddings_are_exact_and_uncovered_layers_fall_back(arch):
    """Tied input/output embeddings (both archs here) are exact through the hooks; GPT-2's Conv1D layers and
    LLaMA's RMSNorm have no rule of their own and go through the general (torch.func) rule, and GPT-2's
    batch-shared position embedding has its broadcast output expanded per example: all exact, nothing left to
    the loop."""
    model = build_causal_lm(tiny_config={**CONFIGS[arch], "tie_word_embeddings": True})
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    module = CausalLM(model).eval()
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    batch = lm_batch()
    ref, _ = per_example_fisher(module.fisher_loss, batch, params)
    hooks = PerExampleSquaredGrads(module, params).attach()
    hooks.start_batch(batch["input_ids"].shape[0])
    grads = torch.autograd.grad(module.fisher_loss(batch).sum(), [params[k] for k in hooks.covered])
    hooks.finish_batch()
    hooks.detach()
    hooks.missed.update(hooks.unseen(dict(zip(hooks.covered, grads))))
    tied = "model.transformer.wte.weight" if arch == "gpt2" else "model.model.embed_tokens.weight"
    assert hooks.uncovered == [] and hooks.missed == set()
    general = hooks.fallback_modules  # module names on the general rule: GPT-2's Conv1D, LLaMA's RMSNorm
    assert general and all(("ln_" not in n and ".h." in n) if arch == "gpt2" else "norm" in n for n in general)
    exact = {k: hooks.sums[k] for k in hooks.covered if k not in hooks.missed}
    assert tied in exact and rel_err(exact, {k: ref[k] for k in exact}) < 1e-5
    got, _ = per_example_fisher_hooks(module.fisher_loss, batch, module, params)  # calibration's path
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_fit_through_the_callback(arch):
    module = lora_lm(arch)
    loader = lm_loader()
    first = next(iter(loader))
    fresh = copy.deepcopy(module).eval()
    oracle, _ = per_example_fisher(fresh.fisher_loss, first, {n: p for n, p in fresh.named_parameters()
                                                             if p.requires_grad})  # fmt: skip
    cb = FisherMaskCallback(sparsity=0.9, warmup_steps=1, mask_epoch=1, keep_fisher=True, strict=True)
    snap = SnapshotAtFreeze(cb)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "FISH: per-example Fisher is not exact")  # no fallback allowed
        make_trainer([cb, snap], max_epochs=2).fit(module, loader, loader)
    assert cb.estimator_in_use == "per_example"
    assert rel_err(cb.fisher, oracle) < 1e-5  # warmup step 1 = the first batch at the initial weights
    n = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert set(cb.masks) == set(oracle) and cb.num_candidates == n and cb.num_kept == round(0.1 * n)
    final = params_of(module)
    for name, m in cb.masks.items():
        assert torch.equal(final[name][~m], snap.at_freeze[name][~m]), name
    assert any(not torch.equal(final[k][m], snap.at_freeze[k][m]) for k, m in cb.masks.items())
    assert cb.verify(module)["frozen_unchanged"]
    metrics = module.trainer.callback_metrics
    assert 1.0 < float(metrics["val/perplexity"]) < 10 * VOCAB and 0.0 <= float(metrics["val/exact_match"]) <= 1.0
    assert float(metrics["val/loss"]) > 0


# ---------------------------------------------------------------------------------------------- app / configs
def test_projections_are_every_linear_layer_but_the_head():
    for arch in CONFIGS:
        ours = apply_decoder_peft(build_causal_lm(tiny_config=CONFIGS[arch]), r=2)
        peft_all = apply_decoder_peft(build_causal_lm(tiny_config=CONFIGS[arch]), r=2, target_modules="all-linear")
        names = [{n for n, p in m.named_parameters() if p.requires_grad} for m in (ours, peft_all)]
        assert names[0] == names[1] and len(names[0]) == 2 * 2 * WRAPPED[arch]
        layer = next(m for n, m in ours.named_modules() if n.endswith("mlp.c_fc" if arch == "gpt2" else "mlp.up_proj"))
        assert layer.fan_in_fan_out is (arch == "gpt2")


def test_experiment_runs_through_the_app(tmp_path, glue_dir):
    from fish_lightning.app.train import run

    overrides = ["experiment=causal_lm_lora_fish", "data=sst2_instruct", f"data.path={glue_dir}",
                 "fish.warmup_steps=1", "logger=none",
                 "data.batch_size=2", "data.eval_batch_size=4", "trainer.enable_progress_bar=false"]  # fmt: skip
    cfg = composed(overrides, tmp_path)
    assert cfg.model.name == "tiny_llama" and cfg.peft.target_modules == "projections"
    record = run(cfg, tmp_path / "run", overrides)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok" and saved["task"] == "sst2_instruct"
    assert saved["primary_metric"] == "val/loss" and saved["primary_metric_mode"] == "min"
    # r=8 on 32-wide layers (k, v: 16 wide), 2 layers x (q 512 + k 384 + v 384 + o 512 + gate, up, down 768 each)
    assert saved["candidates"] == 8192
    assert saved["kept"] == round(0.1 * 8192) == record["kept"] and saved["always_trained"] == 0
    assert {"val/loss", "val/perplexity", "val/exact_match"} <= set(saved["metrics"])


def test_instruction_sources_and_tiny_llama_compose(tmp_path, glue_dir):
    cfg = composed(["model=tiny_llama", "peft=lora_decoder", "data=sst2_instruct", f"data.path={glue_dir}"], tmp_path)
    from hydra.utils import instantiate

    model = instantiate(cfg.peft)(instantiate(cfg.model.net))
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 2 * 7
    dm = instantiate(cfg.data)
    train, dev = dm.read_examples()
    assert [e.response for e in train] == ["positive", "negative", "positive", "negative"]  # conftest's GLUE rows
    assert train[0].instruction.startswith("Classify the sentiment") and train[0].input == "a fine film"
    for opt, source in (("alpaca", "hub"), ("instruct_jsonl", "jsonl")):  # hub / user data: compose only
        assert composed(["model=tiny_gpt2", "peft=lora_decoder", f"data={opt}"], tmp_path).data.source == source
    single = write_jsonl(tmp_path / "all.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(10)])
    dm = InstructionData(source="jsonl", path=str(single), instruction_field="q", response_field="a",
                         input_field=None, val_fraction=0.2)  # fmt: skip
    train, dev = dm.read_examples()
    assert len(train) == 8 and len(dev) == 2 and not {e.instruction for e in train} & {e.instruction for e in dev}


def test_hub_source_maps_fields_and_holds_out_validation(monkeypatch):
    rows = [{"instruction": f"task {i}", "input": "" if i % 2 else f"x{i}", "output": f"y{i}"} for i in range(20)]
    calls = []

    def load_dataset(path, split):  # stands in for datasets.load_dataset (no network in tests)
        calls.append((path, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dm = InstructionData(source="hub", path="tatsu-lab/alpaca", response_field="output", val_fraction=0.1)
    train, dev = dm.read_examples()
    assert calls == [("tatsu-lab/alpaca", "train")] and (len(train), len(dev)) == (18, 2)
    assert Example("task 0", "x0", "y0") in train + dev and Example("task 1", "", "y1") in train + dev
    dm = InstructionData(source="hub", path="org/data", val_split="test", response_field="missing")
    with pytest.raises(DataError, match=r"org/data\[train\]\[0\]: missing field\(s\) \['missing'\]"):
        dm.read_examples()


def test_bad_input_names_the_value(tmp_path, glue_dir):
    with pytest.raises(DataError, match=r"source='csv' is not valid: expected one of \('jsonl', 'hub', 'sst2', "
                                        r"'tweets'\)"):  # fmt: skip
        InstructionData(source="csv", path="x")
    with pytest.raises(DataError, match="max_length=1 must be an integer >= 2"):
        InstructionData(source="sst2", max_length=1)
    with pytest.raises(DataError, match=r"prompt_template='\{prompt\}' is not a valid template"):
        InstructionData(source="sst2", prompt_template="{prompt}")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field\(s\) \['response'\]"):
        InstructionData(source="jsonl", path=str(bad)).read_examples()
    with pytest.raises(DataError, match="does not exist"):
        InstructionData(source="jsonl", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="model_type='bert'"):
        apply_decoder_peft(build_sequence_classifier(tiny_config=TINY))
    with pytest.raises(ValueError, match="peft method 'ia3' is not supported on decoders"):
        apply_decoder_peft(build_causal_lm(tiny_config=CONFIGS["gpt2"]), method="ia3")

    from fish_lightning.app.train import ConfigError, train

    for overrides, message in (
        (["model=tiny_gpt2", "peft=lora_decoder", "data=tweets"], "model=tiny_gpt2 is a causal LM but data=tweets"),
        (["model=tiny_gpt2", "peft=lora", "data=sst2_instruct", f"data.path={glue_dir}"], "use peft=lora_decoder"),
        (["model=tiny_bert", "data=sst2_instruct", f"data.path={glue_dir}"], "model=tiny_bert is a classifier"),
        (["model=tiny_bert", "peft=lora_decoder"], "peft=lora_decoder is for causal LMs"),
    ):
        cfg = composed(overrides, tmp_path)
        with pytest.raises(ConfigError, match=message):
            train(cfg, tmp_path)
