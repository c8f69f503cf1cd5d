"""Stand-ins of the ``tensorrt`` Python module, 10.x and 11.x, for running edgekd's engine build here.

Each exposes exactly the names of its version's Python API that a TensorRT build from ONNX touches,
no more, so a call that does not exist in that version raises AttributeError as the real module
would. The names come from NVIDIA's documentation:

* 10.x: Python API reference, "Builder" page (tensorrt/latest/_static/python-api/infer/Core/Builder.html
  while 10.x was current): ``NetworkDefinitionCreationFlag`` EXPLICIT_BATCH [deprecated, ignored],
  STRONGLY_TYPED, PREFER_AOT_PYTHON_PLUGINS, PREFER_JIT_PYTHON_PLUGINS; ``Builder.platform_has_tf32``,
  ``platform_has_fast_fp16``, ``platform_has_fast_int8``, ``create_network``,
  ``create_builder_config``, ``create_optimization_profile``, ``build_serialized_network``;
  "BuilderConfig" page: ``set_memory_pool_limit``, ``add_optimization_profile``, ``set_flag``,
  ``int8_calibrator``, ``set_calibration_profile``; ``BuilderFlag.FP16/INT8/...``;
  ``IInt8EntropyCalibrator2`` ("Int8" calibrator pages); "Parsers/Onnx" page: ``OnnxParser(network,
  logger)``, ``parse_from_file``, ``num_errors``, ``get_error`` -> ``ParserError.desc()``,
  ``node_operator()``; ``MemoryPoolType.WORKSPACE``; ``Logger(Logger.WARNING)``;
  ``INetworkDefinition.num_layers``; ``IOptimizationProfile.set_shape``.
* 11.x: the same pages for 11.0.0 (tensorrt/11.0.0/_static/python-api/infer/Core/Builder.html):
  STRONGLY_TYPED is "[DEPRECATED] ... always enabled ... retained for API compatibility but is
  ignored" and EXPLICIT_BATCH is gone; ``Builder`` has no ``platform_has_*``; and the migration
  guide "Removed Python APIs and Replacements" (tensorrt-10x-to-11x-python-api-reference.html)
  removes ``BuilderFlag.FP16/INT8/FP8/BF16/INT4/FP4/OBEY_PRECISION_CONSTRAINTS/
  PREFER_PRECISION_CONSTRAINTS/DIRECT_IO``, ``IBuilderConfig.int8_calibrator``,
  ``set_calibration_profile``/``get_calibration_profile`` and the quantization flags; the
  ``IInt8*Calibrator`` classes are gone with them ("explicit quantization with Q/DQ nodes").

The "engine" a stand-in serialises is JSON of what the build received (flags, profile, the graph's
tensor types), so a test can check what the real TensorRT would have been asked to build.
"""

from __future__ import annotations

import importlib.machinery
import json
import types
from typing import Any


class _Logger:
    __slots__ = ("severity",)
    WARNING = 2

    def __init__(self, severity: int):
        self.severity = severity


class _Profile:
    __slots__ = ("shapes",)

    def __init__(self):
        self.shapes: dict[str, Any] = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class _Network:
    __slots__ = ("flags", "num_layers", "graph")

    def __init__(self, flags: int):
        self.flags, self.num_layers, self.graph = flags, 0, None


class _ParserError:
    __slots__ = ("_desc", "_op")

    def __init__(self, desc: str, op: str):
        self._desc, self._op = desc, op

    def desc(self):
        return self._desc

    def node_operator(self):
        return self._op


def _make(version: str) -> types.ModuleType:
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)

    class NetworkDefinitionCreationFlag:
        if major == 10:
            EXPLICIT_BATCH = 0
            STRONGLY_TYPED = 1
            PREFER_AOT_PYTHON_PLUGINS = 2
            PREFER_JIT_PYTHON_PLUGINS = 3
        else:
            STRONGLY_TYPED = 0
            PREFER_AOT_PYTHON_PLUGINS = 1
            PREFER_JIT_PYTHON_PLUGINS = 2

    class MemoryPoolType:
        WORKSPACE = 0

    class BuilderFlag:
        GPU_FALLBACK = 1
        REFIT = 2
        DEBUG = 3
        if major == 10:
            FP16 = 0
            INT8 = 4
            OBEY_PRECISION_CONSTRAINTS = 5
            PREFER_PRECISION_CONSTRAINTS = 6

    class BuilderConfig:
        __slots__ = ("pools", "profiles", "flags", "_calibrator", "_calib_profile")

        def __init__(self):
            self.pools: dict[int, int] = {}
            self.profiles: list[_Profile] = []
            self.flags: set[int] = set()

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_flag(self, flag):
            self.flags.add(flag)

        if major == 10:
            def set_calibration_profile(self, profile):
                self._calib_profile = profile

            @property
            def int8_calibrator(self):
                return getattr(self, "_calibrator", None)

            @int8_calibrator.setter
            def int8_calibrator(self, value):
                self._calibrator = value

    class Builder:
        __slots__ = ("logger",)

        def __init__(self, logger):
            self.logger = logger

        if major == 10:
            platform_has_tf32 = True
            platform_has_fast_fp16 = True
            platform_has_fast_int8 = True

        def create_network(self, flags=0):
            return _Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return _Profile()

        def build_serialized_network(self, network, config):
            strongly = (major == 11) or bool(network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            weak_flags = {getattr(BuilderFlag, n, None) for n in ("FP16", "INT8")} - {None}
            if strongly and config.flags & weak_flags:
                return None  # TensorRT 10 refuses precision flags on a strongly typed network
            return json.dumps({
                "version": version, "network_flags": network.flags, "strongly_typed": strongly,
                "builder_flags": sorted(config.flags), "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                "profiles": [p.shapes for p in config.profiles], "graph": network.graph,
            }).encode()

    class OnnxParser:
        __slots__ = ("network", "logger", "_errors")

        def __init__(self, network, logger):
            self.network, self.logger, self._errors = network, logger, []

        def parse_from_file(self, path):
            import onnx

            model = onnx.load(path)
            ops = sorted({n.op_type for n in model.graph.node})
            if "NonExistentOp" in ops:  # what a parse failure returns, for the error path
                self._errors = [_ParserError("No importer registered for op: NonExistentOp", "NonExistentOp")]
                return False
            self.network.num_layers = len(model.graph.node)
            self.network.graph = {
                "file": str(path), "ops": ops,
                "initializer_types": sorted({onnx.TensorProto.DataType.Name(t.data_type)
                                             for t in model.graph.initializer}),
                "inputs": {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)
                           for i in model.graph.input},
            }
            return True

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, i):
            return self._errors[i]

    trt.Logger = _Logger
    trt.Builder = Builder
    trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    trt.MemoryPoolType = MemoryPoolType
    trt.BuilderFlag = BuilderFlag
    trt.OnnxParser = OnnxParser
    if major == 10:
        trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {})
    return trt


def tensorrt_10() -> types.ModuleType:
    return _make("10.13.3")


def tensorrt_11() -> types.ModuleType:
    return _make("11.0.0")
