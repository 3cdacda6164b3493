"""Instruction/response data for causal LMs: JSONL files, a hub dataset, or GLUE SST-2 as text.

Each example becomes ``prompt + response + EOS`` token ids; ``labels`` copy the response (and EOS)
ids and are ``-100`` on the prompt and on padding, so the loss is on response tokens only. Sources:

* ``jsonl``: ``path`` is a ``.jsonl`` file (a seeded ``val_fraction`` of it is held out) or a
  directory with ``train.jsonl`` and one of ``dev.jsonl`` / ``validation.jsonl`` / ``val.jsonl``.
  Each line is an object with the ``instruction_field``, ``response_field`` and, optionally,
  ``input_field`` keys.
* ``hub``: ``path`` is a Hugging Face dataset id (needs ``pip install datasets`` and a network),
  e.g. ``tatsu-lab/alpaca`` (``response_field: output``).
* ``sst2``: GLUE SST-2 (``path`` = a GLUE directory or its ``SST-2`` folder, read in place; ``None``
  = ``$FISH_GLUE_DIR``, else the hub): instruction :data:`SST2_INSTRUCTION`, input = the sentence, response =
  ``positive`` / ``negative``.
* ``tweets``: the packaged tweet corpus (offline, no ``path``): instruction :data:`TWEETS_INSTRUCTION`, input = the
  tweet, response = ``negative`` / ``neutral`` / ``positive``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from fish_lightning.app.causal_lm import IGNORE_INDEX, CausalLM
from fish_lightning.app.classification_data import (
    TASKS,
    DataError,
    glue_dir,
    read_hub,
    read_tsv,
    read_tweets,
    split_file,
    subsample,
)
from fish_lightning.app.data_order import ResumableDataMixin, ResumableOrder

SOURCES = ("jsonl", "hub", "sst2", "tweets")
SST2_INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."
TWEETS_INSTRUCTION = "Classify the sentiment of this tweet as negative, neutral or positive."
SST2_RESPONSES = ("negative", "positive")  # label id -> response text
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
_VAL_FILES = ("dev.jsonl", "validation.jsonl", "val.jsonl")


@dataclass(frozen=True)
class Example:
    """One instruction example (``input`` may be empty)."""

    instruction: str
    input: str
    response: str


def read_jsonl(file: Path, instruction_field: str, response_field: str, input_field: str | None) -> list[Example]:
    """Examples from a JSONL file; a line lacking a required field is an error naming it."""
    out = []
    with open(file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file}:{lineno}: not a JSON object ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{file}:{lineno}: expected a JSON object, got {type(row).__name__}")
            out.append(_example(row, instruction_field, response_field, input_field, f"{file}:{lineno}"))
    if not out:
        raise DataError(f"{file}: no examples")
    return out


def _example(
    row: dict[str, Any], instruction_field: str, response_field: str, input_field: str | None, where: str
) -> Example:
    missing = [f for f in (instruction_field, response_field) if row.get(f) is None]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; found {sorted(row)} (set data.instruction_field / "
            "data.response_field to the names this data uses)"
        )
    extra = row.get(input_field) if input_field else None
    return Example(str(row[instruction_field]), "" if extra is None else str(extra), str(row[response_field]))


def split_rows(rows: list[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded ``(train, val)`` split holding out ``max(1, round(val_fraction * n))`` rows."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction!r} must be a number with 0 < val_fraction < 1")
    if len(rows) < 2:
        raise DataError(f"cannot split {len(rows)} example(s) into train and validation")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = min(len(rows) - 1, max(1, round(val_fraction * len(rows))))
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [rows[i] for i in sorted(val)]


def encode_example(
    prompt_ids: list[int], response_ids: list[int], max_length: int, keep_first: bool = False
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``prompt + response`` within ``max_length`` tokens.

    The response (which should end with EOS) keeps at most ``max_length - 1`` tokens (its tail is cut);
    the prompt is cut from the left to fit (its first token, e.g. BOS, kept when ``keep_first``).
    """
    response = response_ids[: max_length - 1]
    room = max_length - len(response)
    prompt = prompt_ids
    if len(prompt) > room:
        prompt = prompt[:1] + prompt[len(prompt) - room + 1 :] if keep_first and room >= 2 else prompt[-room:]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + list(response)


def instruction_collate(pad_id: int):
    """Collate ``{"input_ids", "labels"}`` items: right-pad ids with ``pad_id``, labels with -100."""

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(int(it["input_ids"].shape[0]) for it in items)
        n = len(items)
        ids = torch.full((n, length), pad_id, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        for i, it in enumerate(items):
            m = int(it["input_ids"].shape[0])
            ids[i, :m], mask[i, :m], labels[i, :m] = it["input_ids"], 1, it["labels"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


class InstructionData(ResumableDataMixin, pl.LightningDataModule):
    """Tokenised instruction/response train and validation splits for :class:`~fish_lightning.app.causal_lm.CausalLM`.

    Args:
        source: one of :data:`SOURCES` (see the module doc).
        path: the JSONL file/directory, hub dataset id, or GLUE directory (``sst2``; ``None`` = hub).
        task: name of the task in results (e.g. ``sst2_instruct``).
        tokenizer: directory or hub id for ``AutoTokenizer`` (``"minilm"``: the packaged MiniLM's).
        instruction_field, input_field, response_field: JSONL/hub field names (``input_field`` optional;
            ``None`` ignores inputs).
        instruction: ``sst2``'s instruction text (default :data:`SST2_INSTRUCTION`).
        prompt_template, prompt_template_no_input: ``str.format`` templates with ``{instruction}`` and
            ``{input}``; the second is used when an example's input is empty.
        max_length: tokens per example (prompt + response + EOS), ``>= 2``.
        train_samples, val_samples: seeded subsample sizes (``None`` = all).
        train_split, val_split: hub split names; ``val_split=None`` holds out ``val_fraction`` of train
            (also for a single JSONL file).
        add_bos: prepend the tokenizer's BOS (``None``: when it has one distinct from EOS, e.g. LLaMA).
    """

    metrics = CausalLM.metrics  # first = primary (val/loss, lower is better)
    primary_metric_mode = "min"

    def __init__(
        self,
        source: str = "jsonl",
        path: str | None = None,
        task: str = "instruct",
        tokenizer: str = "minilm",
        instruction_field: str = "instruction",
        input_field: str | None = "input",
        response_field: str = "response",
        instruction: str | None = None,
        prompt_template: str = PROMPT_TEMPLATE,
        prompt_template_no_input: str = PROMPT_TEMPLATE_NO_INPUT,
        max_length: int = 128,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        train_samples: int | None = None,
        val_samples: int | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.1,
        add_bos: bool | None = None,
        seed: int = 0,
        subsample_seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise DataError(f"source={source!r} is not valid: expected one of {SOURCES}")
        if source in ("jsonl", "hub") and not path:
            raise DataError(f"source={source!r} needs data.path (a JSONL file/directory or a hub dataset id)")
        for name, value, least in (("max_length", max_length, 2), ("batch_size", batch_size, 1),
                                   ("eval_batch_size", eval_batch_size, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DataError(f"{name}={value!r} must be an integer >= {least}")
        for name, template in (
            ("prompt_template", prompt_template),
            ("prompt_template_no_input", prompt_template_no_input),
        ):
            try:
                template.format(instruction="", input="")
            except (KeyError, IndexError, ValueError) as err:
                raise DataError(
                    f"{name}={template!r} is not a valid template: use only {{instruction}} and {{input}} ({err!r})"
                ) from None
        self.source, self.path, self.task, self.tokenizer_name = source, path, task, tokenizer
        self.fields = (instruction_field, response_field, input_field)
        self.instruction = instruction or (TWEETS_INSTRUCTION if source == "tweets" else SST2_INSTRUCTION)
        self.templates = (prompt_template, prompt_template_no_input)
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.train_samples, self.val_samples = train_samples, val_samples
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.add_bos, self.seed, self.num_workers = add_bos, seed, num_workers
        self.subsample_seed = seed if subsample_seed is None else subsample_seed
        self.splits: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.pad_id = 0
        self.order = ResumableOrder(seed)  # training order that resumes mid-epoch
        self.truncated = 0
        if source == "tweets" and path is not None:
            raise DataError(f"data={task} reads the packaged tweet corpus and takes no data.path (got {str(path)!r}): "
                            "use data=instruct_jsonl data.path=<your JSONL file> for your own data")  # fmt: skip
        if source == "sst2":
            self.path = path = glue_dir(path, f"data={task}")
        if source == "sst2" and path is not None:
            for split in ("train", "dev"):  # fail fast on a bad path, before any model work
                split_file(TASKS["sst2"], path, split)
        elif source == "jsonl":
            self._jsonl_files()

    # ------------------------------------------------------------------ reading
    def _jsonl_files(self) -> tuple[Path, Path | None]:
        root = Path(str(self.path)).expanduser()
        if root.is_file():
            return root, None
        if root.is_dir():
            train = root / "train.jsonl"
            if not train.is_file():
                raise DataError(f"data.path={str(self.path)!r} is a directory without train.jsonl")
            val = next((root / f for f in _VAL_FILES if (root / f).is_file()), None)
            return train, val
        raise DataError(f"data.path={str(self.path)!r} does not exist (expected a .jsonl file or a directory)")

    def read_examples(self) -> tuple[list[Example], list[Example]]:
        """``(train, val)`` examples from the configured source (before subsampling)."""
        fields = self.fields
        if self.source == "sst2":
            task = TASKS["sst2"]

            def rows(split: str) -> list[Example]:
                raw = read_hub(task, split) if self.path is None else read_tsv(task, split_file(task, self.path, split))
                return [Example(self.instruction, texts[0].strip(), SST2_RESPONSES[int(y)]) for texts, y in raw]

            return rows("train"), rows("dev")
        if self.source == "tweets":
            labels, split = TASKS["tweets"].labels, read_tweets(seed=0)

            def tweets(name: str) -> list[Example]:
                return [Example(self.instruction, texts[0].strip(), labels[int(y)]) for texts, y in split[name]]

            return tweets("train"), tweets("dev")
        if self.source == "jsonl":
            train_file, val_file = self._jsonl_files()
            train = read_jsonl(train_file, *fields)
            if val_file is not None:
                return train, read_jsonl(val_file, *fields)
            return split_rows(train, self.val_fraction, self.subsample_seed)
        return self._read_hub()

    def _read_hub(self) -> tuple[list[Example], list[Example]]:
        try:
            import datasets
        except ImportError as err:
            raise DataError(f"source='hub' (data.path={self.path!r}) needs `pip install datasets`") from err

        def load(split: str) -> list[Example]:
            ds = datasets.load_dataset(self.path, split=split)
            return [_example(dict(r), *self.fields, f"{self.path}[{split}][{i}]") for i, r in enumerate(ds)]

        train = load(self.train_split)
        if self.val_split is not None:
            return train, load(self.val_split)
        return split_rows(train, self.val_fraction, self.subsample_seed)

    def prompt(self, ex: Example) -> str:
        template = self.templates[0] if ex.input else self.templates[1]
        return template.format(instruction=ex.instruction, input=ex.input)

    # ------------------------------------------------------------------ tokenising
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        from fish_lightning.adapters.models import resolve_model_path

        return AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_name))

    def encode(self, examples: list[Example], tok: Any) -> list[dict[str, torch.Tensor]]:
        """Token ids and response-only labels of ``examples`` (see :func:`encode_example`)."""
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is None:
            raise DataError(f"tokenizer {self.tokenizer_name!r} has neither an EOS nor a SEP token to end responses")
        bos = tok.bos_token_id
        add_bos = self.add_bos if self.add_bos is not None else (bos is not None and bos != eos)
        if add_bos and bos is None:
            raise DataError(f"add_bos=True but tokenizer {self.tokenizer_name!r} has no BOS token")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos
        prompts = tok([self.prompt(ex) for ex in examples], add_special_tokens=False)["input_ids"]
        responses = tok([ex.response for ex in examples], add_special_tokens=False)["input_ids"]
        out = []
        for p, r in zip(prompts, responses):
            p = [bos, *p] if add_bos else list(p)
            r = [*r, eos]
            if len(p) + len(r) > self.max_length:
                self.truncated += 1
            ids, labels = encode_example(p, r, self.max_length, keep_first=add_bos)
            out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, val = self.read_examples()
        train = subsample(train, self.train_samples, self.subsample_seed)
        val = subsample(val, self.val_samples, self.subsample_seed)
        tok = self.tokenizer()
        self.truncated = 0
        self.splits = {"train": self.encode(train, tok), "dev": self.encode(val, tok)}
        if self.truncated:
            rank_zero_warn(
                f"{self.truncated} of {len(train) + len(val)} examples exceed max_length={self.max_length} tokens "
                "and were truncated (prompt cut from the left, then the response's tail)"
            )

    def train_dataloader(self) -> DataLoader:
        return self.order.loader(self.splits["train"], batch_size=self.batch_size,
                                 collate_fn=instruction_collate(self.pad_id), num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["dev"], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=instruction_collate(self.pad_id), num_workers=self.num_workers)  # fmt: skip
