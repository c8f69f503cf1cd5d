"""Feeding real examples to ONNX Runtime's calibrators, and slicing example sets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgekd.errors import DataError


def n_rows(inputs: Mapping[str, np.ndarray]) -> int:
    sizes = {name: len(a) for name, a in inputs.items()}
    if not sizes:
        raise DataError("no inputs given: pass a dict of input name -> array with one row per example")
    if len(set(sizes.values())) != 1:
        raise DataError(f"inputs disagree on the number of examples: {sizes}")
    return next(iter(sizes.values()))


# Mixed into the seed of the calibration sample, so it is drawn apart from the data split's own draws.
CALIBRATION_STREAM = 0xCA1B


class CalibrationInputs(dict):
    """Calibration inputs (name -> array, one row per example), with ``rows``: which examples of their
    split they are (``calibration_rows``' record), for the quantize report."""

    rows: dict[str, Any] | None = None


def calibration_rows(total: int, n: int, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Which ``n`` of a split's ``total`` examples calibrate (sorted positions in the split): every one when
    ``n >= total``, else a seeded sample, stratified by ``labels`` where given (each class in proportion,
    ``edgekd.splits.allocate``). Never the first ``n`` in file order: a file sorted by label would calibrate
    on one class."""
    from edgekd.splits import allocate

    if n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng([int(seed), CALIBRATION_STREAM])
    if labels is None:
        return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take = allocate(n, np.array([len(m) for m in members]))
    return np.sort(np.concatenate([m[:k] for m, k in zip(members, take, strict=True)])).astype(np.int64)


def calibration_record(split: str, total: int, idx: np.ndarray, seed: int, stratified: bool) -> dict[str, Any]:
    """What the quantize report says about the calibration examples: their split, how many of how many,
    how they were drawn, and the sha256 of their positions in the split (``edgekd.splits.index_sha256``)."""
    from edgekd.splits import index_sha256

    how = ("the whole split" if len(idx) == total else
           f"seeded sample (seed {seed}{', stratified by label' if stratified else ''})")
    return {"split": split, "count": int(len(idx)), "of": int(total), "drawn": how, "rows_sha256": index_sha256(idx)}


def take(inputs: Mapping[str, np.ndarray], n: int, start: int = 0) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[start:start + n]) for k, v in inputs.items()}


def batches(inputs: Mapping[str, np.ndarray], size: int):
    total = n_rows(inputs)
    for start in range(0, total, size):
        yield take(inputs, size, start)


def cast_to(inputs: Mapping[str, np.ndarray], dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """Inputs in the dtypes the graph declares (tokenizers give int32 or int64 alike)."""
    return {k: np.asarray(v).astype(dtypes[k], copy=False) if k in dtypes else np.asarray(v) for k, v in inputs.items()}


def real_length_rows(inputs: Mapping[str, np.ndarray], n: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first ``n`` examples one by one, each cut to its real length.

    Examples padded to one shape (right padding, ``attention_mask`` 0 on padding) are cut back to
    the tokens they hold, so calibration and timing see the lengths real requests have; inputs
    without an ``attention_mask`` are returned row by row unchanged.
    """
    total = n_rows(inputs)
    count = total if n is None else min(n, total)
    mask = inputs.get("attention_mask")
    rows = []
    for i in range(count):
        row = {k: np.asarray(v[i:i + 1]) for k, v in inputs.items()}
        if mask is not None and np.ndim(mask) == 2:
            width = np.shape(mask)[1]
            keep = max(int(np.asarray(mask[i]).sum()), 1)
            row = {k: (a[:, :keep] if a.ndim >= 2 and a.shape[1] == width else a) for k, a in row.items()}
        rows.append({k: np.ascontiguousarray(a) for k, a in row.items()})
    return rows


def make_reader(inputs: Mapping[str, np.ndarray], samples: int, input_names: list[str],
                dtypes: Mapping[str, np.dtype] | None = None):
    """A ``CalibrationDataReader`` yielding the first ``samples`` examples one at a time, each at
    its real length (``real_length_rows``).

    ``served`` counts the examples handed to the calibrator (what the report records).
    """
    from onnxruntime.quantization import CalibrationDataReader

    missing = [n for n in input_names if n not in inputs]
    if missing:
        raise DataError(f"calibration inputs lack {missing}; the model takes {input_names}")
    total = n_rows(inputs)
    if total < samples:
        raise DataError(
            f"quantize.calibration_samples={samples} but only {total} calibration examples were given; "
            "lower calibration_samples or pass more examples"
        )
    rows = [cast_to({n: row[n] for n in input_names}, dtypes or {})
            for row in real_length_rows(inputs, samples)]

    class ArrayReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.served = 0
            self._next = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= samples:
                return None
            i = self._next
            self._next += 1
            self.served += 1
            return rows[i]

        def rewind(self) -> None:
            self._next = 0

        def __len__(self) -> int:
            return samples

    return ArrayReader()
