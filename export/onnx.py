"""ONNX: the torch.export-based exporter (``torch.onnx.export(dynamo=True)``), run by ONNX Runtime.

Why the dynamo exporter: on torch 2.13 it gives a clean graph (about 100 nodes for a 2-layer BERT
against about 250 from the TorchScript exporter) at the current default opset, with the dynamic
batch and sequence axes named as in ``ModelIO``. ONNX Runtime's transformer optimiser does not
recognise attention in such graphs, so ``optimize`` first applies ONNX Script's ORT fusion rules
(written for dynamo graphs: Attention, SkipLayerNormalization, BiasGelu), then the optimiser.
A fused graph uses ``com.microsoft`` operators and runs only on ONNX Runtime.

Loading needs only onnxruntime and numpy (no torch), so the server can run without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import MissingBackendError, UnsupportedTargetError
from edgekd.export._common import (
    check_inputs,
    export_examples,
    option,
    prepare_module,
    runner_inputs,
    staged,
    torch_dynamic_shapes,
    torch_inputs,
    unsupported,
)
from edgekd.export.base import Exporter, ExportResult, ModelIO, register

# Protobuf cannot hold more than 2 GiB, so larger models keep their weights beside the graph.
PROTOBUF_LIMIT = 2**31
# Most capable first; a provider that fails to initialise makes ONNX Runtime fall back to the next.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
MIN_DYNAMO_OPSET = 18
# ONNX Runtime graph optimisers an export folder may switch off for its own sessions
# (artifact.json ``runtime_options.disabled_optimizers``, chosen by ``edgekd.export.timing.tune_session``
# where it measures faster). ONNX Runtime accepts any name there and ignores the unknown ones, so the
# runner refuses names outside this list instead of passing them on.
TUNABLE_OPTIMIZERS = ("SkipLayerNormFusion",)

_ORT_TYPES = {
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
    "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
}
_OP_PATTERNS = (
    r"OpOverload\(op='([^']+)', overload='([^']+)'\)",
    r"No ONNX function found for ([\w.:]+)",
    r"Operator ([\w.:]+) is not (?:supported|registered)",
)
_ADVICE = (
    "Replace the operator in the model, register an ONNX Script translation for it "
    "(torch.onnx.export custom_translation_table), or export to another target."
)


@register
class OnnxExporter(Exporter):
    name = "onnx"
    suffix = ".onnx"
    quantized = {"dynamic": "int8", "static": "int8-static", "fp16": "fp16"}  # quantize.method
    requires = ("torch", "onnx", "onnxscript", "onnxruntime")
    extra = "onnx"
    options = {
        "opset": f"ONNX opset (default: torch's current default; at least {MIN_DYNAMO_OPSET}).",
        "optimize": "Fuse transformer blocks for ONNX Runtime (Attention, SkipLayerNorm, BiasGelu); "
                    "the graph then runs on ONNX Runtime only. Default false.",
        "external_data": "Keep weights in model.onnx.data (default: only when they exceed 2 GB).",
    }

    def export(self, module: Any, example_inputs: dict[str, np.ndarray], io: ModelIO, out_dir: Path,
               **opts: Any) -> ExportResult:
        self.check_options(opts)
        opset = option(self.name, opts, "opset", int, None, minimum=MIN_DYNAMO_OPSET)
        optimize = option(self.name, opts, "optimize", bool, False)
        external = option(self.name, opts, "external_data", bool, None)
        check_inputs(example_inputs, io, self.name)
        program = export_program(module, example_inputs, io, opset=opset)
        notes: dict[str, Any] = {"exporter": "torch.onnx.export(dynamo=True)"}
        _strip_debug_metadata(program)
        if optimize:
            notes["fusions"] = _fuse_for_ort(program)
        weight_bytes = _initializer_bytes(program)
        if external is None:
            external = weight_bytes >= PROTOBUF_LIMIT
        out_dir = Path(out_dir)
        with staged(out_dir) as tmp:
            path = tmp / "model.onnx"
            program.save(str(path), external_data=external)
            if optimize:
                notes["ort_optimizer"] = _ort_optimize(path, external)
            else:
                _check(path)
            files = sorted(p.name for p in tmp.iterdir())
        import onnx

        proto = onnx.load(str(out_dir / "model.onnx"), load_external_data=False)
        notes.update(
            opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            nodes=len(proto.graph.node),
            external_data=external,
            weight_bytes=weight_bytes,
            optimized=optimize,
        )
        return ExportResult(self.name, out_dir / "model.onnx", [out_dir / f for f in files], notes=notes)

    def load(self, path: Path, **runtime_opts: Any) -> OnnxRunner:
        unknown = sorted(set(runtime_opts) - {"threads", "providers", "disabled_optimizers"})
        if unknown:
            raise UnsupportedTargetError(
                f"The ONNX runner does not accept option(s) {', '.join(unknown)}; allowed: disabled_optimizers, "
                "providers, threads."
            )
        return OnnxRunner(Path(path), **runtime_opts)


def export_program(module: Any, example_inputs: dict[str, np.ndarray], io: ModelIO, opset: int | None) -> Any:
    """Capture ``module`` with torch.export and translate it to an ONNX program (in memory)."""
    import torch

    module = prepare_module(module)
    kwargs = torch_inputs(export_examples(example_inputs, io), io.input_names)
    try:
        with torch.no_grad():
            return torch.onnx.export(
                module, (), kwargs=kwargs, dynamo=True, opset_version=opset,
                dynamic_shapes=torch_dynamic_shapes(io), input_names=io.input_names,
                output_names=io.output_names, optimize=True, verbose=False,
            )
    except Exception as e:  # the backend's failure becomes one that names the operator
        raise unsupported(OnnxExporter.name, e, _OP_PATTERNS, _ADVICE) from e


def _strip_debug_metadata(program: Any) -> None:
    """Drop the exporter's per-node debugging metadata (FX node, module path, stack trace): it is
    most of a small model's file and names paths of the machine that exported it."""
    from onnx_ir.passes.common import ClearMetadataAndDocStringPass

    ClearMetadataAndDocStringPass()(program.model)


def _initializer_bytes(program: Any) -> int:
    return int(sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                   if v.const_value is not None))


def _fuse_for_ort(program: Any) -> dict[str, int]:
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, counts = optimize_for_ort(program.model)
    return {k: int(v) for k, v in counts.items() if v}


FUSE_ATTENTION = ("attention", "multihead", "packed")


def fuse_file(src: Path, dst: Path, external: bool = False, attention: str = "attention") -> dict[str, Any]:
    """The ``optimize`` fusions applied to an exported ONNX file (the quantize stage fuses the float
    model before quantizing it). Returns the fusion counts of both passes.

    ``attention``: "attention" packs Q, K and V into ORT's ``Attention`` (one QKV weight; the graph
    ``optimize`` gives). "multihead" stops at ``MultiHeadAttention`` fed by the three projection
    MatMuls: int8 methods cannot quantize the packed form as written here (ONNX Runtime's
    quantizer skips an Attention with ``qkv_hidden_sizes``, and QAttention has no attention-bias
    input for the mask), but they do quantize those MatMuls. "packed" is edgekd's own rewrite
    (``edgekd.export.attention``): only the attention blocks, packed into an ``Attention`` whose
    mask is the ``attention_mask`` input, which int8 methods turn into ``QAttention``.
    """
    if attention not in FUSE_ATTENTION:
        raise UnsupportedTargetError(f"attention fusion must be one of {FUSE_ATTENTION}, not {attention!r}")
    if attention == "packed":
        from edgekd.export.attention import pack_attention

        return pack_attention(src, dst, external)
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import _core, optimize_for_ort

    model = ir.load(str(src))
    if attention == "multihead":
        from unittest import mock

        # onnxscript has no switch for the last step (MultiHeadAttention + projections -> Attention);
        # replaced for this one call only, the module is restored on return.
        with mock.patch.object(_core, "fuse_attention", lambda *a, **k: 0):
            _, counts = optimize_for_ort(model)
    else:
        _, counts = optimize_for_ort(model)
    ir.save(model, str(dst), external_data=(dst.name + ".data") if external else None)
    notes: dict[str, Any] = {"fusions": {k: int(v) for k, v in counts.items() if v}}
    notes["ort_optimizer"] = _ort_optimize(dst, external)
    return notes


def _ort_optimize(path: Path, external: bool) -> dict[str, int]:
    from onnxruntime.transformers import optimizer

    # opt_level=0: only the transformer fusions; ONNX Runtime applies its own graph
    # optimisations when a session opens, for the hardware it runs on.
    model = optimizer.optimize_model(str(path), model_type="bert", opt_level=0)
    model.save_model_to_file(str(path), use_external_data_format=external)
    return {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))


def select_providers(requested: list[str] | None = None) -> list[str]:
    """Execution providers: ``requested`` (all must be available) or the best available ones."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise UnsupportedTargetError(
                f"ONNX Runtime here has no {', '.join(missing)}; available: {', '.join(available)}. "
                "Install onnxruntime-gpu for CUDA/TensorRT, or choose from the available providers."
            )
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available]


def check_disabled_optimizers(names: Any) -> list[str]:
    """``names`` as a list, every one of them in ``TUNABLE_OPTIMIZERS`` (an error says which are not)."""
    names = list(names or [])
    unknown = [n for n in names if n not in TUNABLE_OPTIMIZERS]
    if unknown:
        raise UnsupportedTargetError(
            f"disabled_optimizers {unknown} are not ones edgekd switches off (allowed: {list(TUNABLE_OPTIMIZERS)}); "
            "ONNX Runtime would ignore an unknown name silently. Fix runtime_options in artifact.json or re-export."
        )
    return names


class OnnxRunner:
    """An ONNX Runtime session; inputs are cast to the dtypes the graph declares. ``disabled_optimizers``:
    ONNX Runtime graph optimisers left out of this session (``TUNABLE_OPTIMIZERS`` only)."""

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None,
                 disabled_optimizers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingBackendError("Running an ONNX artifact", "onnxruntime", "serve") from e
        if not Path(path).is_file():
            raise UnsupportedTargetError(f"{path} does not exist: export the 'onnx' target first.")
        self.disabled_optimizers = check_disabled_optimizers(disabled_optimizers)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        self.threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=select_providers(providers),
                                            disabled_optimizers=self.disabled_optimizers or None)
        self.providers = self.session.get_providers()
        self.device = "cuda" if any(p in self.providers for p in PREFERRED_PROVIDERS[:2]) else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = {i.name: _ORT_TYPES[i.type] for i in self.session.get_inputs() if i.type in _ORT_TYPES}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = runner_inputs(inputs, self.input_names, self._dtypes, "This ONNX model")
        outs = self.session.run(self.output_names, dict(zip(self.input_names, arrays, strict=True)))
        return dict(zip(self.output_names, outs, strict=True))
