"""A user's own classification or regression file (``fish-train data=csv``): one CSV, TSV or JSONL file.

``path`` is read by its suffix (``.csv``, ``.tsv``, ``.jsonl``); ``text_column`` (and ``text_pair_column`` for
sentence pairs) hold the text, ``label_column`` the label: with ``num_labels=1`` a number (regression), else class
ids ``0..num_labels-1`` or label strings (``labels`` gives their order; by default the sorted distinct strings of
the training file). Validation comes from ``val_path`` when given, else a seeded held-out ``val_fraction`` of the
same file.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from fish_lightning.app.classification_data import DataError, TaskSpec, TextClassificationData

SUFFIXES = (".csv", ".tsv", ".jsonl")
Rows = list[tuple[tuple[str, ...], Any]]


def read_records(file: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """``(columns, [(where, record)])`` of a CSV/TSV (header row) or JSONL file."""
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{file}: unknown file type {suffix!r}: expected one of {SUFFIXES}")
    with open(file, encoding="utf-8", newline="") as fh:
        if suffix == ".jsonl":
            records, columns = [], []
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as err:
                    raise DataError(f"{file}:{lineno}: not a JSON object ({err})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{file}:{lineno}: not a JSON object")
                columns = columns or list(rec)
                records.append((f"{file}:{lineno}", rec))
            return columns, records
        reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
        rows = [(f"{file}:{i + 2}", r) for i, r in enumerate(reader)]
        return list(reader.fieldnames or []), rows


class FileClassificationData(TextClassificationData):
    """Classification (or regression, ``num_labels=1``) on one CSV/TSV/JSONL file (module doc).

    Args:
        path: the training file (and the validation file's source without ``val_path``).
        text_column, text_pair_column: text column(s); the pair column is optional (sentence pairs).
        label_column: the label column.
        num_labels: classes (``1``: regression).
        labels: label strings in id order (``None``: integer ids, or the sorted distinct strings).
        val_path: a validation file in the same format; ``None``: ``val_fraction`` of ``path`` held out (seeded by
            ``subsample_seed``).
        task: the name in results and caches.
        Other arguments as :class:`~fish_lightning.app.classification_data.TextClassificationData`.
    """

    def __init__(
        self,
        path: str,
        text_column: str = "text",
        label_column: str = "label",
        num_labels: int = 2,
        text_pair_column: str | None = None,
        labels: list[str] | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.1,
        task: str = "csv",
        **kwargs: Any,
    ) -> None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise DataError(f"num_labels={num_labels!r} must be an integer >= 1 (1 = regression)")
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction!r} must be in (0, 1)")
        self.columns = (text_column, *([text_pair_column] if text_pair_column else []))
        self.label_column, self.label_names = label_column, list(labels) if labels else None
        self.val_path, self.val_fraction = val_path, float(val_fraction)
        self._num_labels = num_labels
        super().__init__(task=task, path=path, num_labels=num_labels, **kwargs)

    def task_spec(self, task: str, num_labels: int | None) -> TaskSpec:
        metrics = ("pearson", "spearman") if self._num_labels == 1 else ("accuracy", "f1")
        return TaskSpec(task, "", self.columns, self.label_column, self._num_labels, metrics,
                        labels=tuple(self.label_names or ()))  # fmt: skip

    def check_source(self) -> None:
        if not self.path:
            raise DataError("data=csv needs data.path=<a CSV, TSV or JSONL file>")
        for name, value in (("data.path", self.path), ("data.val_path", self.val_path)):
            if value is None:
                continue
            file = Path(str(value)).expanduser()
            if not file.is_file():
                raise DataError(f"{name}={str(value)!r} does not exist or is not a file (expected a CSV, TSV or "
                                "JSONL file)")  # fmt: skip
            if file.suffix.lower() not in SUFFIXES:
                raise DataError(f"{name}={str(value)!r}: unknown file type {file.suffix!r}: expected one of {SUFFIXES}")
            self._read(file, header_only=True)

    def _read(self, file: Path, header_only: bool = False) -> Rows:
        columns, records = read_records(file)
        needed = [*self.columns, self.label_column]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"{file}: missing column(s) {missing} for data=csv; found columns {columns} (set "
                            "data.text_column, data.text_pair_column, data.label_column)")  # fmt: skip
        if header_only:
            return []
        rows = []
        for where, rec in records:
            if any(rec.get(c) is None for c in needed):
                raise DataError(f"{where}: empty {[c for c in needed if rec.get(c) is None]}")
            rows.append((tuple(str(rec[c]) for c in self.columns), rec[self.label_column]))
        if not rows:
            raise DataError(f"{file}: no rows")
        return rows

    def _labelled(self, rows: Rows, file: Path, names: list[str] | None) -> Rows:
        """Labels as ids (floats for regression)."""
        n = self._num_labels
        out = []
        for i, (texts, raw) in enumerate(rows):
            where = f"{file} row {i + 1}"
            if n == 1:
                try:
                    out.append((texts, float(raw)))
                except (TypeError, ValueError):
                    raise DataError(f"{where}: label {raw!r} is not a number (num_labels=1 is regression)") from None
                continue
            if names is not None:
                if str(raw).strip() not in names:
                    raise DataError(f"{where}: label {raw!r} is not one of {names}")
                out.append((texts, names.index(str(raw).strip())))
                continue
            try:
                label = int(str(raw).strip())
            except ValueError:
                raise DataError(f"{where}: label {raw!r} is not a class id") from None
            if not 0 <= label < n:
                raise DataError(f"{where}: label {label} is outside 0..{n - 1} (num_labels={n})")
            out.append((texts, label))
        return out

    def _label_names(self, train: Rows, file: Path) -> list[str] | None:
        if self._num_labels == 1 or self.label_names is not None:
            return self.label_names
        raw = {str(y).strip() for _, y in train}
        if all(r.lstrip("-").isdigit() for r in raw):
            return None
        names = sorted(raw)
        if len(names) != self._num_labels:
            raise DataError(f"{file}: {len(names)} distinct labels {names[:10]} but num_labels={self._num_labels}: "
                            "set data.num_labels (or data.labels, the label strings in id order)")  # fmt: skip
        return names

    def _rows(self, split: str) -> tuple[Rows, str]:
        file = Path(str(self.path)).expanduser()
        train = self._read(file)
        names = self._label_names(train, file)
        st = file.stat()
        source = f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}:{self.columns}:{self.label_column}:{names}"
        if self.val_path is not None:
            if split == "train":
                return self._labelled(train, file, names), source
            vfile = Path(str(self.val_path)).expanduser()
            vst = vfile.stat()
            return self._labelled(self._read(vfile), vfile, names), f"{source}|{vfile.resolve()}:{vst.st_size}"
        order = list(range(len(train)))
        random.Random(self.subsample_seed).shuffle(order)
        n_val = max(1, round(len(train) * self.val_fraction))
        if n_val >= len(train):
            raise DataError(f"{file}: {len(train)} rows leave none for training with val_fraction={self.val_fraction}")
        picked = order[:n_val] if split == "dev" else order[n_val:]
        return (self._labelled([train[i] for i in sorted(picked)], file, names),
                f"{source}:val{self.val_fraction}:{self.subsample_seed}")  # fmt: skip
