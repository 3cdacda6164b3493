import pytest
import torch

from fish_lightning.app.classification_data import (
    TASKS,
    DataError,
    PadCollator,
    TextClassificationData,
    read_tsv,
    read_tweets,
    split_file,
    subsample,
)


@pytest.mark.parametrize("task", ["sst2", "cola", "rte", "qnli", "mrpc", "stsb"])
def test_read_every_glue_layout(glue_dir, task):
    spec = TASKS[task]
    rows = read_tsv(spec, split_file(spec, glue_dir, "train"))
    assert len(rows) == 4 and all(len(texts) == len(spec.text_fields) for texts, _ in rows)
    labels = [label for _, label in rows]
    if spec.num_labels == 1:
        assert labels[0] == 4.5
    else:
        assert set(labels) == {0, 1}


def test_task_folder_itself_is_accepted(glue_dir):
    assert split_file(TASKS["sst2"], f"{glue_dir}/SST-2", "dev").name == "dev.tsv"


def test_bad_path_and_columns_and_labels(tmp_path, glue_dir):
    with pytest.raises(DataError, match=r"data.path='/nope/x' does not exist"):
        split_file(TASKS["sst2"], "/nope/x", "train")
    with pytest.raises(DataError, match=r"no train.tsv for task 'rte'"):
        split_file(TASKS["rte"], str(tmp_path), "train")
    bad = tmp_path / "SST-2"
    bad.mkdir()
    (bad / "train.tsv").write_text("text\ty\nhello\t1\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['sentence', 'label'\].*found columns \['text', 'y'\]"):
        read_tsv(TASKS["sst2"], bad / "train.tsv")
    (bad / "train.tsv").write_text("sentence\tlabel\nhello\t7\n")
    with pytest.raises(DataError, match=r"train.tsv:2: label 7 is outside 0..1"):
        read_tsv(TASKS["sst2"], bad / "train.tsv")
    (bad / "train.tsv").write_text("sentence\tlabel\nhello\n")
    with pytest.raises(DataError, match=r"train.tsv:2: 1 fields"):
        read_tsv(TASKS["sst2"], bad / "train.tsv")


def test_subsample_is_seeded_and_order_preserving():
    rows = list(range(100))
    a, b, c = subsample(rows, 10, 0), subsample(rows, 10, 0), subsample(rows, 10, 1)
    assert a == b and a != c and a == sorted(a) and len(a) == 10
    assert subsample(rows, None, 0) == rows and subsample(rows, 500, 0) == rows


def test_tweets_corpus_offline():
    splits = read_tweets()
    assert len(splits["train"]) > 30000 and len(splits["dev"]) > 3000
    assert {label for _, label in splits["dev"]} == {0, 1, 2}


def test_datamodule_tokenizes_caches_and_pads(glue_dir, tmp_path):
    def make():
        return TextClassificationData("rte", path=glue_dir, batch_size=3, cache_dir=str(tmp_path / "cache"),
                                      max_length=16)  # fmt: skip

    dm = make()
    dm.setup()
    assert len(list((tmp_path / "cache").glob("rte-*.pt"))) == 2
    dm2 = make()
    dm2.setup()  # from the cache
    assert torch.equal(dm.splits["train"][0]["input_ids"], dm2.splits["train"][0]["input_ids"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 3
    assert "token_type_ids" in batch and batch["labels"].dtype == torch.long


def test_datamodule_label_count_mismatch_fails_fast(glue_dir):
    with pytest.raises(DataError, match=r"num_labels=3 does not match task 'sst2', which has 2 labels"):
        TextClassificationData("sst2", path=glue_dir, num_labels=3)
    with pytest.raises(DataError, match=r"task 'mnli' is not known: expected one of \["):
        TextClassificationData("mnli")


def test_pad_collate_pads_with_the_tokenizers_pad_id():
    from transformers import AutoTokenizer

    from fish_lightning.adapters.models import minilm_path

    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor(1)},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor(0)}]  # fmt: skip
    b = TextClassificationData("tweets").collate(items)  # MiniLM: [PAD] = 0
    assert type(b) is dict and b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and b["labels"].tolist() == [1, 0]
    roberta_like = AutoTokenizer.from_pretrained(minilm_path(), pad_token="[unused0]")  # pad id 1, as RoBERTa's
    b = PadCollator(roberta_like)(items)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_group_by_length_batches_similar_lengths_and_covers_every_example_once(glue_dir):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (640,), generator=g).tolist()
    data = TextClassificationData("sst2", path=glue_dir, group_by_length=True, batch_size=16, seed=1)
    data.splits = {"train": [{"input_ids": torch.ones(n, dtype=torch.long), "labels": torch.tensor(0)}
                             for n in lengths]}  # fmt: skip
    batches = list(data.train_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == len(lengths)
    padded = sum(b["input_ids"].numel() for b in batches)
    plain = TextClassificationData("sst2", path=glue_dir, batch_size=16, seed=1)
    plain.splits = data.splits
    assert padded < 0.7 * sum(b["input_ids"].numel() for b in plain.train_dataloader())  # less padding
    assert sorted(int(b["attention_mask"].sum()) for b in batches) == sorted(
        int(b["attention_mask"].sum()) for b in data.train_dataloader()
    )  # seeded: the same batches again
    with pytest.raises(DataError, match="group_by_length='yes'"):
        TextClassificationData("sst2", path=glue_dir, group_by_length="yes")


def _sst2_dir(tmp_path, n: int = 20) -> str:
    d = tmp_path / "glue" / "SST-2"
    d.mkdir(parents=True)
    rows = [f"sentence number {i} {'good' if i % 2 else 'bad'}\t{i % 2}" for i in range(n)]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(f"dev {i}\t{i % 2}" for i in range(4)) + "\n")
    return str(tmp_path / "glue")


def test_holdout_validates_on_held_out_training_rows(tmp_path):
    path = _sst2_dir(tmp_path)

    def ids(split: list) -> set:
        return {tuple(x["input_ids"].tolist()) for x in split}

    dm = TextClassificationData("sst2", path=path, holdout=5, subsample_seed=3, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    train, held = ids(dm.splits["train"]), ids(dm.splits["dev"])
    assert len(held) == 5 and len(train) == 15 and not train & held
    plain = TextClassificationData("sst2", path=path)
    plain.setup()
    assert train | held == ids(plain.splits["train"]) and not held & ids(plain.splits["dev"])
    again = TextClassificationData("sst2", path=path, holdout=5, subsample_seed=3)  # same seed: same rows held out
    again.setup()
    assert ids(again.splits["dev"]) == held
    sub = TextClassificationData("sst2", path=path, holdout=5, subsample_seed=3, train_samples=6)
    sub.setup()
    assert len(sub.splits["train"]) == 6 and not ids(sub.splits["train"]) & held
    with pytest.raises(DataError, match=r"holdout=20 leaves no training rows: the train split has 20"):
        TextClassificationData("sst2", path=path, holdout=20).setup()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DataError, match=r"holdout=.* must be null \(validate on dev\) or a number"):
            TextClassificationData("sst2", path=path, holdout=bad)
