"""``pooling="mean"``: the head reads the attention-masked token mean (what sentence-transformers checkpoints
were trained for) instead of BERT's first-token pooler."""

import pytest
import torch

from fish_lightning.adapters.models import apply_peft, build_sequence_classifier
from fish_lightning.adapters.pooling import MeanPooler
from fish_lightning.adapters.tiny import tiny_config

TINY_BERT = tiny_config("bert")


def test_mean_pooling_is_the_masked_token_mean_and_ignores_padding():
    model = build_sequence_classifier(num_labels=3, tiny_config=TINY_BERT, seed=0, pooling="mean").eval()
    assert isinstance(model.bert.pooler, MeanPooler) and not list(model.bert.pooler.parameters())
    ids = torch.tensor([[1, 20, 21, 2, 0, 0], [1, 23, 24, 25, 26, 2]])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        assert torch.allclose(logits, model.classifier(mean), atol=1e-6)
        alone = model(input_ids=ids[:1, :4], attention_mask=mask[:1, :4]).logits  # the same example unpadded
    assert torch.allclose(logits[:1], alone, atol=1e-5)


def test_mean_pooling_under_peft_trains_the_adapter_and_head_only():
    model = apply_peft(build_sequence_classifier(num_labels=2, tiny_config=TINY_BERT, pooling="mean"), "lora", r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    ids = torch.randint(3, 100, (2, 5))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "classifier" in n and p.requires_grad)


def test_pooling_is_validated():
    with pytest.raises(ValueError, match=r"pooling='max' is not supported: expected one of \('cls', 'mean'\)"):
        build_sequence_classifier(num_labels=2, tiny_config=TINY_BERT, pooling="max")
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fish_lightning.adapters.pooling import use_mean_pooling

    roberta = RobertaForSequenceClassification(RobertaConfig(**TINY_BERT, num_labels=2))
    with pytest.raises(ValueError, match=r"RobertaForSequenceClassification has none: use pooling='cls'"):
        use_mean_pooling(roberta)
