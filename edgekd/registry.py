"""The names a recipe may give pluggable parts, each with the module that implements it.

One table per kind: the task families (``task``), the pruning methods (``prune.method``) and the
ONNX quantization methods (``quantize.method``). The recipe validates its values against these
names without importing the implementations (they need torch; a recipe loads without it), and
each implementation registers itself under its name (a test checks that both sides agree). Adding
one is its module plus its line here. Export targets have their own registry
(``edgekd.export.registered()``), which imports no backend.
"""

from __future__ import annotations

# name -> the family's package. It holds ``family.py`` (FAMILY, an edgekd.tasks.base.TaskFamily: its
# context and stages), ``serve.py`` (SERVING, an edgekd.serving.family.ServeFamily: codec, routes,
# v2 tensors; no torch), ``summary.py`` (SUMMARY: the console summary's table and lines) and, when
# the family has recipe settings of its own, ``settings.py`` (SECTION and Settings: its recipe section).
# The task of run folders and exports written before the task was recorded.
DEFAULT_TASK = "text-classification"

TASKS = {
    "text-classification": "edgekd.tasks.text",
    "detection": "edgekd.tasks.detection",
}

# prune.method -> the module that registers it (edgekd.pruning.base.register)
PRUNE_METHODS = {
    "heads-ffn": "edgekd.pruning.heads_ffn",
    "channels": "edgekd.pruning.channels",
    "unstructured": "edgekd.pruning.unstructured",
}

# quantize.method -> the module that registers it (edgekd.quantization.onnx_methods.register)
QUANTIZE_METHODS = {
    "dynamic": "edgekd.quantization.onnx_methods",
    "static": "edgekd.quantization.onnx_methods",
    "fp16": "edgekd.quantization.onnx_methods",
}


def check_name(kind: str, value: str, table: dict[str, str]) -> str:
    """``value`` when ``table`` has it, else a ValueError naming the valid ones (the recipe loader
    reports it under the key)."""
    if value not in table:
        raise ValueError(f"unknown {kind} '{value}'; registered: {', '.join(table)}")
    return value
