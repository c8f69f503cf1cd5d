"""Labelled texts in memory: the ``Examples`` every loader returns, and label encoding."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekd.errors import DataError

# Binary label pairs ordered (negative, positive) whatever their alphabetical order.
_POLAR_PAIRS = {("negative", "positive"), ("neg", "pos"), ("rotten", "fresh"), ("bad", "good"),
                ("no", "yes"), ("false", "true")}


@dataclass
class Examples:
    """Texts with integer labels ``0..K-1`` named by ``label_names``."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    source: str
    sha256: str | None = None  # of the file read, when it is local
    predefined_splits: dict[str, np.ndarray] | None = None
    # What loading did, as counts: rows dropped by reason, duplicate texts kept in user files.
    cleaning: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise ValueError(f"labels must lie in 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self, index: np.ndarray | None = None) -> dict[str, int]:
        labels = self.labels if index is None else self.labels[index]
        counts = np.bincount(labels, minlength=len(self.label_names))
        return {name: int(c) for name, c in zip(self.label_names, counts, strict=True)}

    def content_sha256(self) -> str:
        """Fingerprint of exactly these texts, labels and label names (what the indices refer to)."""
        h = hashlib.sha256(json.dumps(self.label_names).encode())
        for text, label in zip(self.texts, self.labels.tolist(), strict=True):
            h.update(f"{label}\t{text}\n".encode())
        return h.hexdigest()


# --- labels and validation -------------------------------------------------------------------

def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("+-").isdigit():
            return int(s)
    return None


def order_label_names(names: set[str]) -> list[str]:
    """Sorted names, except that a binary (negative, positive)-like pair keeps negative at id 0."""
    ordered = sorted(names)
    if len(ordered) == 2:
        low = tuple(n.lower() for n in ordered)
        if low[::-1] in _POLAR_PAIRS:
            ordered.reverse()
    return ordered


def encode_labels(values: list[Any]) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to ids: integers keep their sorted order, strings are sorted by name."""
    ints = [_as_int(v) for v in values]
    if all(i is not None for i in ints):
        uniq = sorted(set(ints))
        names = [str(u) for u in uniq]
        lookup = {u: k for k, u in enumerate(uniq)}
        return np.array([lookup[i] for i in ints], dtype=np.int64), names
    strs = [str(v).strip() for v in values]
    names = order_label_names(set(strs))
    lookup = {n: k for k, n in enumerate(names)}
    return np.array([lookup[s] for s in strs], dtype=np.int64), names


def rows_message(what: str, rows: list[int | str], where: str, fix: str) -> str:
    shown = ", ".join(str(r) for r in rows[:5])
    more = f" (first 5 of {len(rows)})" if len(rows) > 5 else ""
    return f"{where}: {what} in rows {shown}{more}. {fix}"


def check_classes(labels: np.ndarray, names: list[str], where: str) -> None:
    present = np.unique(labels)
    if len(present) < 2:
        only = names[int(present[0])] if len(present) else "none"
        raise DataError(f"{where}: needs at least 2 classes to classify, found {len(present)} ({only}).")


def validate_records(records: list[tuple[int | str, Any, Any]], where: str, text_column: str,
                  label_column: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Validate ``(row, text, label)`` triples; return texts, label ids and label names."""
    bad_text = [row for row, text, _ in records if not isinstance(text, str) or not text.strip()]
    if bad_text:
        raise DataError(rows_message(f"empty or non-text values in column '{text_column}'", bad_text, where,
                                      "Remove those rows or fill them in (rows count from 1, header excluded)."))
    bad_label = [row for row, _, label in records if label is None or (isinstance(label, str) and not label.strip())]
    if bad_label:
        raise DataError(rows_message(f"missing labels in column '{label_column}'", bad_label, where,
                                      "Every row needs a label (rows count from 1, header excluded)."))
    labels, names = encode_labels([label for _, _, label in records])
    check_classes(labels, names, where)
    return [text for _, text, _ in records], labels, names


def duplicate_count(texts: list[str]) -> int:
    """Texts that repeat an earlier one (whitespace-normalised)."""
    return len(texts) - len({" ".join(t.split()) for t in texts})
