"""Core ML target: the package is converted and its spec checked everywhere; prediction on macOS."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
from export_helpers import MAX_LENGTH, eigh_inputs, eigh_io, eigh_module

from edgekd.errors import ParityError, UnsupportedTargetError
from edgekd.export import get_exporter
from edgekd.export.coreml import verify_spec
from edgekd.export.parity import check_parity
from edgekd.tasks.text import TEXT_IO, classification_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coreml_export(text_module, text_data, tmp_path_factory):
    inputs, _ = text_data
    return get_exporter("coreml").export(text_module, inputs, TEXT_IO, tmp_path_factory.mktemp("coreml"), max_batch=16)


def test_package_spec_has_flexible_named_inputs(coreml_export):
    result = coreml_export
    assert result.path.name == "model.mlpackage" and (result.path / "Manifest.json").is_file()
    spec = verify_spec(result.path, TEXT_IO)
    assert spec == result.notes["spec"]
    assert spec["model_type"] == "mlProgram"
    assert spec["spec_version"] >= 7  # iOS16 ML program
    assert [i["name"] for i in spec["inputs"]] == ["input_ids", "attention_mask"]
    for i in spec["inputs"]:
        assert i["dtype"] == "INT32"
        assert i["ranges"] == [[1, 16], [1, MAX_LENGTH]]
    assert [o["name"] for o in spec["outputs"]] == ["logits"]
    assert spec["outputs"][0]["dtype"] == "FLOAT16"  # fp16 compute precision by default
    assert spec["compute_op_count"] > 20
    assert {"linear", "softmax", "layer_norm"} <= set(spec["op_types"])
    assert result.precision == "fp16"


def test_fp32_precision_option(text_module, text_data, tmp_path):
    result = get_exporter("coreml").export(text_module, text_data[0], TEXT_IO, tmp_path, compute_precision="fp32")
    assert result.precision == "fp32"
    assert result.notes["spec"]["outputs"][0]["dtype"] == "FLOAT32"


def test_a_failed_conversion_earlier_in_the_process_does_not_block_the_next(text_module, text_data, tmp_path):
    import coremltools as ct

    ct.RangeDim(1, 4, symbol="batch")  # what a conversion that raised leaves behind: the name taken
    result = get_exporter("coreml").export(text_module, text_data[0], TEXT_IO, tmp_path, max_batch=4)
    assert [i["ranges"][0] for i in result.notes["spec"]["inputs"]] == [[1, 4], [1, 4]]


def test_verify_spec_catches_a_mismatch(coreml_export):
    renamed = replace(TEXT_IO, input_names=["input_ids", "token_type_ids"])
    with pytest.raises(ParityError, match="inputs are \\['input_ids', 'attention_mask'\\]"):
        verify_spec(coreml_export.path, renamed)


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the message given off macOS")
def test_load_off_macos_says_core_ml_predicts_only_on_macos(coreml_export):
    with pytest.raises(UnsupportedTargetError, match="Core ML predicts only on macOS"):
        get_exporter("coreml").load(coreml_export.path)


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts only on macOS")
def test_prediction_matches_source_on_macos(coreml_export, text_module, text_data):
    inputs, labels = text_data
    runner = get_exporter("coreml").load(coreml_export.path, compute_units="CPU_ONLY")
    report = check_parity(runner, text_module, inputs, labels, classification_metrics, batch_size=16)
    assert report.top1_agreement == 1.0
    assert report.max_abs_diff < 1e-2  # fp16 compute


def test_unsupported_operator_is_named(tmp_path):
    with pytest.raises(UnsupportedTargetError) as info:
        get_exporter("coreml").export(eigh_module(), eigh_inputs(), eigh_io(), tmp_path)
    assert "'coreml'" in str(info.value) and "'linalg_eigh'" in str(info.value)
    assert info.value.operator == "linalg_eigh"
