"""Core ML target: the package is converted and its spec checked everywhere; prediction on macOS."""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
from export_helpers import MAX_LENGTH, eigh_inputs, eigh_io, eigh_module

from edgekd.errors import ParityError, RecipeError, UnsupportedTargetError
from edgekd.export import get_exporter
from edgekd.export.coreml import fit_to_shapes, verify_spec
from edgekd.export.parity import check_parity
from edgekd.tasks.text.task import TEXT_IO, classification_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coreml_export(text_module, text_data, tmp_path_factory):
    inputs, _ = text_data
    return get_exporter("coreml").export(text_module, inputs, TEXT_IO, tmp_path_factory.mktemp("coreml"), max_batch=16)


def test_package_spec_enumerates_shapes_with_batch_1_at_max_length_as_default(coreml_export):
    result = coreml_export
    assert result.path.name == "model.mlpackage" and (result.path / "Manifest.json").is_file()
    spec = verify_spec(result.path, TEXT_IO)
    assert spec == result.notes["spec"]
    assert spec["model_type"] == "mlProgram"
    assert spec["spec_version"] >= 9  # iOS18 ML program (several enumerated inputs)
    assert [i["name"] for i in spec["inputs"]] == ["input_ids", "attention_mask"]
    for i in spec["inputs"]:
        assert i["dtype"] == "INT32"
        assert i["shape"] == [1, MAX_LENGTH]  # the default shape, the one Core ML plans first
        assert i["enumerated"] == [[1, MAX_LENGTH], [8, MAX_LENGTH], [16, MAX_LENGTH]]  # 1, bench's 8, max_batch
    assert [o["name"] for o in spec["outputs"]] == ["logits"]
    assert spec["outputs"][0]["dtype"] == "FLOAT16"  # fp16 compute precision by default
    assert spec["compute_op_count"] > 20
    assert {"linear", "layer_norm"} <= set(spec["op_types"])
    assert {"softmax", "scaled_dot_product_attention"} & set(spec["op_types"])  # iOS18 fuses attention
    assert result.precision == "fp16"
    ane = result.notes["neural_engine"]
    assert ane["flexibility"] == "enumerated"
    assert [s["input_ids"] for s in ane["plannable_shapes"]] == [[1, MAX_LENGTH], [8, MAX_LENGTH], [16, MAX_LENGTH]]


def test_older_target_gets_ranges_with_batch_1_default_and_says_so(text_module, text_data, tmp_path):
    result = get_exporter("coreml").export(text_module, text_data[0], TEXT_IO, tmp_path, deployment_target="iOS16",
                                           max_batch=4)
    for i in result.notes["spec"]["inputs"]:
        assert i["shape"] == [1, MAX_LENGTH] and i["ranges"] == [[1, 4], [1, MAX_LENGTH]] and i["enumerated"] == []
    ane = result.notes["neural_engine"]
    assert ane["flexibility"] == "range" and "iOS18" in ane["note"]
    assert ane["plannable_shapes"] == [{"input_ids": [1, MAX_LENGTH], "attention_mask": [1, MAX_LENGTH]}]


def test_batch_sizes_outside_max_batch_are_a_recipe_error(text_module, text_data, tmp_path):
    with pytest.raises(RecipeError, match=r"batch_sizes \[32\] outside 1..max_batch \(16\)"):
        get_exporter("coreml").export(text_module, text_data[0], TEXT_IO, tmp_path, max_batch=16, batch_sizes=[1, 32])


def test_runner_pads_to_the_smallest_enumerated_shape():
    shapes = [{"ids": (b, 8), "mask": (b, 8)} for b in (1, 4, 8)]
    ids = np.arange(1, 31).reshape(10, 3)
    calls = fit_to_shapes({"ids": ids, "mask": np.ones_like(ids)}, shapes)
    assert [(c["ids"].shape, rows) for c, rows in calls] == [((8, 8), 8), ((4, 8), 2)]
    first, _ = calls[0]
    np.testing.assert_array_equal(first["ids"][:8, :3], ids[:8])
    assert not first["ids"][:, 3:].any() and not first["mask"][:, 3:].any()  # padding is masked
    assert not calls[1][0]["mask"][2:].any()  # empty rows
    with pytest.raises(UnsupportedTargetError, match="fit none of this Core ML package's shapes"):
        fit_to_shapes({"ids": np.ones((1, 9)), "mask": np.ones((1, 9))}, shapes)


def test_fp32_precision_option(text_module, text_data, tmp_path):
    result = get_exporter("coreml").export(text_module, text_data[0], TEXT_IO, tmp_path, compute_precision="fp32")
    assert result.precision == "fp32"
    assert result.notes["spec"]["outputs"][0]["dtype"] == "FLOAT32"


def test_a_failed_conversion_earlier_in_the_process_does_not_block_the_next(text_module, text_data, tmp_path):
    import coremltools as ct

    ct.RangeDim(1, 4, symbol="batch")  # what a conversion that raised leaves behind: the name taken
    result = get_exporter("coreml").export(text_module, text_data[0], TEXT_IO, tmp_path, max_batch=4,
                                           deployment_target="iOS16")
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


def test_quantize_stage_core_ml_path_refuses_a_compression_that_changed_nothing(coreml_export, text_data, tmp_path):
    import shutil

    from edgekd.export.base import write_artifact_meta
    from edgekd.export.stage import artifact_digest
    from edgekd.quantization.coreml import quantize_coreml_folder
    from edgekd.recipe import QuantizeConfig

    src = tmp_path / "coreml"
    shutil.copytree(coreml_export.path, src / "model.mlpackage")
    (src / "tokenizer.json").write_text("{}")
    write_artifact_meta(src, {"target": "coreml", "exporter": "coreml", "file": "model.mlpackage", "precision": "fp16",
                              "sha256": artifact_digest(src / "model.mlpackage"), "io": TEXT_IO.to_dict()})
    cfg = QuantizeConfig(coreml_mode="palettize", palette_bits=4)
    # Found on this tiny model (coremltools 9, iOS18 package): the compression leaves every weight as it was.
    # The stage says so instead of writing a folder labelled palettized whose weights are the float ones.
    from edgekd.errors import StageError

    with pytest.raises(StageError, match="left every weight of .* unchanged"):
        quantize_coreml_folder(src, tmp_path / "coreml-palettize4", cfg, text_data[0])
    assert not (tmp_path / "coreml-palettize4").exists()


def test_quantize_stage_core_ml_folder_records_the_compressed_packages_own_spec(coreml_export, text_data, tmp_path,
                                                                                 monkeypatch):
    import shutil

    from edgekd.quantization import coreml as coreml_quant

    # The tiny model's weights are all under the size coremltools compresses from; every weight is here.
    monkeypatch.setattr(coreml_quant, "WEIGHT_THRESHOLD", 1)

    from edgekd.export.base import read_artifact_meta, write_artifact_meta
    from edgekd.export.stage import artifact_digest
    from edgekd.quantization.coreml import quantize_coreml_folder
    from edgekd.recipe import QuantizeConfig

    src = tmp_path / "coreml"
    shutil.copytree(coreml_export.path, src / "model.mlpackage")
    (src / "tokenizer.json").write_text("{}")
    write_artifact_meta(src, {"target": "coreml", "exporter": "coreml", "file": "model.mlpackage", "precision": "fp16",
                              "sha256": artifact_digest(src / "model.mlpackage"), "io": TEXT_IO.to_dict(),
                              "notes": coreml_export.notes, "created": "2000-01-01T00:00:00+00:00"})
    quantize_coreml_folder(src, tmp_path / "coreml-linear8", QuantizeConfig(coreml_mode="linear8"), text_data[0])
    meta = read_artifact_meta(tmp_path / "coreml-linear8")
    spec = meta["notes"]["spec"]
    assert spec == verify_spec(tmp_path / "coreml-linear8" / "model.mlpackage")
    # The compressed weights' dequantizing ops, which the float package's spec has none of.
    assert [k for k in spec["op_types"] if k.startswith("constexpr")]
    assert not [k for k in coreml_export.notes["spec"]["op_types"] if k.startswith("constexpr")]
    assert meta["notes"]["neural_engine"] == coreml_export.notes["neural_engine"]  # what compression keeps
    assert meta["created"] > "2000-01-01T00:00:00+00:00"
