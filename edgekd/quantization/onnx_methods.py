"""The ONNX quantization methods, registered under the recipe's ``quantize.method`` names.

Each method turns a float ONNX file into a quantized one and accepts ``exclude``: node names
kept in float (the accuracy guard's lever). All use ONNX Runtime's own tools:
``quantize_dynamic``, ``quantize_static`` (QDQ, calibrated; ranges cached so retries do not
calibrate again) and ``onnxruntime.transformers.float16``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekd.errors import MissingBackendError
from edgekd.quantization.calibration import make_reader
from edgekd.recipe import QuantizeConfig

# Operators whose error can be traced to one node (they hold weights or do the heavy arithmetic):
# the candidates of the sensitivity search.
INT8_CANDIDATES = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "Gather", "EmbedLayerNormalization", "LSTM",
})
FP16_CANDIDATES = frozenset({
    "MatMul", "Gemm", "Conv", "Attention", "Softmax", "LayerNormalization", "SkipLayerNormalization",
    "ReduceMean", "Pow", "Exp", "Erf",
})
STATIC_DEFAULT_OPS = ("MatMul", "Gemm", "Conv")


def _ort_quant():
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise MissingBackendError("ONNX quantization", "onnxruntime", "onnx", str(e)) from None
    return quantization


class OnnxMethod(Protocol):
    precision: str
    candidate_ops: frozenset[str]

    def quantize(self, src: Path, dst: Path, exclude: list[str]) -> None: ...

    def settings(self) -> dict[str, Any]: ...


_METHODS: dict[str, Callable[..., OnnxMethod]] = {}


def register(name: str):
    """Register an ONNX quantization method under ``name``, which edgekd.registry.QUANTIZE_METHODS
    must list (the recipe validates quantize.method against that table)."""
    from edgekd.registry import QUANTIZE_METHODS

    if name not in QUANTIZE_METHODS:
        raise ValueError(f"quantization method '{name}' is not in edgekd.registry.QUANTIZE_METHODS: add it there")

    def deco(cls):
        _METHODS[name] = cls
        return cls
    return deco


def registered_methods() -> dict[str, Callable[..., OnnxMethod]]:
    return dict(_METHODS)


def make_method(cfg: QuantizeConfig, calib_inputs: Mapping[str, np.ndarray] | None, input_names: list[str],
                dtypes: Mapping[str, np.dtype], workdir: Path, external_data: bool) -> OnnxMethod:
    """The method ``cfg.method`` set up for one model; its module (edgekd.registry.QUANTIZE_METHODS)
    is imported first."""
    import importlib

    from edgekd.registry import QUANTIZE_METHODS

    importlib.import_module(QUANTIZE_METHODS[cfg.method])
    return _METHODS[cfg.method](cfg, calib_inputs, input_names, dtypes, workdir, external_data)


def _qtype(name: str):
    q = _ort_quant()
    return {"qint8": q.QuantType.QInt8, "quint8": q.QuantType.QUInt8}[name]


@register("dynamic")
class Dynamic:
    precision = "int8-dynamic"

    def __init__(self, cfg: QuantizeConfig, calib_inputs: Any, input_names: list[str], dtypes: Any,
                 workdir: Path, external_data: bool):
        self.cfg, self.external = cfg, external_data
        q = _ort_quant()
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        self.op_types = list(cfg.op_types or IntegerOpsRegistry.keys())
        self.candidate_ops = frozenset(self.op_types) & INT8_CANDIDATES
        self._q = q

    def quantize(self, src: Path, dst: Path, exclude: list[str]) -> None:
        self._q.quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=self.op_types, per_channel=self.cfg.per_channel,
            reduce_range=self.cfg.reduce_range, weight_type=_qtype(self.cfg.weight_type),
            nodes_to_exclude=list(exclude), use_external_data_format=self.external,
        )

    def settings(self) -> dict[str, Any]:
        return {"weight_type": self.cfg.weight_type, "activation_type": "quint8 (dynamic)",
                "per_channel": self.cfg.per_channel, "reduce_range": self.cfg.reduce_range,
                "op_types": self.op_types}


@register("static")
class Static:
    precision = "int8-static"

    def __init__(self, cfg: QuantizeConfig, calib_inputs: Mapping[str, np.ndarray] | None,
                 input_names: list[str], dtypes: Mapping[str, np.dtype], workdir: Path, external_data: bool):
        from edgekd.errors import DataError

        if calib_inputs is None:
            raise DataError("quantize.method 'static' calibrates on real examples: pass calibration inputs")
        self.cfg, self.external = cfg, external_data
        self._q = _ort_quant()
        self.op_types = list(cfg.op_types or STATIC_DEFAULT_OPS)
        self.candidate_ops = frozenset(self.op_types) & INT8_CANDIDATES
        self.reader = make_reader(calib_inputs, cfg.calibration_samples, input_names, dtypes)
        self.cache = Path(workdir) / "calibration.json"  # ranges computed once, reused by every retry

    def quantize(self, src: Path, dst: Path, exclude: list[str]) -> None:
        q = self._q
        method = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                  "entropy": q.CalibrationMethod.Entropy}[self.cfg.calibration_method]
        extra = {"CalibPercentile": self.cfg.percentile} if self.cfg.calibration_method == "percentile" else {}
        q.quantize_static(
            str(src), str(dst), self.reader, quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=self.op_types, per_channel=self.cfg.per_channel,
            reduce_range=self.cfg.reduce_range, activation_type=_qtype(self.cfg.activation_type),
            weight_type=_qtype(self.cfg.weight_type), nodes_to_exclude=list(exclude),
            use_external_data_format=self.external, calibrate_method=method, extra_options=extra,
            calibration_cache_path=self.cache,
        )

    def settings(self) -> dict[str, Any]:
        return {"weight_type": self.cfg.weight_type, "activation_type": self.cfg.activation_type,
                "per_channel": self.cfg.per_channel, "reduce_range": self.cfg.reduce_range,
                "op_types": self.op_types, "format": "QDQ",
                "calibration_method": self.cfg.calibration_method,
                "calibration_samples": self.reader.served}


@register("fp16")
class Float16:
    precision = "fp16"
    candidate_ops = FP16_CANDIDATES

    def __init__(self, cfg: QuantizeConfig, calib_inputs: Any, input_names: list[str], dtypes: Any,
                 workdir: Path, external_data: bool):
        self.cfg, self.external = cfg, external_data

    def quantize(self, src: Path, dst: Path, exclude: list[str]) -> None:
        import onnx

        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError as e:
            raise MissingBackendError("fp16 conversion", "onnxruntime", "onnx", str(e)) from None
        model = onnx.load(str(src))
        # keep_io_types: callers keep feeding float32/int64 and reading float32 logits.
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(exclude) or None)
        onnx.save(half, str(dst), save_as_external_data=self.external)

    def settings(self) -> dict[str, Any]:
        return {"converter": "onnxruntime.transformers.float16", "keep_io_types": True}
