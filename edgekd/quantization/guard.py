"""Measuring a quantized ONNX model against its float source: accuracy, output error, speed.

Accuracy is measured through the ONNX export target's own runner, so what is evaluated is what
is served. Timing (``edgekd.export.timing.time_side_by_side``) opens each model's session as its
runner does, every one on the same threads with ONNX Runtime's thread spinning left on, as serve and
bench run it, and times the models in alternating blocks on the same inputs, so one session's
spinning threads compete with the next one's run only at a block's first call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import DataError
from edgekd.export.timing import TIMING_BLOCK, time_side_by_side  # noqa: F401  (re-exported)
from edgekd.quantization.calibration import take

MetricFn = Callable[[dict[str, np.ndarray], np.ndarray], Mapping[str, float]]
EVAL_BATCH = 64


def load_runner(path: Path, threads: int | None = None, **options: Any) -> Any:
    from edgekd.export import get_exporter
    from edgekd.export import onnx as _onnx  # noqa: F401  (registers the target)

    return get_exporter("onnx").load(Path(path), threads=threads, **options)


def run_all(runner: Any, inputs: Mapping[str, np.ndarray], batch: int = EVAL_BATCH,
            precision: str | None = None) -> dict[str, np.ndarray]:
    """Outputs over every row, in batches of ``batch``; an artifact of a row-dependent ``precision``
    (dynamic int8) runs one row per call at its own length, as it is served."""
    from edgekd.export.parity import run_as_served

    return run_as_served(runner.run, dict(inputs), batch, precision)


def metric_of(metrics: Mapping[str, float], key: str) -> float:
    if key not in metrics:
        raise DataError(
            f"quantize.guard_metric is '{key}' but the task's metrics are {sorted(metrics)}; "
            "set quantize.guard_metric to one of them"
        )
    return float(metrics[key])


def relative_error(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> float:
    """Sum of squared differences over the sum of squares of the reference, over all outputs."""
    num = den = 0.0
    for name, r in ref.items():
        r64 = np.asarray(r, dtype=np.float64)
        num += float(np.sum((np.asarray(out[name], dtype=np.float64) - r64) ** 2))
        den += float(np.sum(r64 ** 2))
    return num / den if den else num


def agreement(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference and top-1 agreement of the first output, as the parity check reports them."""
    name = next(iter(ref))
    r, o = np.asarray(ref[name], dtype=np.float64), np.asarray(out[name], dtype=np.float64)
    top1 = float(np.mean(r.argmax(-1) == o.argmax(-1))) if r.ndim >= 2 else float("nan")
    return {"max_abs_diff": float(np.max(np.abs(r - o))) if r.size else 0.0, "top1_agreement": top1}


class Evaluator:
    """Runs models on the validation examples and scores them against the float model."""

    def __init__(self, val_inputs: Mapping[str, np.ndarray], val_labels: np.ndarray, metric_fn: MetricFn,
                 metric_key: str, sensitivity_examples: int, threads: int | None):
        self.inputs, self.labels = dict(val_inputs), np.asarray(val_labels)
        self.metric_fn, self.key, self.threads = metric_fn, metric_key, threads
        n = len(self.labels)
        self.sens_n = min(sensitivity_examples, n)
        self.reference: dict[str, np.ndarray] | None = None

    def score(self, path: Path, subset: bool = False, precision: str | None = None,
              options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The model's metric and outputs; ``precision``: the artifact's, so that a dynamic-int8 model
        is scored one row per call at its own length, as it is served; ``options``: runner options
        (the session the folder will be opened with)."""
        runner = load_runner(path, self.threads, **(options or {}))
        n = self.sens_n if subset else len(self.labels)
        outputs = run_all(runner, take(self.inputs, n), precision=precision)
        metrics = {k: float(v) for k, v in self.metric_fn(outputs, self.labels[:n]).items()}
        result = {"metrics": metrics, "metric": metric_of(metrics, self.key), "outputs": outputs}
        if self.reference is not None:
            ref = {k: v[:n] for k, v in self.reference.items()}
            result["relative_error"] = relative_error(ref, outputs)
            result.update(agreement(ref, outputs))
        return result


# Candidates whose median latencies differ by less than this are as fast as each other: the timing
# noise of a shared CPU is of this order, so among them the higher validation metric wins.
TIE_TOLERANCE = 0.05


def choose_fastest(candidates: list[dict[str, Any]], budget: float, tie: float = TIE_TOLERANCE,
                   ceiling: float | None = None) -> tuple[int | None, list[str]]:
    """The index of the fastest candidate within the accuracy budget, and why each was or was not chosen.

    Each candidate holds ``name``, ``passed`` (its drop is within ``budget``), ``drop``, ``metric``
    (validation) and ``p50_ms`` (batch 1, timed side by side). Candidates within ``tie`` of the
    fastest passing one count as equally fast; among them the higher validation metric wins, then
    the lower latency. ``ceiling``: the float model's p50 in the same timing; when a passing candidate
    is faster than the float model, a near tie never goes to one that is not (it would ship float).
    None when no candidate is within the budget.
    """
    why = [""] * len(candidates)
    passing = [i for i, c in enumerate(candidates) if c["passed"]]
    for i, c in enumerate(candidates):
        if not c["passed"]:
            why[i] = f"over the accuracy budget: validation drop {c['drop']:.4f} > {budget}"
    if not passing:
        return None, why
    fastest = min(candidates[i]["p50_ms"] for i in passing)
    group = [i for i in passing if candidates[i]["p50_ms"] <= fastest * (1 + tie)]
    not_faster: list[int] = []
    if ceiling is not None and fastest < ceiling:
        not_faster = [i for i in group if candidates[i]["p50_ms"] >= ceiling]
        group = [i for i in group if i not in not_faster]
    best = max(group, key=lambda i: (candidates[i]["metric"], -candidates[i]["p50_ms"]))
    win = candidates[best]
    for i in passing:
        c = candidates[i]
        if i == best:
            why[i] = (f"chosen: fastest within the budget ({c['p50_ms']:.3f} ms p50)" if c["p50_ms"] == fastest else
                      f"chosen: within {tie:.0%} of the fastest ({c['p50_ms']:.3f} vs {fastest:.3f} ms p50) "
                      f"with the highest validation metric ({c['metric']:.4f})")
        elif i in not_faster:
            why[i] = (f"within {tie:.0%} of the fastest but not faster than the float model ({c['p50_ms']:.3f} "
                      f"against {ceiling:.3f} ms p50), which {win['name']} is")
        elif i in group:
            why[i] = (f"as fast (within {tie:.0%}) as {win['name']} but validation metric {c['metric']:.4f} "
                      f"<= {win['metric']:.4f}")
        else:
            why[i] = f"slower: {c['p50_ms']:.3f} ms p50 against {win['name']}'s {win['p50_ms']:.3f} ms"
    return best, why
