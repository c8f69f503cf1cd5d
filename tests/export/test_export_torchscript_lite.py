"""TorchScript-lite target: a traced module for the lite interpreter, with its io stored inside."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import TOLERANCE, shorter, source_logits

from edgekd.errors import UnsupportedTargetError
from edgekd.export import get_exporter
from edgekd.export.parity import check_parity
from edgekd.export.torchscript_lite import read_io
from edgekd.tasks.text.task import TEXT_IO, classification_metrics


@pytest.fixture(scope="module")
def ptl_export(text_module, text_data, tmp_path_factory):
    inputs, _ = text_data
    return get_exporter("torchscript-lite").export(text_module, inputs, TEXT_IO, tmp_path_factory.mktemp("ptl"))


def test_lite_module_matches_source_at_any_shape(ptl_export, text_module, text_data):
    inputs, labels = text_data
    assert ptl_export.path.name == "model.ptl"
    assert read_io(ptl_export.path) == TEXT_IO
    runner = get_exporter("torchscript-lite").load(ptl_export.path)
    assert runner.input_names == ["input_ids", "attention_mask"] and runner.output_names == ["logits"]
    report = check_parity(runner, text_module, inputs, labels, classification_metrics, batch_size=16)
    assert report.top1_agreement == 1.0 and report.max_abs_diff < TOLERANCE
    for rows, length in ((1, 5), (6, 17)):
        small = shorter(inputs, rows, length)
        np.testing.assert_allclose(runner.run(small)["logits"], source_logits(text_module, small), atol=TOLERANCE)


def test_example_inputs_are_not_stored_in_the_artifact(ptl_export):
    import zipfile

    names = zipfile.ZipFile(ptl_export.path).namelist()
    assert not [n for n in names if "traced_inputs" in n]


def test_mobile_optimize_needs_xnnpack(text_module, text_data, tmp_path):
    import torch.backends.xnnpack

    if torch.backends.xnnpack.enabled:
        pytest.skip("this torch has XNNPACK, so optimize_for_mobile works")
    with pytest.raises(UnsupportedTargetError, match="built without it"):
        get_exporter("torchscript-lite").export(text_module, text_data[0], TEXT_IO, tmp_path, mobile_optimize=True)
    assert not (tmp_path / "model.ptl").exists()


def test_a_file_not_written_by_edgekd_is_refused(tmp_path):
    bogus = tmp_path / "model.ptl"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(UnsupportedTargetError, match="not a TorchScript-lite file"):
        get_exporter("torchscript-lite").load(bogus)
