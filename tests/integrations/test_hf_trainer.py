"""``FishTrainerCallback`` in Hugging Face's ``Trainer``: exactly k entries, frozen entries bit-identical under AdamW
with weight decay, clipping and gradient accumulation, clipping that sees only kept entries, the exact per-example
Fisher under the Trainer's loss scaling (a tiny BERT + LoRA classifier and a tiny causal LM), checkpoint folders
that resume bit for bit into another output_dir, and refusals by name."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from fish_lightning.adapters.decoders import apply_decoder_peft, build_causal_lm
from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.adapters.tiny import tiny_config
from fish_lightning.core.fisher import per_example_fisher
from fish_lightning.core.selection import num_kept
from fish_lightning.integrations.transformers import STATE_FILE, FishTrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)

VOCAB = 97


def classifier():
    torch.manual_seed(0)
    model = build_sequence_classifier(num_labels=2, tiny_config=tiny_config("bert"))
    model = apply_peft(model, "lora", r=4, lora_alpha=8, target_modules=["query", "value"])
    randomize_lora_b(model)
    return model


def causal_lm():
    torch.manual_seed(0)
    model = apply_decoder_peft(build_causal_lm(tiny_config={**tiny_config("gpt2"), "vocab_size": VOCAB}), r=4,
                               lora_alpha=8)  # fmt: skip
    randomize_lora_b(model)
    return model


def randomize_lora_b(model):
    """LoRA's B starts at 0, which makes every dL/dA exactly 0: give both factors gradients."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def classifier_rows(n=16, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, seq), generator=g)
    lens = torch.randint(4, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None] < lens[:, None]).long()
    labels = (ids[:, 1] > 50).long()
    return [{"input_ids": ids[i] * mask[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def lm_rows(n=16, t=14, seed=0):
    """Right-padded sequences of different lengths; prompt (2-4 tokens) and padding labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    lens = torch.randint(5, t + 1, (n,), generator=g)
    prompt = torch.randint(2, 5, (n,), generator=g)
    pos = torch.arange(t)[None]
    mask = (pos < lens[:, None]).long()
    ids[mask == 0] = 0
    labels = ids.masked_fill((pos < prompt[:, None]) | (mask == 0), -100)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def arguments(out, **overrides):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
                weight_decay=0.01, max_grad_norm=1.0, max_steps=6, save_strategy="no", logging_strategy="no",
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
    return TrainingArguments(**{**base, **overrides})


class Watch(TrainerCallback):
    """After each step: the candidates' values; before each optimizer step: the clipped gradients."""

    def __init__(self, fish):
        self.fish, self.values, self.grads = fish, {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads[state.global_step + 1] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                             if p.grad is not None}  # fmt: skip

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.values[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                          if n in self.fish.masker.params}  # fmt: skip


def test_exact_k_frozen_bit_identical_kept_move_verify(tmp_path):
    model = classifier()
    fish = FishTrainerCallback(sparsity=0.9, warmup_steps=2, mask_epoch=None)
    watch = Watch(fish)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=classifier_rows(), callbacks=[fish, watch])
    trainer.train()
    candidates = sum(p.numel() for p in fish.masker.params.values())
    assert fish.freeze_step == 2
    assert fish.num_kept == num_kept(candidates, 0.9) == sum(int(m.sum()) for m in fish.masks.values())
    at_freeze = watch.values[2]
    for step in range(3, 7):
        for n, mask in fish.masks.items():
            assert torch.equal(watch.values[step][n][~mask], at_freeze[n][~mask]), (step, n)
    moved = sum(int((watch.values[6][n][m] != at_freeze[n][m]).sum()) for n, m in fish.masks.items())
    assert moved > 0.5 * fish.num_kept
    report = fish.verify(model)
    assert report["frozen_unchanged"] and report["kept"] == fish.num_kept and not report["moved"]


def test_clipping_sees_only_kept_entries(tmp_path):
    model = classifier()
    fish = FishTrainerCallback(sparsity=0.8, warmup_steps=1, mask_epoch=None)
    watch = Watch(fish)
    args = arguments(tmp_path, max_grad_norm=0.01, max_steps=3)
    Trainer(model=model, args=args, train_dataset=classifier_rows(), callbacks=[fish, watch]).train()
    for step in (2, 3):
        grads = watch.grads[step]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert abs(float(norm) - 0.01) < 1e-6, (step, float(norm))
        for n, mask in fish.masks.items():
            assert not grads[n][~mask].any(), (step, n)


def reference_fisher(model, rows, params, loss_fn):
    """The batch-size-1 loop over the warmup's examples (parameters as at the start: one warmup step)."""
    fisher, _ = per_example_fisher(loss_fn, stack(rows), params)
    return fisher


def sequence_nll(model):
    """The causal LM's per-example loss: one example = one sequence, mean NLL over its label tokens."""

    def loss_fn(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        target = b["labels"][:, 1:]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none", ignore_index=-100)
        return nll.view(target.shape).sum(1) / (target != -100).sum(1)

    return loss_fn


def rel_err(fisher, reference):
    num = sum(float((fisher[n] - reference[n]).abs().sum()) for n in reference)
    den = sum(float(reference[n].abs().sum()) for n in reference)
    return num / den


def run_warmup_fisher(model, rows, tmp_path, trainer_class=Trainer, **overrides):
    fish = FishTrainerCallback(sparsity=0.5, warmup_steps=1, mask_epoch=None, keep_fisher=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = arguments(tmp_path, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2, **overrides)
    trainer_class(model=model, args=args, train_dataset=rows, callbacks=[fish]).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    return fish


def test_fisher_equals_batch_size_one_loop_classifier(tmp_path):
    model, rows = classifier(), classifier_rows(n=8)
    fish = run_warmup_fisher(model, rows, tmp_path)
    model.eval()

    def loss_fn(b):
        return F.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                               b["labels"], reduction="none")  # fmt: skip

    reference = reference_fisher(model, rows, fish.masker.params, loss_fn)
    assert fish.fisher is not None and set(fish.fisher) == set(reference)
    assert rel_err(fish.fisher, reference) < 1e-4


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fisher_equals_batch_size_one_loop_causal_lm(tmp_path, checkpointing):
    model, rows = causal_lm(), lm_rows(n=8)
    fish = run_warmup_fisher(model, rows, tmp_path, gradient_checkpointing=checkpointing)
    model.eval()

    reference = reference_fisher(model, rows, fish.masker.params, sequence_nll(model))
    assert rel_err(fish.fisher, reference) < 1e-4


class OwnLossTrainer(Trainer):
    """Computes the loss itself, as TRL's ``SFTTrainer`` does: the model gets the labels but not
    ``num_items_in_batch``; the loss is the sum of token NLLs over ``num_items_in_batch`` (the step's tokens)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        logits, target = outputs.logits[:, :-1], inputs["labels"][:, 1:]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum", ignore_index=-100)
        loss = nll / num_items_in_batch
        return (loss, outputs) if return_outputs else loss


def test_fisher_when_a_trainer_subclass_normalises_its_own_loss_by_num_items(tmp_path):
    model, rows = causal_lm(), lm_rows(n=8)
    fish = run_warmup_fisher(model, rows, tmp_path, trainer_class=OwnLossTrainer)
    assert fish._honors_num_items is True
    model.eval()

    reference = reference_fisher(model, rows, fish.masker.params, sequence_nll(model))
    assert rel_err(fish.fisher, reference) < 1e-4


def test_the_trainers_compute_loss_is_its_own_again_after_training(tmp_path):
    model, rows = causal_lm(), lm_rows(n=8)
    fish = FishTrainerCallback(sparsity=0.5, warmup_steps=1, mask_epoch=None)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=rows, callbacks=[fish])
    trainer.train()
    assert "compute_loss" not in vars(trainer)  # the recording wrapper is gone


def test_fisher_when_the_model_ignores_num_items_in_batch(tmp_path):
    """A BERT token classifier takes ``**kwargs`` (so the Trainer passes num_items_in_batch and does not divide)
    but its loss is the mean over its own micro-batch's tokens: recognised, and the Fisher is still exact."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(**tiny_config("bert"), num_labels=3)
    model = apply_peft(BertForTokenClassification(config), "lora", r=4, lora_alpha=8, target_modules=["query", "value"])
    randomize_lora_b(model)
    rows = classifier_rows(n=8)
    for r in rows:
        r["labels"] = (r["input_ids"] % 3).masked_fill(r["attention_mask"] == 0, -100)
    with pytest.warns(UserWarning, match="ignores num_items_in_batch"):
        fish = run_warmup_fisher(model, rows, tmp_path)
    assert fish._honors_num_items is False
    model.eval()

    def loss_fn(b):  # one example = one sequence: mean NLL over its label tokens
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        nll = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none", ignore_index=-100)
        return nll.view(b["labels"].shape).sum(1) / (b["labels"] != -100).sum(1)

    reference = reference_fisher(model, rows, fish.masker.params, loss_fn)
    assert rel_err(fish.fisher, reference) < 1e-4


def test_mask_path_applies_a_saved_mask_before_the_first_step(tmp_path):
    from fish_lightning.core.mask_file import save_mask

    rows = classifier_rows()
    fish = FishTrainerCallback(sparsity=0.9, warmup_steps=1, mask_epoch=None)
    Trainer(model=classifier(), args=arguments(tmp_path / "a", max_steps=2), train_dataset=rows,
            callbacks=[fish]).train()  # fmt: skip
    save_mask(fish.masks, tmp_path / "fish_mask.safetensors")
    given = FishTrainerCallback(warmup_steps=0, mask_epoch=None, mask_path=str(tmp_path / "fish_mask.safetensors"))
    model = classifier()
    Trainer(model=model, args=arguments(tmp_path / "b", max_steps=2), train_dataset=rows, callbacks=[given]).train()
    assert given.freeze_step == 0 and all(torch.equal(fish.masks[n], given.masks[n]) for n in fish.masks)
    assert given.verify(model)["frozen_unchanged"]


def test_mask_epoch_freezes_at_the_start_of_that_epoch(tmp_path):
    fish = FishTrainerCallback(sparsity=0.9, warmup_steps=50, mask_epoch=1)
    args = arguments(tmp_path, max_steps=-1, num_train_epochs=2)  # 16 examples, 4 x 2 per step: 2 steps per epoch
    Trainer(model=classifier(), args=args, train_dataset=classifier_rows(), callbacks=[fish]).train()
    assert fish.freeze_step == 2 and fish.warmup_steps_done == 2


class PlainNet(torch.nn.Module):
    """A model without ``**kwargs``: the Trainer divides its loss by the micro-batches of each step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_fisher_under_division_by_accumulation_with_a_short_last_step(tmp_path):
    """12 examples, 4 per micro-batch, 2 per step: the second step has one micro-batch (divided by 1, not 2).
    learning_rate=0 keeps the parameters where the reference loop evaluates them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=g)
    rows = [{"x": x[i], "labels": (x[i, 0] > 0).long() + (x[i, 1] > 0.5).long()} for i in range(12)]
    model = PlainNet()
    fish = FishTrainerCallback(sparsity=0.5, warmup_steps=2, mask_epoch=None, keep_fisher=True)
    args = arguments(tmp_path, max_steps=2, learning_rate=0.0, weight_decay=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[fish])
    assert not trainer.model_accepts_loss_kwargs
    trainer.train()

    def loss_fn(b):
        return F.cross_entropy(model.body(b["x"]), b["labels"], reduction="none")

    reference = reference_fisher(model, rows, fish.masker.params, loss_fn)
    assert fish.warmup_steps_done == 2 and rel_err(fish.fisher, reference) < 1e-4


def final_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("at", [1, 3])  # mid-warmup (the Fisher so far travels), after the freeze (the mask)
def test_resume_from_checkpoint_folder_into_another_output_dir(tmp_path, at):
    rows = classifier_rows()
    model = classifier()
    fish = FishTrainerCallback(sparsity=0.9, warmup_steps=2, mask_epoch=None)
    args = arguments(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=at)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[fish]).train()
    folder = tmp_path / "a" / f"checkpoint-{at}"
    assert (folder / STATE_FILE).is_file() and (tmp_path / "a" / "checkpoint-6" / STATE_FILE).is_file()
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    assert saved["frozen_at_step"] == (2 if at > 2 else None) and saved["warmup_done"] == min(at, 2)

    model2 = classifier()
    fish2 = FishTrainerCallback(sparsity=0.9, warmup_steps=2, mask_epoch=None)
    args2 = arguments(tmp_path / "b", max_steps=6)
    Trainer(model=model2, args=args2, train_dataset=rows, callbacks=[fish2]).train(resume_from_checkpoint=str(folder))
    assert fish2.freeze_step == 2
    assert all(torch.equal(fish.masks[n], fish2.masks[n]) for n in fish.masks)
    end, end2 = final_state(model), final_state(model2)
    assert all(torch.equal(end[n], end2[n]) for n in end), [n for n in end if not torch.equal(end[n], end2[n])]
    assert fish2.verify(model2)["frozen_unchanged"]


def test_resume_from_a_folder_without_fish_state_is_refused(tmp_path):
    rows = classifier_rows()
    args = arguments(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2)
    Trainer(model=classifier(), args=args, train_dataset=rows).train()
    fish = FishTrainerCallback(sparsity=0.9, warmup_steps=1, mask_epoch=None)
    trainer = Trainer(model=classifier(), args=arguments(tmp_path / "b"), train_dataset=rows, callbacks=[fish])
    with pytest.raises(ValueError, match=STATE_FILE):
        trainer.train(resume_from_checkpoint=os.path.join(tmp_path, "a", "checkpoint-2"))


@pytest.mark.parametrize(("settings", "overrides", "match"), [
    ({}, {"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ({"sparse_optimizer_state": True}, {}, "sparse_optimizer_state"),
    ({"reselect_every_n_steps": 2}, {}, "reselect_every_n_steps"),
    ({"mask_epoch": 3}, {"max_steps": -1, "num_train_epochs": 2}, "mask_epoch=3"),
])  # fmt: skip
def test_refusals_by_name(tmp_path, settings, overrides, match):
    fish = FishTrainerCallback(**{"sparsity": 0.9, "warmup_steps": 1, "mask_epoch": None, **settings})
    trainer = Trainer(model=classifier(), args=arguments(tmp_path, **overrides), train_dataset=classifier_rows(),
                      callbacks=[fish])  # fmt: skip
    with pytest.raises(ValueError, match=match):
        trainer.train()


def test_refuses_fsdp_deepspeed_and_lomo_by_name(tmp_path):
    fish = FishTrainerCallback(sparsity=0.9, warmup_steps=1, mask_epoch=None)
    trainer = Trainer(model=classifier(), args=arguments(tmp_path), train_dataset=classifier_rows(), callbacks=[fish])
    from fish_lightning.integrations.transformers import check_trainer

    trainer.args.fsdp = ["full_shard"]
    with pytest.raises(ValueError, match="FSDP"):
        check_trainer(fish.settings, trainer, torch.optim.AdamW(classifier().parameters()))
    trainer.args.fsdp = []
    trainer.args.optim = "lomo"  # (building it needs lomo_optim; the check reads the name)
    with pytest.raises(ValueError, match="optim='lomo'"):
        check_trainer(fish.settings, trainer, torch.optim.AdamW(classifier().parameters()))
    trainer.is_deepspeed_enabled = True
    with pytest.raises(ValueError, match="DeepSpeed"):
        check_trainer(fish.settings, trainer, torch.optim.AdamW(classifier().parameters()))


def test_bad_setting_is_refused_at_construction():
    with pytest.raises(ValueError, match="sparsity=1.5"):
        FishTrainerCallback(sparsity=1.5)
