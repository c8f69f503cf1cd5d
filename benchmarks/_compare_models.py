"""The models compared by ``compare_tools.py``: how each one is described, loaded and fed.

A model is described by a JSON-able spec (so a child process can load it):

    {"name": ..., "kind": "hf" | "torchao" | "onnx" | "artifact", "path": ..., ...}

* ``hf``: a Hugging Face sequence classifier folder, run in eager PyTorch (fp32). Pruned folders
  with per-layer FFN widths load too (``edgekd.pruning.load_pruned_model``).
* ``torchao``: the same folder, then torchao's ``quantize_`` with
  ``Int8DynamicActivationInt8WeightConfig`` (int8 weights, int8 dynamic activations), under
  ``torch.compile(dynamic=True)`` when the spec says ``compile`` (torchao's docs: eager is slow);
  the first calls compile, and are warm-up, not timed.
* ``openvino``: an OpenVINO IR (``model.xml``), compiled for the CPU (``_openvino_path``).
* ``onnx``: a plain ONNX file (the Optimum exports), run by edgekd's ``OnnxRunner`` so its ONNX
  Runtime session is configured exactly like the one of an edgekd ONNX artifact.
* ``artifact``: an edgekd export folder, through ``load_artifact`` (the server's runner).

Imports are lazy: a child measuring an ONNX model never imports torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

TORCHAO_CONFIG = "Int8DynamicActivationInt8WeightConfig"
# Imported before a memory child takes its first RSS reading: the runtime library is not the model.
RUNTIME_MODULES = {
    "hf": ("torch", "transformers", "edgekd.pruning", "edgekd.devices.torch_runner"),
    "torchao": ("torch", "transformers", "torchao.quantization", "edgekd.pruning", "edgekd.devices.torch_runner"),
    "onnx": ("onnxruntime", "edgekd.export.onnx"),
    "openvino": ("openvino",),
}
ARTIFACT_RUNTIME = {".onnx": ("onnxruntime",), ".pte": ("torch", "executorch.runtime"), ".ptl": ("torch",)}


def preload(spec: dict[str, Any]) -> list[str]:
    """Import the runtime a spec needs (not timed, not counted in its memory)."""
    import importlib

    if spec["kind"] == "artifact":
        names = ARTIFACT_RUNTIME.get(Path(spec.get("file") or "").suffix, ()) + ("edgekd.export.stage",)
    else:
        names = RUNTIME_MODULES[spec["kind"]]
    done = []
    for name in names:
        try:
            importlib.import_module(name)
            done.append(name)
        except ImportError:
            continue  # the loader reports the missing backend with its install hint
    if spec["kind"] in ("hf", "torchao"):
        done += _preload_torch_model_code(spec["path"])
    return done


def _preload_torch_model_code(path: str) -> list[str]:
    """transformers imports its model code lazily (about 180 MB of RSS for the auto classes alone),
    and torch starts its thread pool on the first operation: both happen here, not in the model's
    load, so the memory figures are the model's."""
    import importlib

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: F401

    model_type = AutoConfig.from_pretrained(path).model_type.replace("-", "_")
    name = f"transformers.models.{model_type}.modeling_{model_type}"
    try:
        importlib.import_module(name)
    except ImportError:
        name = None
    with torch.inference_mode():
        torch.ones(64, 64) @ torch.ones(64, 64)
    return ["transformers.AutoModelForSequenceClassification", *([name] if name else []), "torch thread pool"]


def _torch_model(path: str, quantize: bool, compile_: bool = False) -> tuple[Any, dict[str, Any]]:
    from edgekd.devices.torch_runner import TorchRunner
    from edgekd.pruning import load_pruned_model
    from edgekd.tasks.text.task import TEXT_IO, SequenceClassifierExport

    model = load_pruned_model(path).eval()
    info: dict[str, Any] = {}
    if quantize:
        import torch
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        info["torchao_config"] = TORCHAO_CONFIG
        info["quantized_linears"] = sum(
            1 for m in model.modules()
            if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ not in ("Parameter", "Tensor")
        )
    module = SequenceClassifierExport(model).eval()
    if compile_:
        import torch

        # dynamic=True: one graph for every text length, not a recompile per length.
        module = torch.compile(module, dynamic=True)
        info["torch_compile"] = "torch.compile(dynamic=True), inductor"
    return TorchRunner(module, TEXT_IO), info


def load(spec: dict[str, Any], threads: int | None) -> tuple[Any, dict[str, Any]]:
    """(runner, facts about the loaded model) for one spec. Thread counts of torch are the calling
    process's own (a measuring child sets them once); ONNX Runtime gets them per session."""
    kind = spec["kind"]
    if kind in ("hf", "torchao"):
        return _torch_model(spec["path"], quantize=kind == "torchao", compile_=bool(spec.get("compile")))
    if kind == "openvino":
        from _openvino_path import OpenVinoRunner

        return OpenVinoRunner(Path(spec["path"]), threads=threads), {}
    if kind == "onnx":
        from edgekd.export.onnx import OnnxRunner

        return OnnxRunner(Path(spec["path"]), threads=threads), {}
    if kind == "artifact":
        from edgekd.export.stage import load_artifact

        # runtime_options: a row that overrides the folder's own session options (its ONNX Runtime defaults row).
        runner, meta = load_artifact(Path(spec["path"]), threads=threads, **(spec.get("runtime_options") or {}))
        return runner, {"target": meta.get("target"), "precision": meta.get("precision")}
    raise ValueError(f"unknown model kind '{kind}' (hf, torchao, onnx, artifact)")


def feed(runner: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs ``runner`` declares. Optimum's ONNX graphs also take ``token_type_ids``: a
    single-sentence classifier's are all zeros, which is what BERT uses when they are absent."""
    out = {}
    for name in runner.input_names:
        if name in inputs:
            out[name] = inputs[name]
        elif name == "token_type_ids":
            out[name] = np.zeros_like(inputs["input_ids"])
        else:
            raise KeyError(f"the model needs an input '{name}' that a text classifier does not provide")
    return out


class Batches:
    """Real test examples, unpadded in storage; a batch is padded to its longest member, as the
    pipeline's collate does. Built once per case, before any clock starts."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray):
        self.ids, self.mask, self.lengths = ids, mask, lengths

    @classmethod
    def from_npz(cls, z: Any) -> Batches:
        return cls(z["ids"], z["mask"], z["lengths"])

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        width = int(self.lengths[rows].max())
        return {"input_ids": np.ascontiguousarray(self.ids[rows, :width]),
                "attention_mask": np.ascontiguousarray(self.mask[rows, :width])}


def timed_call(runner: Any, inputs: dict[str, np.ndarray]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one inference."""
    c0, t0 = time.process_time(), time.perf_counter()
    runner.run(inputs)
    return time.perf_counter() - t0, time.process_time() - c0
