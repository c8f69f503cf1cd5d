"""Parity: an exported artifact against its source model, on real examples, through the same Runner
the server and the benchmark use.

Figures: max and mean absolute difference over every output element (and, per output, its max
difference and the largest magnitude the source gives), top-1 agreement of the first output (argmax
over its last axis) or, when the task gives one, its own agreement (detection: boxes), and the task
metric of both. Thresholds turn a miss into a ``ParityError`` that names the target and the figures.

``ParityGate``: the thresholds an export is held to. The recipe's ``export.max_abs_diff`` and
``export.min_top1_agreement`` when it sets them; where it leaves ``max_abs_diff`` unset, a difference gate
by the artifact's precision (``DEFAULT_TOLERANCES``): every output must stay within
``atol + rtol * max|source output|`` of the source's, so a graph that scales its outputs or ignores an
input cannot pass on agreement alone. The record says which gate was applied and where it came from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgekd.errors import DataError, ParityError
from edgekd.export.base import Runner

MetricFn = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, float]]
AgreementFn = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], float]


@dataclass
class ParityReport:
    target: str
    examples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None
    artifact_metric: dict[str, float] | None
    source_metric: dict[str, float] | None
    batch_size: int
    seconds: float
    box_agreement: float | None = None
    # Per output: {"max_abs_diff": .., "source_max_abs": ..} (the difference gate scales with the latter).
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    # The gate this report was held to (``ParityGate.record``), set by the export stage.
    tolerance: dict[str, Any] | None = None

    @property
    def agreement(self) -> float | None:
        """The agreement the threshold applies to: top-1 for classifiers, boxes for detectors."""
        return self.top1_agreement if self.box_agreement is None else self.box_agreement

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failures(self, min_top1_agreement: float | None, max_abs_diff: float | None) -> list[str]:
        """What misses the thresholds; outputs that are not finite numbers (a difference that is NaN or
        infinite) miss whatever the thresholds, set or not (argmax reads a NaN row as class 0, so top-1
        agreement alone can pass it)."""
        out = []
        if not math.isfinite(self.max_abs_diff):
            out.append(f"outputs that are not finite numbers (max abs diff {_fmt(self.max_abs_diff)})")
        if min_top1_agreement is not None and not (
            self.agreement is not None and self.agreement >= min_top1_agreement
        ):
            what = "top-1" if self.box_agreement is None else "box"
            out.append(f"{what} agreement {_fmt(self.agreement)} < required {min_top1_agreement}")
        if max_abs_diff is not None and math.isfinite(self.max_abs_diff) and not self.max_abs_diff <= max_abs_diff:
            out.append(f"max abs diff {_fmt(self.max_abs_diff)} > allowed {max_abs_diff}")
        return out

    def summary(self) -> str:
        metric = ""
        if self.artifact_metric and self.source_metric:
            metric = "; metric " + ", ".join(
                f"{k} {_fmt(self.artifact_metric.get(k))} vs source {_fmt(v)}" for k, v in self.source_metric.items()
            )
        what = "top-1" if self.box_agreement is None else "box"
        allowed = f" ({self.tolerance['text']})" if self.tolerance and self.tolerance.get("text") else ""
        return (f"{self.examples} examples: {what} agreement {_fmt(self.agreement)}, max abs diff "
                f"{_fmt(self.max_abs_diff)}{allowed}, mean abs diff {_fmt(self.mean_abs_diff)}{metric}")


@dataclass(frozen=True)
class Tolerance:
    """|artifact - source| <= atol + rtol * max|source|, output by output."""

    atol: float
    rtol: float

    def allowed(self, source_max_abs: float) -> float:
        return self.atol + self.rtol * source_max_abs


# The difference gate where the recipe sets no export.max_abs_diff, by the artifact's precision. Measured:
# fp32 exports of the default run (ONNX, ExecuTorch, TorchScript lite; seeds 42-44) differ from their source by
# 2.1e-6 to 4.8e-6 on logits up to 2.5 (about 2e-6 of the largest), the tiny test models by 1e-8; the default
# run's fp16 TensorRT graph under ONNX Runtime by 2.6e-3 to 4.9e-3 (2e-3 of the largest). Each bound leaves a
# wide margin over those (fp32: 2.5e-3, 500x; fp16: 0.06, 12x) and still fails a graph that scales its outputs (x3: a
# difference of twice the largest) or ignores the attention mask (1.5e-4 on the tiny model's 0.014 logits,
# against its fp32 bound 2.4e-5). int8 artifacts are gated by the quantize stage (its accuracy guard), not here.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {"fp32": Tolerance(atol=1e-5, rtol=1e-3),
                                            "fp16": Tolerance(atol=1e-2, rtol=2e-2)}


@dataclass(frozen=True)
class ParityGate:
    """The thresholds one artifact's parity is held to: the recipe's (``min_top1_agreement``, ``max_abs_diff``)
    and, where it sets no ``max_abs_diff``, the default difference gate of ``precision``. ``unordered``:
    outputs whose rows are a set rather than positions (NMS detections, which two runtimes may list in
    another order), left to the task's agreement instead of the element-wise default gate."""

    min_top1_agreement: float | None = None
    max_abs_diff: float | None = None
    precision: str | None = None
    unordered: tuple[str, ...] = ()

    @property
    def tolerance(self) -> Tolerance | None:
        return None if self.max_abs_diff is not None else DEFAULT_TOLERANCES.get(str(self.precision))

    def allowed(self, report: ParityReport) -> dict[str, float]:
        """The largest difference allowed per output (empty when no difference gate applies)."""
        if self.max_abs_diff is not None:
            return {name: float(self.max_abs_diff) for name in report.outputs} or {"*": float(self.max_abs_diff)}
        tol = self.tolerance
        if tol is None:
            return {}
        return {name: tol.allowed(fig["source_max_abs"]) for name, fig in report.outputs.items()
                if name not in self.unordered}

    def failures(self, report: ParityReport) -> list[str]:
        misses = report.failures(self.min_top1_agreement, self.max_abs_diff)
        tol = self.tolerance
        if tol is None:
            return misses
        for name, limit in self.allowed(report).items():
            diff = report.outputs[name]["max_abs_diff"]
            if math.isfinite(diff) and not diff <= limit:
                misses.append(f"output '{name}': max abs diff {_fmt(diff)} > allowed {limit:.3g} (default for "
                              f"{self.precision}: {tol.atol:g} + {tol.rtol:g} x max|source| "
                              f"{_fmt(report.outputs[name]['source_max_abs'])})")
        return misses

    def record(self, report: ParityReport) -> dict[str, Any]:
        """What the parity record says about the gate: which tolerance, where it came from."""
        top1 = {"value": self.min_top1_agreement, "from": "recipe" if self.min_top1_agreement is not None else "none"}
        allowed = {k: float(f"{v:.6g}") for k, v in self.allowed(report).items()}
        tol = self.tolerance
        if self.max_abs_diff is not None:
            rec: dict[str, Any] = {"from": "recipe", "max_abs_diff": self.max_abs_diff}
            text = f"allowed {self.max_abs_diff:g}, export.max_abs_diff"
        elif tol is not None:
            rec = {"from": "default", "precision": self.precision, "atol": tol.atol, "rtol": tol.rtol}
            unordered = [n for n in self.unordered if n in report.outputs]
            if unordered:
                rec["not_gated"] = {n: "rows are a set (NMS): compared by the task's agreement" for n in unordered}
            if not allowed:
                shown = f"no element-wise gate on {', '.join(unordered) or 'any output'}"
            elif len(allowed) > 1:
                shown = "allowed " + ", ".join(f"{k} {v:.2g}" for k, v in allowed.items())
            else:
                shown = f"allowed {next(iter(allowed.values())):.2g}"
            text = f"{shown}, default for {self.precision}: {tol.atol:g} + {tol.rtol:g} x max|source|"
        else:
            rec = {"from": "none", "precision": self.precision,
                   "reason": f"no default difference gate for {self.precision} artifacts (int8: the quantize "
                             "stage's accuracy guard); set export.max_abs_diff to gate them"}
            text = f"no difference gate for {self.precision}"
        return {**rec, "allowed": allowed, "min_top1_agreement": top1, "text": text}

    def apply(self, report: ParityReport) -> list[str]:
        """Record the gate on ``report`` and return its misses."""
        report.tolerance = self.record(report)
        return self.failures(report)


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _rows(inputs: dict[str, np.ndarray]) -> int:
    sizes = {len(np.asarray(v)) for v in inputs.values()}
    if len(sizes) != 1:
        raise DataError(f"parity inputs disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


class SourceOnce:
    """The source model for the parity of several targets: each batch of inputs runs through it once, and
    every target after the first is compared with those same outputs: the model as it was at the first check
    (exporting does not change it; the tests check that for ONNX and TorchScript). Keyed by the inputs' names, shapes, dtypes and bytes. At most ``max_bytes`` of outputs are
    kept (a large detector's raw outputs on hundreds of images would be gigabytes): past that, a batch runs
    through the model again as it did before."""

    def __init__(self, module: Any, max_bytes: int = 256 * 2**20):
        self.module = module
        self.max_bytes = max_bytes
        self._seen: dict[str, Any] = {}
        self._kept_bytes = 0
        self.calls = 0  # batches the model actually ran

    def __call__(self, **inputs: Any) -> Any:
        import hashlib

        h = hashlib.sha256()
        for name in sorted(inputs):
            a = inputs[name].detach().cpu().numpy()
            h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        key = h.hexdigest()
        if key in self._seen:
            return self._seen[key]
        out = self.module(**inputs)
        self.calls += 1
        size = _nbytes(out)
        if self._kept_bytes + size <= self.max_bytes:
            self._seen[key] = out
            self._kept_bytes += size
        return out


def _nbytes(out: Any) -> int:
    """Bytes of a model's outputs: a tensor or array, or tuples, lists and dicts of them at any depth (a
    detector's raw heads), so that no nesting counts as nothing against SourceOnce's bound."""
    if isinstance(out, dict):
        return sum(_nbytes(v) for v in out.values())
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(v) for v in out)
    return int(getattr(out, "nbytes", 0))


def source_outputs(module: Any, batch: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """A torch module's outputs on one batch of numpy inputs, named ``names``, as float32 arrays."""
    import torch

    with torch.inference_mode():
        out = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()})
    out = out if isinstance(out, (tuple, list)) else (out,)
    if len(out) != len(names):
        raise ParityError(f"the source model returns {len(out)} output(s), the artifact {len(names)} ({names}).")
    return {n: o.detach().float().cpu().numpy() for n, o in zip(names, out, strict=True)}


def run_as_served(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], inputs: dict[str, np.ndarray],
                  batch_size: int, precision: str | None) -> dict[str, np.ndarray]:
    """``run_batched``, except for an artifact whose rows depend on each other (dynamic int8: one
    activation scale per call): it runs one row per call at the row's own length, as it is served."""
    from edgekd.devices.remote_runner import ROW_DEPENDENT_PRECISIONS, concat_rows, own_length_row

    if str(precision) not in ROW_DEPENDENT_PRECISIONS:
        return run_batched(fn, inputs, batch_size)
    return concat_rows([fn(own_length_row(inputs, i)) for i in range(_rows(inputs))])


def run_batched(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], inputs: dict[str, np.ndarray],
                batch_size: int) -> dict[str, np.ndarray]:
    n = _rows(inputs)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        batch = {k: np.asarray(v)[start:start + batch_size] for k, v in inputs.items()}
        for k, v in fn(batch).items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def check_parity(
    runner: Runner,
    source_module: Any,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    metric_fn: MetricFn | None,
    batch_size: int,
    *,
    target: str = "artifact",
    min_top1_agreement: float | None = None,
    max_abs_diff: float | None = None,
    agreement_fn: AgreementFn | None = None,
) -> ParityReport:
    """Run ``runner`` and ``source_module`` (a torch module taking the inputs as keyword tensors and
    returning outputs in ``runner.output_names`` order) on ``inputs`` in batches and compare them.

    The batch is capped at the runner's ``max_batch`` when it has one (runtimes that plan memory
    ahead); fixed-shape runners pad their inputs themselves."""
    n = _rows(inputs)
    if n == 0:
        raise DataError("parity needs at least one example")
    cap = getattr(runner, "max_batch", None)
    bs = max(1, min(batch_size, cap) if cap else batch_size)
    names = list(runner.output_names)
    feed = {k: inputs[k] for k in runner.input_names}
    t0 = time.perf_counter()
    got = run_batched(runner.run, feed, bs)
    want = run_batched(lambda b: source_outputs(source_module, b, names), feed, bs)
    seconds = time.perf_counter() - t0

    diff, outputs = _differences(got, want, names, target)
    first = names[0]
    top1 = box = None
    if agreement_fn is not None:
        box = float(agreement_fn(got, want))
    elif np.asarray(want[first]).ndim >= 2:
        top1 = float(np.mean(np.argmax(got[first], axis=-1) == np.argmax(want[first], axis=-1)))
    art_metric = src_metric = None
    if labels is not None and metric_fn is not None:
        art_metric = {k: float(v) for k, v in metric_fn(got, np.asarray(labels)[:n]).items()}
        src_metric = {k: float(v) for k, v in metric_fn(want, np.asarray(labels)[:n]).items()}
    report = ParityReport(
        target=target, examples=n,
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        top1_agreement=top1, artifact_metric=art_metric, source_metric=src_metric,
        batch_size=bs, seconds=round(seconds, 3), box_agreement=box, outputs=outputs,
    )
    enforce(report, min_top1_agreement, max_abs_diff)
    return report


REAL_LENGTH_EXAMPLES = 64


def check_real_lengths(runner: Runner, source_module: Any, inputs: dict[str, np.ndarray], *,
                       target: str = "artifact", examples: int = REAL_LENGTH_EXAMPLES) -> ParityReport | None:
    """Parity the way a server calls the artifact: the first ``examples`` rows, each alone (batch 1) at
    its own length (padding cut off by its attention mask), against the source model on the same row.
    ``check_parity`` runs padded batches; a traced graph or a runtime can answer those right and a
    shorter row wrong. None for inputs without an attention mask (images): their one shape is the
    batched check's."""
    from edgekd.devices.remote_runner import concat_rows, own_length_row

    if "attention_mask" not in inputs:
        return None
    n = min(examples, _rows(inputs))
    if n == 0:
        raise DataError("parity needs at least one example")
    names = list(runner.output_names)
    feed = {k: inputs[k] for k in runner.input_names}
    t0 = time.perf_counter()
    rows = [own_length_row(feed, i) for i in range(n)]
    got = concat_rows([runner.run(r) for r in rows])
    want = concat_rows([source_outputs(source_module, r, names) for r in rows])
    seconds = time.perf_counter() - t0
    diff, outputs = _differences(got, want, names, target)
    first = names[0]
    top1 = (float(np.mean(np.argmax(got[first], axis=-1) == np.argmax(want[first], axis=-1)))
            if np.asarray(want[first]).ndim >= 2 else None)
    return ParityReport(target=target, examples=n, max_abs_diff=float(diff.max()) if diff.size else 0.0,
                        mean_abs_diff=float(diff.mean()) if diff.size else 0.0, top1_agreement=top1,
                        artifact_metric=None, source_metric=None, batch_size=1, seconds=round(seconds, 3),
                        outputs=outputs)


def _differences(got: dict[str, np.ndarray], want: dict[str, np.ndarray], names: list[str],
                 target: str) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Every element's absolute difference, and per output its max and the source's largest magnitude."""
    diffs, outputs = [], {}
    for name in names:
        a, b = np.asarray(got[name], dtype=np.float64), np.asarray(want[name], dtype=np.float64)
        if a.shape != b.shape:
            raise ParityError(f"Export target '{target}': output '{name}' has shape {list(a.shape)}, "
                              f"the source model's has {list(b.shape)}.")
        d = np.abs(a - b).ravel()
        diffs.append(d)
        finite = np.abs(b[np.isfinite(b)])
        outputs[name] = {"max_abs_diff": float(d.max()) if d.size else 0.0,
                         "source_max_abs": float(finite.max()) if finite.size else 0.0}
    return (np.concatenate(diffs) if diffs else np.zeros(0)), outputs


def enforce(report: ParityReport, min_top1_agreement: float | None, max_abs_diff: float | None) -> None:
    misses = report.failures(min_top1_agreement, max_abs_diff)
    if misses:
        err = ParityError(f"Export target '{report.target}' fails parity: {'; '.join(misses)} "
                          f"({report.summary()}). Check the export options (precision, opset) or relax "
                          "export.min_top1_agreement / export.max_abs_diff.")
        err.report = report  # type: ignore[attr-defined]
        raise err
