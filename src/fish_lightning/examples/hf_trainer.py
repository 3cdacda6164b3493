"""FISH-Tuning in Hugging Face's ``Trainer``: a tiny random BERT + LoRA classifier on synthetic data (CPU, seconds,
offline).

    python examples/hf_trainer.py [--output-dir DIR]

Trains 4 dense warmup steps (their per-example Fisher picks the kept 10% of the LoRA entries), then 8 masked steps
with a checkpoint at step 8, and resumes from that checkpoint folder into another output directory.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from fish_lightning.integrations.transformers import FishTrainerCallback


def tiny_lora_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            modules_to_save=["classifier"]))  # fmt: skip


def synthetic_rows(n: int = 64, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """Label 1 when token 7 occurs in the sequence."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (n, seq), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": (ids[i] == 7).any().long()} for i in range(n)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None, help="where checkpoints go (default: a temporary folder)")
    out = parser.parse_args().output_dir or tempfile.mkdtemp(prefix="fish_hf_")
    torch.set_num_threads(1)  # a tiny model runs fastest on one thread
    rows = synthetic_rows()

    def arguments(output_dir: str) -> TrainingArguments:
        return TrainingArguments(output_dir=output_dir, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                 learning_rate=5e-3, weight_decay=0.01, max_grad_norm=1.0, max_steps=12,
                                 save_strategy="steps", save_steps=8, logging_steps=4, report_to=[], use_cpu=True,
                                 disable_tqdm=True)  # fmt: skip

    model = tiny_lora_bert()
    fish = FishTrainerCallback(sparsity=0.9, warmup_steps=4, mask_epoch=None)
    Trainer(model=model, args=arguments(f"{out}/run"), train_dataset=rows, callbacks=[fish]).train()
    print(f"kept {fish.num_kept:,} of {fish.num_candidates:,} LoRA entries, frozen at step {fish.freeze_step}; "
          f"verify: {fish.verify(model)['frozen_unchanged']}")

    resumed_model = tiny_lora_bert()
    resumed = FishTrainerCallback(sparsity=0.9, warmup_steps=4, mask_epoch=None)
    trainer = Trainer(model=resumed_model, args=arguments(f"{out}/resumed"), train_dataset=rows, callbacks=[resumed])
    trainer.train(resume_from_checkpoint=f"{out}/run/checkpoint-8")
    same_mask = all(torch.equal(fish.masks[n], resumed.masks[n]) for n in fish.masks)
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))
    print(f"resumed from {out}/run/checkpoint-8: same mask {same_mask}, same final weights {same}")


if __name__ == "__main__":
    main()
