"""Labelled texts in memory: the ``Examples`` every loader returns, and label encoding."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekd.errors import DataError

log = logging.getLogger("edgekd.data")  # the data loader's messages, wherever the helper lives

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


# --- label spellings and repeated texts -------------------------------------------------------

def dedupe(pairs: list[tuple[str, int]], cleaning: dict[str, int]) -> tuple[list[str], list[int]]:
    """Keep the first copy of each text (whitespace-normalised) and drop texts seen with two labels,
    so no text can land in two splits."""
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    order: list[tuple[str, str]] = []
    for text, label in pairs:
        key = " ".join(text.split())
        if key in seen:
            cleaning["dropped_duplicate_texts"] = cleaning.get("dropped_duplicate_texts", 0) + 1
            if seen[key] != label:
                conflicting.add(key)
            continue
        seen[key] = label
        order.append((key, text.strip()))
    kept = [(text, seen[key]) for key, text in order if key not in conflicting]
    cleaning["dropped_texts_with_both_labels"] = len(conflicting)
    return [t for t, _ in kept], [label for _, label in kept]


def _number(value: Any) -> int | float | None:
    """The numeric value of a label given as a number or a numeric string (1, "1", "1.0" -> 1)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        num = value
    elif isinstance(value, str):
        try:
            num = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    if num != num or num in (float("inf"), float("-inf")):
        return None
    return int(num) if float(num).is_integer() else num


def _spelling(value: Any) -> str:
    return value.strip() if isinstance(value, str) else str(value)


def reconcile_labels(values: list[Any], where: str, normalize: bool, cleaning: dict[str, int]) -> list[Any]:
    """Labels as given, after checking that no label is spelled two ways (``1``/``1.0``, ``Positive``/
    ``positive``, ``very good``/``very  good``), which would silently become two classes. Such groups
    are a DataError listing them, or, with ``normalize``, each is merged into its most frequent spelling
    (a warning says so). Numbers mixed with names (``0``, ``1``, ``pos``) are always an error: which
    number a name means cannot be known."""
    present = [v for v in values if v is not None and _spelling(v)]
    numbers = sorted({_spelling(v) for v in present if _number(v) is not None})
    names = sorted({_spelling(v) for v in present if _number(v) is None})
    if numbers and names:
        raise DataError(f"{where}: labels mix numbers ({', '.join(numbers[:8])}) and names ({', '.join(names[:8])}). "
                        "Give every label as a class id or every label as a name.")
    counts: dict[Any, dict[str, int]] = {}
    for v in present:
        key = _number(v) if numbers else " ".join(_spelling(v).split()).casefold()
        spellings = counts.setdefault(key, {})
        spellings[_spelling(v)] = spellings.get(_spelling(v), 0) + 1
    groups = {k: s for k, s in counts.items() if len(s) > 1}
    if not groups:
        return values
    # Most frequent spelling first (the first seen on a tie: dicts keep insertion order): the one kept.
    ranked = [sorted(s, key=lambda sp, s=s: -s[sp]) for s in groups.values()]
    listed = "; ".join(" = ".join(repr(x) for x in r) for r in ranked)
    if not normalize:
        raise DataError(f"{where}: one label is spelled several ways, which would make separate classes: {listed}. "
                        "Fix the spellings, or set data.normalize_labels: true to merge each group into its most "
                        "frequent spelling.")
    if numbers:  # a number's value is its meaning: 1, "1" and "1.0" all become 1
        out = [_number(v) if v is not None and _spelling(v) else v for v in values]
    else:
        chosen = {sp: r[0] for r in ranked for sp in r}
        out = [chosen.get(_spelling(v), v) if v is not None else v for v in values]
    merged = sum(1 for a, b in zip(values, out, strict=True) if a is not None and _spelling(a) != _spelling(b))
    cleaning["merged_label_spellings"] = merged
    log.warning("%s: merged label spellings (data.normalize_labels): %s; %d rows relabelled", where, listed, merged)
    return out


def drop_repeated_texts(texts: list[str], labels: np.ndarray, drop: bool, cleaning: dict[str, int],
                where: str) -> tuple[list[str], np.ndarray]:
    """Drop repeated texts (the first copy stays; a text seen with two labels goes entirely), or count them."""
    if not drop:
        cleaning["duplicate_texts_kept"] = duplicate_count(texts)
        return texts, labels
    kept, kept_labels = dedupe(list(zip(texts, labels.tolist(), strict=True)), cleaning)
    cleaning.setdefault("dropped_duplicate_texts", 0)
    if cleaning["dropped_duplicate_texts"]:
        log.warning("%s: dropped %d repeated texts (%d seen with two labels) before the split (data.drop_duplicates)",
                    where, cleaning["dropped_duplicate_texts"], cleaning["dropped_texts_with_both_labels"])
    if not kept:
        raise DataError(f"{where}: no texts left after dropping repeated ones; set data.drop_duplicates: false.")
    return kept, np.asarray(kept_labels, dtype=np.int64)
