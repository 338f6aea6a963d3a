"""``text-csv:PATH``: the user's own CSV (columns ``text`` and ``label``) with MiniLM-L6.

This is how anyone runs the comparison on their own data. Labels may be any strings or
integers; classes are numbered in sorted order of their string form.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

from ..data import LabelledTexts
from .registry import register_task
from .text_classification import TextClassificationTask

__all__ = ["CsvFormatError", "TextCsv", "load_text_csv"]


class CsvFormatError(ValueError):
    """The CSV cannot be used as a classification data set; the message says what to fix."""


def load_text_csv(path: str | Path) -> LabelledTexts:
    path = Path(path)
    if not path.is_file():
        raise CsvFormatError(f"{path}: no such file; pass text-csv:PATH with the path of a CSV file")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CsvFormatError(f"{path}: not UTF-8 text ({exc}); save the file as UTF-8") from None
    reader = csv.DictReader(raw.splitlines())
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        found = ", ".join(repr(c) for c in columns) or "no header"
        raise CsvFormatError(
            f"{path}: missing column(s) {', '.join(missing)} (found {found}); the first line must be a "
            "header naming a 'text' and a 'label' column"
        )
    texts: list[str] = []
    raw_labels: list[str] = []
    for lineno, row in enumerate(reader, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        text = (row.get("text") or "").strip()
        label = (row.get("label") or "").strip()
        if not text or not label:
            which = "text" if not text else "label"
            raise CsvFormatError(f"{path}:{lineno}: empty {which}; every row needs a text and a label")
        texts.append(text)
        raw_labels.append(label)
    if not texts:
        raise CsvFormatError(f"{path}: no data rows under the header; add rows of text,label")
    names = sorted(set(raw_labels))
    if len(names) < 2:
        raise CsvFormatError(
            f"{path}: every row has label {names[0]!r}; classification needs at least two classes"
        )
    index = {n: i for i, n in enumerate(names)}
    return LabelledTexts(texts, [index[x] for x in raw_labels], tuple(names), name=path.name, notes=[])


class TextCsv(TextClassificationTask):
    name = "text-csv"
    description = "your CSV (columns text, label), all-MiniLM-L6-v2"
    default_max_length = 128
    default_epochs = 3

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def load_texts(self) -> LabelledTexts:
        return load_text_csv(self.path)

    def default_sizes(self, n_examples: int) -> tuple[int, int, int]:
        # A user's file has no natural split: 70/15/15, with at least one example each.
        val = max(1, round(0.15 * n_examples))
        test = max(1, round(0.15 * n_examples))
        train = n_examples - val - test
        if train < 1:
            raise CsvFormatError(
                f"{self.path}: {n_examples} rows are too few to split into train, validation and test"
            )
        return train, val, test

    def identity(self) -> dict[str, Any]:
        # The content's hash, not just the path: editing the file must not reuse old runs.
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest() if self.path.is_file() else None
        return {**super().identity(), "path": str(self.path.resolve()), "sha256": digest}


register_task("text-csv", TextCsv, takes_argument=True)
