"""TensorRT engine building and running with the TensorRT Python API (10.x; 8.6 where it differs).

Imported only when ``tensorrt`` imports. Device buffers are torch CUDA tensors, so no pycuda or
cuda-python is needed beside TensorRT.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import UnsupportedTargetError

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def cuda_ready() -> tuple[bool, str | None]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed (its CUDA tensors hold TensorRT's buffers)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, None


def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


def _parse(trt: Any, builder: Any, onnx_path: Path, logger: Any) -> Any:
    flags = 0
    major = int(trt.__version__.split(".")[0])
    if major < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        ops = sorted({str(e.node_operator()) for e in errors if hasattr(e, "node_operator") and e.node_operator()})
        detail = "; ".join(str(e.desc()) for e in errors)[:600]
        what = f"operator(s) {', '.join(ops)}" if ops else "the ONNX graph"
        err = UnsupportedTargetError(
            f"Export target 'tensorrt' cannot convert {what}: {detail}. Use a newer TensorRT, replace the "
            "operator in the model, or serve the 'onnx' target instead."
        )
        err.target, err.operator = "tensorrt", (ops[0] if ops else None)  # type: ignore[attr-defined]
        raise err
    return network, parser


def _calibrator(trt: Any, batches: list[dict[str, np.ndarray]], cache: Path) -> Any:
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds the given samples batch by batch; the cache lets a rebuild skip calibration."""

        def __init__(self) -> None:
            super().__init__()
            self._batches: Iterator[dict[str, np.ndarray]] = iter(batches)
            self._keep: list[Any] = []

        def get_batch_size(self) -> int:
            return int(next(iter(batches[0].values())).shape[0])

        def get_batch(self, names_: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._keep = [torch.from_numpy(np.ascontiguousarray(batch[n])).cuda() for n in names_]
            return [t.data_ptr() for t in self._keep]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()


def build_engine(onnx_path: Path, engine_path: Path, shapes: Shapes, precision: str, workspace_mb: int,
                 calibration: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Build and serialise an engine with one optimisation profile over ``shapes`` (min, opt, max)."""
    import tensorrt as trt

    logger = _logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, onnx_path, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("fp16", "int8"):
        if not builder.platform_has_fast_fp16:
            raise UnsupportedTargetError(f"This GPU has no fast fp16, so a '{precision}' engine would be slow: "
                                         "set export.options.tensorrt.precision: fp32.")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = engine_path.with_name("calibration.cache")
    if precision == "int8":
        if not calibration:
            raise UnsupportedTargetError("An int8 TensorRT engine needs calibration samples: pass example inputs.")
        config.set_flag(trt.BuilderFlag.INT8)
        # Calibration runs at one shape: the samples' own.
        calib_profile = builder.create_optimization_profile()
        for name, arr in calibration[0].items():
            calib_profile.set_shape(name, arr.shape, arr.shape, arr.shape)
        config.set_calibration_profile(calib_profile)
        config.int8_calibrator = _calibrator(trt, calibration, cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UnsupportedTargetError(
            "TensorRT could not build an engine from the ONNX graph (its log above says why): try "
            "precision fp32, a larger workspace_mb, or smaller max_batch/max_sequence."
        )
    engine_path.write_bytes(bytes(serialized))
    notes = {"tensorrt": trt.__version__, "layers": network.num_layers}
    if precision == "int8":
        notes["calibration_cache"] = cache.name
    return notes


class TensorRTRunner:
    """A serialised engine, run with the TensorRT 10 tensor API on torch CUDA buffers."""

    def __init__(self, path: Path):
        import tensorrt as trt
        import torch

        self._torch, self._trt = torch, trt
        runtime = trt.Runtime(_logger(trt))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise UnsupportedTargetError(
                f"TensorRT could not load {path}: an engine runs only on the GPU model and TensorRT version "
                "that built it. Rebuild it there (run trtexec.sh in its folder)."
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.device = "cuda"
        self.providers = [f"TensorRT {trt.__version__}"]
        self.stream = torch.cuda.Stream()
        self.max_batch = None
        profile = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.input_names}
        self._profile = {n: (tuple(v[0]), tuple(v[2])) for n, v in profile.items()}
        if profile:
            self.max_batch = int(min(v[2][0] for v in profile.values()))

    def _dtype(self, name: str) -> Any:
        return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        keep = []
        for name in self.input_names:
            arr = np.ascontiguousarray(np.asarray(inputs[name]).astype(self._dtype(name), copy=False))
            lo, hi = self._profile[name]
            if any(s < a or s > b for s, a, b in zip(arr.shape, lo, hi, strict=False)):
                raise UnsupportedTargetError(
                    f"Input '{name}' of shape {list(arr.shape)} is outside the engine's profile "
                    f"{list(lo)}..{list(hi)}: re-export with larger max_batch/max_sequence."
                )
            t = torch.from_numpy(arr).cuda()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=self._dtype(name))).dtype
            outs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}
