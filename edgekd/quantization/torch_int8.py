"""int8 quantization of PyTorch models, for the PyTorch and ExecuTorch targets.

* ``int8-dynamic`` / ``int8-weight-only``: torchao's ``quantize_`` swaps Linear weights for int8
  tensor subclasses in place (on a copy here). Its int8 kernels pay off under ``torch.compile``;
  in eager mode on CPU they are usually slower than float, which the speed check reports.
* ``pt2e-xnnpack``: the PT2E flow (``torch.export`` -> ``prepare_pt2e`` with ExecuTorch's
  XNNPACK quantizer -> calibration -> ``convert_pt2e``) gives a graph with quantize/dequantize
  pairs that ExecuTorch's XNNPACK partitioner lowers to int8 kernels.

Both report the float and quantized metric (when an ``evaluate`` function is given) and their
median latency side by side on the example inputs.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from edgekd.errors import MissingBackendError, StageError
from edgekd.recipe import QuantizeConfig

Inputs = Mapping[str, torch.Tensor]


def _torchao(what: str):
    try:
        from torchao import quantization as tq
    except ImportError as e:
        raise MissingBackendError(what, "torchao", None, str(e)) from None
    return tq


def _time(model: nn.Module, inputs: Inputs, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@torch.inference_mode()
def time_side_by_side(models: Mapping[str, nn.Module], inputs: Inputs, runs: int, warmup: int = 3) -> dict[str, float]:
    """Median latency (ms) of each model on the same inputs, runs alternating between the models."""
    for m in models.values():
        _time(m, inputs, warmup)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(runs):
        for name, m in models.items():
            times[name] += _time(m, inputs, 1)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def _pt2e(model: nn.Module, example_inputs: Inputs, calib_batches: Iterable[Inputs], samples: int,
          per_channel: bool) -> tuple[nn.Module, int]:
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
    except ImportError as e:
        raise MissingBackendError("pt2e XNNPACK quantization", "executorch", "executorch", str(e)) from None
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # The batch axis stays dynamic so that calibration batches may differ from the example's size.
    batch = torch.export.Dim("batch")
    dynamic = {name: {0: batch} for name in example_inputs}
    captured = torch.export.export(model, (), kwargs=dict(example_inputs), dynamic_shapes=dynamic).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    prepared = prepare_pt2e(captured, quantizer)
    seen = 0
    with torch.no_grad():
        for batch in calib_batches:
            if seen >= samples:
                break
            prepared(**batch)
            seen += len(next(iter(batch.values())))
    if not seen:
        raise StageError("pt2e-xnnpack quantization calibrates activations: pass calibration batches")
    return convert_pt2e(prepared), seen


TORCH_METHODS = ("int8-dynamic", "int8-weight-only", "pt2e-xnnpack")


def quantize_torch(
    model: nn.Module,
    cfg: QuantizeConfig,
    example_inputs: Inputs,
    calib_batches: Iterable[Inputs] | None = None,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    method: str = "int8-dynamic",
    calibration_samples: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize a copy of ``model`` with ``method`` (one of ``TORCH_METHODS``: torchao int8 dynamic
    activations + int8 weights, torchao int8 weight-only, or the pt2e XNNPACK quantizer, static int8
    for ExecuTorch); ``model`` itself is left as it was. A library function: the quantize stage does
    not call it (its export folders are ONNX Runtime's), so no recipe key selects it.

    ``example_inputs``: keyword tensors of one batch (timing, and graph capture for pt2e).
    ``calib_batches``: keyword-tensor batches for pt2e calibration (batches are taken until
    ``calibration_samples`` examples have been seen; default ``cfg.calibration_samples``, which a recipe's
    quantize section refuses where none of its own setups calibrates).
    """
    if method not in TORCH_METHODS:
        raise StageError(f"torch quantization method '{method}' is unknown; choose one of {', '.join(TORCH_METHODS)}")
    model = model.eval()
    report: dict[str, Any] = {"method": method}
    if method == "pt2e-xnnpack":
        samples = cfg.calibration_samples if calibration_samples is None else calibration_samples
        quantized, seen = _pt2e(model, example_inputs, calib_batches or [], samples, cfg.per_channel)
        report["calibration_samples"] = seen
        report["quantize_nodes"] = sum(1 for n in quantized.graph.nodes if "quantize_per" in str(n.target))
    else:
        tq = _torchao("torchao int8 quantization")
        config = (tq.Int8DynamicActivationInt8WeightConfig() if method == "int8-dynamic"
                  else tq.Int8WeightOnlyConfig())
        quantized = copy.deepcopy(model)
        tq.quantize_(quantized, config)
        report["quantized_linears"] = sum(
            1 for m in quantized.modules()
            if isinstance(m, nn.Linear) and type(m.weight).__name__ not in ("Parameter", "Tensor")
        )
    report["precision"] = "int8"
    if evaluate is not None:
        before, after = dict(evaluate(model)), dict(evaluate(quantized))
        key = cfg.guard_metric
        if key not in before:
            raise StageError(f"quantize.guard_metric '{key}' is not among the metrics {sorted(before)}")
        drop = before[key] - after[key]
        report["accuracy_guard"] = {"metric": key, "budget": cfg.max_accuracy_drop, "float": before,
                                    "quantized": after, "drop": round(drop, 6),
                                    "passed": drop <= cfg.max_accuracy_drop + 1e-12}
    if method == "pt2e-xnnpack":
        # The converted graph simulates int8 with float quantize/dequantize ops; its speed exists
        # only once ExecuTorch lowers it to XNNPACK kernels, which the bench stage measures.
        report["speed_guard"] = {"skipped": "pt2e graphs run int8 only after ExecuTorch lowering; "
                                            "time the .pte with the bench stage"}
        report["recommended"] = "quantized" if report.get("accuracy_guard", {}).get("passed", True) else "float"
        return quantized, report
    speed = time_side_by_side({"float": model, "quantized": quantized}, example_inputs, cfg.speed_runs)
    faster = speed["quantized"] < speed["float"]
    report["speed_guard"] = {"float_p50_ms": speed["float"], "quantized_p50_ms": speed["quantized"],
                             "speedup": round(speed["float"] / speed["quantized"], 3), "quantized_faster": faster}
    if not faster:
        report["speed_guard"]["note"] = (
            f"{method} is not faster than float in eager PyTorch here "
            f"({speed['quantized']:.3f} ms vs {speed['float']:.3f} ms)"
        )
    passed = report.get("accuracy_guard", {}).get("passed", True)
    report["recommended"] = "quantized" if passed and faster else "float"
    return quantized, report
