"""TensorRT engine building and running with the TensorRT Python API, 10.x and 11.x.

Networks are strongly typed: every tensor keeps the type the ONNX graph gives it, so precision is a
property of the graph, not of builder flags (TensorRT 11 removed the weakly typed flags, the int8
calibrator and the platform fp16 query). fp16 engines are built from an ONNX converted to fp16, int8
engines from a Q/DQ ONNX (explicit quantization). What differs between 10 and 11 lives in ``TrtApi``.

Imported only when ``tensorrt`` imports. Device buffers are torch CUDA tensors, so no pycuda or
cuda-python is needed beside TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import UnsupportedTargetError

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
SUPPORTED_MAJORS = (10, 11)


def cuda_ready() -> tuple[bool, str | None]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed (its CUDA tensors hold TensorRT's buffers)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, None


@dataclass(frozen=True)
class TrtApi:
    """The one place where TensorRT 10.x and 11.x differ for edgekd."""

    trt: Any
    major: int

    @classmethod
    def load(cls) -> TrtApi:
        import tensorrt as trt

        major = int(str(trt.__version__).split(".")[0])
        if major not in SUPPORTED_MAJORS:
            raise UnsupportedTargetError(
                f"TensorRT {trt.__version__} is installed; edgekd builds and runs strongly typed engines with "
                f"TensorRT {' or '.join(map(str, SUPPORTED_MAJORS))}.x: install one of those."
            )
        return cls(trt, major)

    def network_flags(self) -> int:
        # 10.x: strong typing is opt-in (NetworkDefinitionCreationFlag.STRONGLY_TYPED).
        # 11.x: always on; the flag is deprecated and ignored, so none is passed.
        if self.major == 10:
            return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return 0


def _parse(api: TrtApi, builder: Any, onnx_path: Path, logger: Any) -> tuple[Any, Any]:
    trt = api.trt
    network = builder.create_network(api.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        ops = sorted({str(e.node_operator()) for e in errors if e.node_operator()})
        detail = "; ".join(str(e.desc()) for e in errors)[:600]
        what = f"operator(s) {', '.join(ops)}" if ops else "the ONNX graph"
        err = UnsupportedTargetError(
            f"Export target 'tensorrt' cannot convert {what}: {detail}. Use a newer TensorRT, replace the "
            "operator in the model, or serve the 'onnx' target instead."
        )
        err.target, err.operator = "tensorrt", (ops[0] if ops else None)  # type: ignore[attr-defined]
        raise err
    return network, parser


def build_engine(onnx_path: Path, engine_path: Path, shapes: Shapes, workspace_mb: int) -> dict[str, Any]:
    """Build and serialise a strongly typed engine from ``onnx_path`` (whose tensor types set the
    precision) with one optimisation profile over ``shapes`` (min, opt, max)."""
    api = TrtApi.load()
    trt = api.trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(api, builder, onnx_path, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UnsupportedTargetError(
            "TensorRT could not build an engine from the ONNX graph (its log above says why): try "
            "precision fp32, a larger workspace_mb, or smaller max_batch/max_sequence."
        )
    engine_path.write_bytes(bytes(serialized))
    return {"tensorrt": str(trt.__version__), "layers": int(network.num_layers), "strongly_typed": True,
            "built_from": Path(onnx_path).name}


def _np_dtypes(trt: Any) -> dict[Any, Any]:
    return {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT8: np.int8,
            trt.DataType.INT32: np.int32, trt.DataType.INT64: np.int64, trt.DataType.BOOL: np.bool_}


class TensorRTRunner:
    """A serialised engine, run with the TensorRT tensor API (10.x and 11.x) on torch CUDA buffers."""

    def __init__(self, path: Path):
        import torch

        api = TrtApi.load()
        trt = api.trt
        self._torch, self._trt = torch, trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
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
        self._dtypes = _np_dtypes(trt)
        profile = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.input_names}
        self._profile = {n: (tuple(v[0]), tuple(v[2])) for n, v in profile.items()}
        if profile:
            self.max_batch = int(min(v[2][0] for v in profile.values()))

    def _dtype(self, name: str) -> Any:
        dt = self.engine.get_tensor_dtype(name)
        if dt not in self._dtypes:
            raise UnsupportedTargetError(f"Engine tensor '{name}' has type {dt}, which edgekd cannot feed or read.")
        return np.dtype(self._dtypes[dt])

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
        return {k: v.cpu().numpy().astype(np.float32) if v.dtype == torch.float16 else v.cpu().numpy()
                for k, v in outs.items()}
