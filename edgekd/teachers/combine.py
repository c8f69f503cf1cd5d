"""Teacher outputs → soft targets: every teacher's answer as probabilities, then one target per example.

A soft target is stored as log-probabilities: softmax(log p / T) is p tempered by T, so the
distillation loss treats it exactly like the logits of a white-box teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from edgekd.errors import StageError

# Smallest probability kept before the log: a zero would become -inf and the KL term NaN.
PROB_FLOOR = 1e-12
# How far a teacher's probabilities may stray from [0, 1] and their rows' sums from 1 (JSON rounding of
# each value, float16 outputs) before they are not taken for probabilities: logits, log-probabilities or
# scores answered under targets: probs would otherwise be clipped into made-up targets.
PROB_VALUE_TOL = 1e-3
PROB_SUM_TOL = 0.02

Targets = Literal["probs", "logits", "labels"]


class NotProbabilitiesError(StageError, ValueError):
    """A teacher under ``targets: probs`` answered values that are not probabilities."""


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def check_probabilities(rows: np.ndarray, where: str = "teacher", kind: str | None = None) -> None:
    """Refuse (n, K) rows that are not probabilities: a value not finite or outside [0, 1], or a row whose sum
    is not 1, beyond the small tolerances above. Such rows are logits or scores (targets: logits)."""
    rows = np.asarray(rows, dtype=np.float64)
    finite = np.isfinite(rows).all(axis=1)
    in_range = ((rows >= -PROB_VALUE_TOL) & (rows <= 1 + PROB_VALUE_TOL)).all(axis=1)
    sums = np.where(np.isfinite(rows), rows, 0.0).sum(axis=1)
    summed = np.abs(sums - 1.0) <= PROB_SUM_TOL
    bad = np.flatnonzero(~(finite & in_range & summed))
    if not len(bad):
        return
    i = int(bad[0])
    why = ("a value that is not a finite number" if not finite[i] else
           "a value outside [0, 1]" if not in_range[i] else f"values that sum to {sums[i]:.4g}, not 1")
    row = ", ".join(f"{v:.4g}" for v in rows[i][:8]) + (", ..." if rows.shape[1] > 8 else "")
    raise NotProbabilitiesError(
        f"{where} (targets: probs) answered values that are not probabilities for {len(bad)} of {len(rows)} "
        f"texts: the first, text {i}, got [{row}], {why}. " + (
            "An edgekd server's /predict answers probabilities: this one does not, so check the server (or ask "
            "its model through the v2 protocol: kind v2, targets: logits, output_name its logits)."
            if kind == "edgekd" else
            f"If the teacher's output holds logits (scores of any sign that need a softmax), set {where}.targets "
            "to logits; otherwise read its probability output (kind v2: output_name)."))


def as_probabilities(outputs: np.ndarray, targets: Targets, num_labels: int, where: str = "teacher") -> np.ndarray:
    """One teacher's answers as an (n, num_labels) probability matrix (labels become one-hot rows).

    Under ``probs`` the answers must be probabilities (``check_probabilities``); rows a hair off 1 (JSON
    rounding) are renormalised."""
    out = np.asarray(outputs)
    if targets == "labels":
        labels = out.astype(np.int64).reshape(-1)
        probs = np.zeros((len(labels), num_labels), dtype=np.float64)
        probs[np.arange(len(labels)), labels] = 1.0
        return probs
    if out.ndim != 2 or out.shape[1] != num_labels:
        raise ValueError(f"expected teacher outputs of shape (n, {num_labels}), got {list(out.shape)}")
    if targets == "logits":
        return softmax(out)
    check_probabilities(out, where)
    probs = np.clip(out.astype(np.float64), 0.0, 1.0)
    return probs / probs.sum(axis=1, keepdims=True)  # JSON rounding leaves rows a hair off 1


def combine(
    probabilities: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    how: Literal["average", "most_confident"] = "average",
) -> tuple[np.ndarray, np.ndarray]:
    """Combine the teachers' (n, K) probability matrices into one.

    average: the weighted mean of the probabilities; most_confident: per example, the row of the
    teacher whose top probability is highest (the first such teacher on a tie). Returns the
    combined probabilities and, per example, the index of the teacher chosen (-1 for average).
    """
    if not probabilities:
        raise ValueError("no teacher outputs to combine")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])  # (teachers, n, K)
    n = stack.shape[1]
    if how == "average":
        w = np.ones(len(stack)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(w) != len(stack) or (w <= 0).any():
            raise ValueError(f"need one positive weight per teacher, got {list(w)}")
        return np.tensordot(w / w.sum(), stack, axes=1), np.full(n, -1, dtype=np.int64)
    if how == "most_confident":
        chosen = stack.max(axis=2).argmax(axis=0)
        return stack[chosen, np.arange(n)], chosen
    raise ValueError(f"how must be 'average' or 'most_confident', got {how!r}")


def log_targets(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities → float32 log-probabilities (the cached teacher logits)."""
    return np.log(np.clip(probabilities, PROB_FLOOR, None)).astype(np.float32)
