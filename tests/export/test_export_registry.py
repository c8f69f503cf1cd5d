"""The registry: every registered target has its test file, names and options are checked, and
importing the package stays light (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgekd.errors import RecipeError, UnsupportedTargetError
from edgekd.export import get_exporter, registered
from edgekd.export.base import Exporter

HERE = Path(__file__).parent
# Every registered target and the file that exports a tiny model to it and checks the result.
TESTED_TARGETS = {
    "onnx": "test_export_onnx.py",
    "tensorrt": "test_export_tensorrt.py",
    "coreml": "test_export_coreml.py",
    "executorch": "test_export_executorch.py",
    "torchscript-lite": "test_export_torchscript_lite.py",
}


def test_every_registered_target_has_a_test():
    untested = sorted(set(registered()) - set(TESTED_TARGETS))
    assert not untested, f"registered export targets without a test: {untested}; add one to TESTED_TARGETS"
    for name, file in TESTED_TARGETS.items():
        text = (HERE / file).read_text()
        assert f'get_exporter("{name}")' in text, f"{file} does not export to '{name}'"


@pytest.mark.parametrize("name", sorted(TESTED_TARGETS))
def test_targets_declare_their_contract(name):
    cls = registered()[name]
    assert issubclass(cls, Exporter) and cls.name == name
    assert cls.suffix.startswith(".")
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in cls.options.items())
    assert isinstance(cls.requires, tuple)
    ok, why = cls.available()
    assert ok or why  # unavailable targets say why


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(UnsupportedTargetError, match="Unknown export target 'tflite'. Known targets: coreml, executorch, onnx"):
        get_exporter("tflite")


def test_options_a_target_does_not_accept_are_rejected():
    with pytest.raises(UnsupportedTargetError, match="'executorch' does not accept option\\(s\\) precision"):
        get_exporter("executorch").check_options({"precision": "fp16"})
    get_exporter("tensorrt").check_options({"precision": "fp16", "max_batch": 4})


def test_recipe_validates_targets_and_options_at_load_time():
    from edgekd.recipe import parse_recipe

    with pytest.raises(RecipeError) as info:
        parse_recipe({"export": {"targets": ["onnx", "coreml", "tflite"], "options": {"coreml": {"precision": "fp16"}}}})
    msg = str(info.value)
    assert "unknown export target(s) ['tflite']" in msg
    assert "coreml does not accept precision (allowed: batch_sizes, compute_precision, deployment_target, max_batch, max_sequence)" in msg
    # Options for a target the recipe does not export would be read by nothing (onnx's are, by a prune search).
    with pytest.raises(RecipeError, match="'coreml' is not in export.targets, so nothing would read these options"):
        parse_recipe({"export": {"targets": ["onnx"], "options": {"coreml": {"max_batch": 4}}}})
    parse_recipe({"export": {"targets": ["executorch"], "options": {"onnx": {"optimize": True}}},
                  "prune": {"enabled": True, "max_accuracy_drop": 0.01}})
    cfg = parse_recipe({"export": {"targets": ["onnx"], "options": {"onnx": {"optimize": True}}}}).export
    assert cfg.targets == ["onnx"] and cfg.options == {"onnx": {"optimize": True}}


def test_importing_the_package_does_not_import_backends():
    code = (
        "import sys; import edgekd.export; from edgekd.export.stage import load_artifact; "
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'coremltools', 'executorch', 'tensorrt') if m in sys.modules]; "
        "print(heavy); assert not heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
