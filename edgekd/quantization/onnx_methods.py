"""The ONNX quantization methods, registered under the recipe's ``quantize.method`` names.

Each method turns a float ONNX file into a quantized one and accepts ``exclude``: node names
kept in float (the accuracy guard's lever). All use ONNX Runtime's own tools:
``quantize_dynamic``, ``quantize_static`` (QDQ, calibrated; ranges cached so retries do not
calibrate again), ``onnxruntime.transformers.float16``, and ``MatMulNBitsQuantizer`` for 4-bit
embedding tables (``quantize.embedding_bits``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekd.errors import MissingBackendError
from edgekd.quantization.calibration import make_reader
from edgekd.quantization.weight_encoding import encode_unsigned, settle, signed_weights
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

log = logging.getLogger(__name__)


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


def quantize_embeddings_4bit(path: Path, block_size: int, exclude: list[str], external_data: bool,
                             float_rows: int = 0) -> int:
    """Rewrite every Gather over a 2-D weight (the embedding tables) in the ONNX file ``path`` as ONNX
    Runtime's blockwise 4-bit ``GatherBlockQuantized`` (asymmetric, ``block_size`` values of a row per
    scale), in place. Nodes named in ``exclude`` stay as they are, and so does a table of at most
    ``float_rows`` rows (``small_tables``: its float32 values, read by its plain Gather). Returns how
    many tables got 4-bit values; none is an error (the graph has no embedding Gather left to shrink,
    e.g. it was fused into EmbedLayerNormalization or already quantized)."""
    import onnx

    from edgekd.errors import StageError

    q = _ort_quant()
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(path))
    small = small_tables(model, float_rows) if float_rows else []
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=4,
                                       quant_format=q.QuantFormat.QOperator, op_types_to_quantize=("Gather",),
                                       quant_axes=(("Gather", 1),))
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=[*exclude, *small], algo_config=cfg)
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block (e.g. the padding row) has scale 0
        quantizer.process()
    n = sum(node.op_type == "GatherBlockQuantized" for node in quantizer.model.model.graph.node)
    _pack_uint4_as_uint8(quantizer.model.model)
    if n == 0:
        why = (f" (its {len(small)} embedding table(s) have at most quantize.embedding_float_rows={float_rows} "
               "rows, so they stay float)" if small else "")
        raise StageError(f"quantize.embedding_bits: 4 found no Gather over a float weight to make 4-bit in "
                         f"{path.name}{why}; the embeddings may also have been fused into another operator, "
                         "quantized already, or kept in float by the guard: set quantize.embedding_bits: 8")
    if small:
        log.info("quantize: %d of %d embedding tables have at most %d rows and stay float32", len(small),
                 n + len(small), float_rows)
    tmp = path.with_name(path.stem + ".g4" + path.suffix)
    quantizer.model.save_model_to_file(str(tmp), external_data)
    tmp.replace(path)
    return n


def small_tables(model: Any, float_rows: int) -> list[str]:
    """The names of the Gather nodes (row lookups, axis 0) over a 2-D float initializer of at most
    ``float_rows`` rows (an unnamed one is named, in ``model``): position and token-type tables,
    never a vocabulary. They stay float32 with 4-bit embeddings:
    the file then pays for them what it paid when they held 4-bit values decoded to float (per call,
    ONNX Runtime's GatherBlockQuantized costs more than such a table saves: about 4% of the default
    student's batch-1 call at 2 threads, for 0.66 MB), and their values are the model's own, not
    rounded: a 4-bit position table moves every token's input (with these tables 4-bit, the default's
    shipped file answered 32 / 16 / 29 test texts of seeds 42 / 43 / 44 otherwise than its fp32 model;
    with their own values, 13 / 13 / 17)."""
    from onnx import TensorProto, helper

    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if t is None or len(t.dims) != 2 or t.data_type != TensorProto.FLOAT:
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if axis == 0 and int(t.dims[0]) <= float_rows:
            if not node.name:  # the quantizer excludes by name, and an empty one would match every unnamed node
                node.name = f"edgekd_small_table_gather_{len(out)}_{t.name}"
            out.append(node.name)
    return out


def _pack_uint4_as_uint8(model: Any) -> int:
    """Store each GatherBlockQuantized table (and its zero points) as uint8, two 4-bit values per byte,
    instead of ONNX's UINT4 type: the same bytes, low nibble first in both, so the same answers to the
    bit, but ONNX Runtime's kernel gathers uint8-packed rows about 5x faster (measured on the default
    run's 16,545 x 384 table: 20 against 106 us for 26 tokens, once per embedding table and call).
    A tensor whose last axis is odd is left as it is (its rows do not start on a byte). Returns how many
    nodes were rewritten."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != "GatherBlockQuantized":
            continue
        names = [node.input[0]] + ([node.input[3]] if len(node.input) > 3 and node.input[3] else [])
        tensors = [inits.get(n) for n in names]
        if any(t is None or t.data_type != onnx.TensorProto.UINT4 or t.dims[-1] % 2 or not t.raw_data
               for t in tensors):
            continue
        for t in tensors:
            dims = [*t.dims[:-1], t.dims[-1] // 2]
            packed = np.frombuffer(t.raw_data, dtype=np.uint8).reshape(dims)
            t.CopyFrom(numpy_helper.from_array(packed.copy(), t.name))
        done += 1
    return done


def _qtype(name: str):
    q = _ort_quant()
    return {"qint8": q.QuantType.QInt8, "quint8": q.QuantType.QUInt8}[name]


@register("dynamic")
class Dynamic:
    precision = "int8-dynamic"

    def __init__(self, cfg: QuantizeConfig, calib_inputs: Any, input_names: list[str], dtypes: Any,
                 workdir: Path, external_data: bool):
        self.cfg, self.external = cfg, external_data
        if cfg.unsigned_weights == "auto":  # not settled by the stage for its device: this machine's CPU
            self.cfg, _ = settle(cfg)
        q = _ort_quant()
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        self.op_types = _int8_op_types(cfg, IntegerOpsRegistry.keys())
        self.candidate_ops = frozenset(self.op_types) & INT8_CANDIDATES
        self._q = q

    def quantize(self, src: Path, dst: Path, exclude: list[str]) -> None:
        self._q.quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=self.op_types, per_channel=self.cfg.per_channel,
            reduce_range=self.cfg.reduce_range, weight_type=_qtype(self.cfg.weight_type),
            nodes_to_exclude=list(exclude), use_external_data_format=self.external,
        )
        if self.cfg.weight_type == "qint8":
            done, left = requantize_qattention(Path(src), Path(dst), per_channel=self.cfg.per_channel,
                                               reduce_range=self.cfg.reduce_range, external_data=self.external)
            self._qattention = {"rewritten": done, "left_with_one_scale": left}
            if left:
                log.warning("quantize: QAttention %s keep ONNX Runtime's one scale for Q, K and V (no packed "
                            "float weight to re-quantize from)", ", ".join(left))
        if self.cfg.unsigned_weights is True:
            self._unsigned = _store_unsigned(Path(dst), self.external)
        if self.cfg.embedding_bits == 4:
            quantize_embeddings_4bit(Path(dst), self.cfg.embedding_block_size, exclude, self.external,
                                     self.cfg.embedding_float_rows)

    def settings(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        qattention = getattr(self, "_qattention", None)  # what the last quantize() did to QAttention weights
        if qattention and (qattention["rewritten"] or qattention["left_with_one_scale"]):
            extra["qattention_weights"] = {
                **qattention, "scales": "per column" if self.cfg.per_channel else "one per Q, K and V projection"}
        elif self.cfg.fuse == "packed" and self.cfg.weight_type != "qint8":
            extra["qattention_weights"] = "ONNX Runtime's (one scale for Q, K and V together)"
        return {"weight_type": self.cfg.weight_type, "activation_type": "quint8 (dynamic)",
                "per_channel": self.cfg.per_channel, "reduce_range": self.cfg.reduce_range,
                **_encoding_settings(self.cfg, getattr(self, "_unsigned", None)),
                "op_types": self.op_types, **_embedding_settings(self.cfg), **extra}


def requantize_qattention(src: Path, dst: Path, *, per_channel: bool, reduce_range: bool,
                          external_data: bool) -> tuple[int, list[str]]:
    """Give each ``QAttention`` in ``dst`` the int8 weights its Q, K and V projections would get as
    three MatMuls, from the packed float weight in ``src``; returns how many were rewritten and the
    names of those left as ONNX Runtime quantized them (no float Q|K|V weight found for them).

    ONNX Runtime's quantizer gives a QAttention one scale for the whole packed Q/K/V matrix (7-bit);
    the MatMuls of the unpacked graph each get their own (symmetric int8, ``max|w| / 127``, or
    ``/ 64`` with ``reduce_range``; per output column with ``per_channel``), which is also the
    rounding quantization-aware recovery trains with. QAttention takes a scale per column, so each
    projection's columns get its scale: the int8 file then computes what the unpacked one does
    (``tests/test_attention_pack.py``), only with fewer operators."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(dst))
    inits = {t.name: t for t in model.graph.initializer}
    floats = None
    qmax = 64 if reduce_range else 127
    done, left = 0, []
    for node in model.graph.node:
        if node.op_type != "QAttention":
            continue
        if floats is None:
            floats = {t.name: t for t in onnx.load(str(src)).graph.initializer}
        w_name, s_name, z_name = node.input[1], node.input[4], node.input[7]
        base = floats.get(w_name.removesuffix("_quantized")) if w_name.endswith("_quantized") else None
        w = None if base is None else numpy_helper.to_array(base).astype(np.float32)
        if w is None or w.ndim != 2 or w.shape[1] % 3 or not {w_name, s_name, z_name} <= inits.keys():
            left.append(node.name or w_name)
            continue
        absmax = np.abs(w).max(axis=0) if per_channel else np.repeat(
            [np.abs(part).max() for part in np.split(w, 3, axis=1)], w.shape[1] // 3)
        scale = (np.maximum(absmax, np.finfo(np.float32).tiny) / qmax).astype(np.float32)
        q = np.clip(np.round(w / scale[None, :]), -qmax, qmax).astype(np.int8)
        inits[w_name].CopyFrom(numpy_helper.from_array(q, w_name))
        inits[s_name].CopyFrom(numpy_helper.from_array(scale, s_name))
        inits[z_name].CopyFrom(numpy_helper.from_array(np.zeros(w.shape[1], np.int8), z_name))
        done += 1
    if done:
        tmp = Path(dst).with_name(Path(dst).stem + ".qattn" + Path(dst).suffix)
        onnx.save(model, str(tmp), save_as_external_data=external_data,
                  location=(Path(dst).name + ".data") if external_data else None)
        tmp.replace(dst)
    return done, left


def _store_unsigned(path: Path, external: bool) -> tuple[int, int]:
    """(weights rewritten unsigned, weights left signed): one another node also reads stays signed, and
    the log and the report say so."""
    done = encode_unsigned(path, external)
    left = signed_weights(path)
    if left:
        log.warning("quantize: %d int8 weight(s) of %s are read by more than one node and stay signed "
                    "(quantize.unsigned_weights)", left, path.name)
    return done, left


def _encoding_settings(cfg: QuantizeConfig, stored: tuple[int, int] | None) -> dict[str, Any]:
    if cfg.unsigned_weights is not True:
        return {"unsigned_weights": False}
    done, left = stored or (0, 0)
    out = {"unsigned_weights": True, "weights_stored": f"uint8, value + 128 ({done} weight tensors)"}
    if left:
        out["weights_left_signed"] = f"{left} (each read by more than one node)"
    return out


def _int8_op_types(cfg: QuantizeConfig, default: Any) -> list[str]:
    """The operator types the int8 pass quantizes; with ``embedding_bits: 4`` the embedding Gathers get
    their 4 bits after it (``quantize_embeddings_4bit``), not 8 in it."""
    ops = list(cfg.op_types or default)
    return [op for op in ops if op != "Gather"] if cfg.embedding_bits == 4 else ops


def _embedding_settings(cfg: QuantizeConfig) -> dict[str, Any]:
    if cfg.embedding_bits == 4:
        out = {"embeddings": f"4-bit GatherBlockQuantized, block {cfg.embedding_block_size}"}
        if cfg.embedding_float_rows:
            out["embeddings"] += (f"; tables of at most {cfg.embedding_float_rows} rows keep their float32 "
                                  "values, read by a plain Gather")
        return out
    return {}


@register("static")
class Static:
    precision = "int8-static"

    def __init__(self, cfg: QuantizeConfig, calib_inputs: Mapping[str, np.ndarray] | None,
                 input_names: list[str], dtypes: Mapping[str, np.dtype], workdir: Path, external_data: bool):
        from edgekd.errors import DataError

        if calib_inputs is None:
            raise DataError("quantize.method 'static' calibrates on real examples: pass calibration inputs")
        self.cfg, self.external = cfg, external_data
        if cfg.unsigned_weights == "auto":  # not settled by the stage for its device: this machine's CPU
            self.cfg, _ = settle(cfg)
        self._q = _ort_quant()
        self.op_types = _int8_op_types(cfg, STATIC_DEFAULT_OPS)
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
        if self.cfg.unsigned_weights is True:
            self._unsigned = _store_unsigned(Path(dst), self.external)
        if self.cfg.embedding_bits == 4:
            quantize_embeddings_4bit(Path(dst), self.cfg.embedding_block_size, exclude, self.external,
                                     self.cfg.embedding_float_rows)

    def settings(self) -> dict[str, Any]:
        return {"weight_type": self.cfg.weight_type, "activation_type": self.cfg.activation_type,
                "per_channel": self.cfg.per_channel, "reduce_range": self.cfg.reduce_range,
                **_encoding_settings(self.cfg, getattr(self, "_unsigned", None)),
                "op_types": self.op_types, "format": "QDQ",
                "calibration_method": self.cfg.calibration_method,
                "calibration_samples": self.reader.served, **_embedding_settings(self.cfg)}


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
