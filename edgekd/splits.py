"""Seeded, stratified train/validation/test splits that record exactly which examples went where."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekd.errors import DataError
from edgekd.examples import Examples
from edgekd.recipe import SplitConfig
from edgekd.sections import changed_keys, it_or_them

SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    examples: Examples
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    seed: int
    method: str  # how the splits were made, in words
    train_before_truncation: int | None = None

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise KeyError(f"unknown split '{split}'; splits: {', '.join(SPLITS)}")
        return getattr(self, split)

    def texts(self, split: str) -> list[str]:
        return [self.examples.texts[i] for i in self.indices(split)]

    def labels(self, split: str) -> np.ndarray:
        return self.examples.labels[self.indices(split)]

    def summary(self) -> dict[str, Any]:
        """JSON-able record for the manifest: seed, sizes, class counts and index fingerprints."""
        ex = self.examples
        return {
            "source": ex.source,
            "source_sha256": ex.sha256,
            "content_sha256": ex.content_sha256(),
            "examples": len(ex),
            "label_names": list(ex.label_names),
            "cleaning": dict(ex.cleaning),
            "seed": self.seed,
            "method": self.method,
            "train_before_truncation": self.train_before_truncation,
            "splits": {
                name: {
                    "size": int(len(self.indices(name))),
                    "class_counts": ex.class_counts(self.indices(name)),
                    "indices_sha256": index_sha256(self.indices(name)),
                }
                for name in SPLITS
            },
        }


def index_sha256(index: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(index, dtype="<i8").tobytes()).hexdigest()


def allocate(total: int, counts: np.ndarray) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder), never above a count."""
    counts = np.asarray(counts, dtype=np.int64)
    if total <= 0 or counts.sum() == 0:
        return np.zeros_like(counts)
    quota = total * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    # Ties go to the lower class id (stable sort), so the result is deterministic.
    for k in np.argsort(-(quota - take), kind="stable")[: total - int(take.sum())]:
        take[k] += 1
    return np.minimum(take, counts)


def _take_stratified(pool: np.ndarray, labels: np.ndarray, n: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` indices from ``pool`` keeping class proportions; return (taken, rest), both sorted."""
    classes = np.unique(labels[pool])
    members = [rng.permutation(pool[labels[pool] == c]) for c in classes]
    take = allocate(n, np.array([len(m) for m in members]))
    taken = np.concatenate([m[:k] for m, k in zip(members, take, strict=True)]) if len(members) else pool[:0]
    rest = np.concatenate([m[k:] for m, k in zip(members, take, strict=True)]) if len(members) else pool[:0]
    return np.sort(taken), np.sort(rest)


def _min_rows(cfg: SplitConfig, n_classes: int) -> int:
    n = n_classes
    while n - max(1, round(n * cfg.test)) - max(1, round(n * cfg.validation)) < n_classes:
        n += 1
    return n


def _check_train(ex: Examples, train: np.ndarray, where: str) -> None:
    missing = [name for name, c in ex.class_counts(train).items() if c == 0]
    if missing:
        counts = ex.class_counts()
        detail = ", ".join(f"'{m}' ({counts[m]} examples in all)" for m in missing)
        raise DataError(f"too few rows to split: the training split {where} has no example of class {detail}. "
                        "Add examples of that class or remove it.")


def split_examples(ex: Examples, cfg: SplitConfig | None = None,
                   max_train_examples: int | None = None, *, calibrates: bool | None = None) -> Splits:
    """Cut ``ex`` into train/validation/test, seeded and stratified by label.

    A dataset with its own splits keeps them; a missing validation or test split is carved out
    of train (``cfg.validation``/``cfg.test`` of the train split), and the fraction of a split it
    brings, set away from its default, is an error (nothing would read it). ``max_train_examples`` keeps a
    stratified sample of the training split only, so validation and test do not change.

    ``calibrates``: whether the run also draws a calibration sample with ``cfg.seed`` (the quantize stage's,
    ``calibration_data``). False: where the dataset brings all three splits and no ``max_train_examples``
    cut draws with it either, nothing reads the seed, and one set away from its default is an error too.
    None (a caller that cannot say): the seed is kept.
    """
    cfg = cfg or SplitConfig()
    rng = np.random.default_rng(cfg.seed)
    labels = ex.labels
    pre = ex.predefined_splits or {}
    if "train" in pre:
        # A split the dataset brings is kept as it is: its fraction would be accepted and ignored.
        own = tuple(name for name in ("validation", "test") if name in pre and len(pre[name]))
        keys = own
        if len(own) == 2 and max_train_examples is None and calibrates is False:
            keys += ("seed",)  # nothing is carved out of train, nothing cut from it, no calibration sample drawn
        unread = changed_keys(cfg, keys=keys, prefix="data.split.")
        if unread:
            what = ("the share(s) of a split carved out of the training rows"
                    if "data.split.seed" not in unread else
                    "the seed of the shuffle that carves splits out of the training rows"
                    if len(unread) == 1 else
                    "the share(s) of a split carved out of the training rows and the seed of that shuffle")
            seed = (" (and no data.max_train_examples or calibration sample draws with the seed)"
                    if "data.split.seed" in unread else "")
            raise DataError(f"{', '.join(unread)}: {what}, and {ex.source or 'the dataset'} brings its own "
                            f"{' and '.join(own)} split(s), kept as they are{seed}, so nothing reads "
                            f"{it_or_them(unread)}: remove {it_or_them(unread)} (a named dataset's pinned mirror, "
                            "data.source: mirror, has no splits of its own)")
        train = np.sort(np.asarray(pre["train"], dtype=np.int64))
        parts: dict[str, np.ndarray] = {}
        carved = []
        for name, frac in (("test", cfg.test), ("validation", cfg.validation)):
            if name in pre and len(pre[name]):
                parts[name] = np.sort(np.asarray(pre[name], dtype=np.int64))
            else:
                n = max(1, round(frac * len(train)))
                if len(train) - n < 2:
                    raise DataError(f"too few rows to split: the predefined train split has {len(train)} rows, "
                                    f"too few to carve a {name} split out of it.")
                parts[name], train = _take_stratified(train, labels, n, rng)
                carved.append(name)
        method = "predefined" + (f"; {' and '.join(carved)} carved from train" if carved else "")
        validation, test = parts["validation"], parts["test"]
    else:
        n = len(ex)
        n_test, n_val = max(1, round(n * cfg.test)), max(1, round(n * cfg.validation))
        n_classes = len(np.unique(labels))
        if n - n_test - n_val < n_classes:
            raise DataError(f"too few rows to split: {n} rows give {n_test} test and {n_val} validation rows "
                            f"(split.test={cfg.test}, split.validation={cfg.validation}), leaving fewer "
                            f"training rows than the {n_classes} classes. Give at least {_min_rows(cfg, n_classes)} rows.")
        everything = np.arange(n, dtype=np.int64)
        test, rest = _take_stratified(everything, labels, n_test, rng)
        validation, train = _take_stratified(rest, labels, n_val, rng)
        method = "stratified"
    _check_train(ex, train, f"({method})")
    before = None
    if max_train_examples is not None and max_train_examples < len(train):
        before = len(train)
        # A separate stream, so truncating never changes validation or test.
        sub_rng = np.random.default_rng([cfg.seed, 1])
        train, _ = _take_stratified(train, labels, max_train_examples, sub_rng)
        _check_train(ex, train, f"(max_train_examples={max_train_examples})")
        method += f"; train truncated to {max_train_examples} (stratified sample)"
    return Splits(ex, train, validation, test, cfg.seed, method, before)
