"""All or nothing: the export stage stages every target, checks its parity there, and publishes the folders
together once all are done. A stage killed during parity, or stopped part-way by an error, leaves the earlier
export whole; a folder that a stage wrote and never recorded in the run's manifest is said to be that."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from export_helpers import MAX_LENGTH

from edgekd.errors import ChecksumError
from edgekd.export.onnx import OnnxExporter
from edgekd.export.stage import export_all, load_artifact
from edgekd.recipe import ExportConfig
from edgekd.tasks.text.task import TEXT_IO, classification_metrics

META = {"labels": ["negative", "positive"], "max_length": MAX_LENGTH, "source_model": "tiny-bert",
        "task": "text-classification"}


def _stage(module, data, out, targets, **cfg):
    inputs, labels = data
    return export_all(module, TEXT_IO, targets, out, ExportConfig(targets=targets, **cfg), inputs, labels,
                      classification_metrics, META, [])


def _another_model(text_module):
    """The same classifier with another bias: a re-trained or re-pruned source."""
    import torch

    other = copy.deepcopy(text_module)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n.endswith("classifier.bias")).add_(1.0)
    return other


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CHILD = r"""
import sys, time
from pathlib import Path
import numpy as np
import edgekd.export.stage as st
from transformers import AutoModelForSequenceClassification
from edgekd.recipe import ExportConfig
from edgekd.tasks.text.task import TEXT_IO, SequenceClassifierExport, classification_metrics

out, model_dir, data, flag = map(Path, sys.argv[1:5])
module = SequenceClassifierExport(AutoModelForSequenceClassification.from_pretrained(model_dir)).eval()
arrays = np.load(data)
inputs = {"input_ids": arrays["input_ids"], "attention_mask": arrays["attention_mask"]}

def held(*args, **kwargs):  # parity is under way: hold it there until the test kills this process
    flag.write_text(str(sorted(p.name for p in out.iterdir())))
    time.sleep(300)

st.check_real_lengths = held
meta = {"labels": ["negative", "positive"], "max_length": MAX_LENGTH, "source_model": "tiny-bert",
        "task": "text-classification"}
st.export_all(module, TEXT_IO, ["torchscript-lite"], out, ExportConfig(targets=["torchscript-lite"]), inputs,
              arrays["labels"], classification_metrics, meta, [])
""".replace("MAX_LENGTH", str(MAX_LENGTH))


def test_a_kill_during_parity_leaves_the_earlier_export_as_it_was(text_module, text_data, tiny_classifier_dir,
                                                                   tmp_path):
    out = tmp_path / "export"
    _stage(text_module, text_data, out, ["torchscript-lite"])
    folder = out / "torchscript-lite"
    before = _snapshot(folder)
    inputs, labels = text_data
    np.savez(tmp_path / "data.npz", labels=labels, **inputs)
    flag = tmp_path / "in-parity"
    (tmp_path / "child.py").write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(out), str(tiny_classifier_dir),
                              str(tmp_path / "data.npz"), str(flag)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert flag.exists(), child.communicate(timeout=30)[0].decode()[-3000:] if child.poll() is not None else \
            "the export never reached its parity check"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # Parity ran on a staged folder: the published one is the earlier export, byte for byte, and loads.
    assert _snapshot(folder) == before
    runner, meta = load_artifact(folder)
    assert meta["parity"]["passed"] is True
    orphans = [p for p in out.iterdir() if p.name.startswith(".")]
    assert orphans and all(p.name.endswith(".staged") for p in orphans)  # hidden: no export lists it
    from edgekd.shipping import export_folders

    assert export_folders(tmp_path) == ["torchscript-lite"]
    from edgekd.export.stage import Staging

    Staging(out)  # the next stage on this folder removes what the killed process left
    assert [p.name for p in out.iterdir()] == ["torchscript-lite"]


def test_a_stage_that_stops_part_way_publishes_nothing(text_module, text_data, tmp_path, monkeypatch):
    """A target failing with an error that stops the stage (a full disk, say) after another target was made:
    none of this run's folders is published, so the export folder never holds folders of two models."""
    out = tmp_path / "export"
    _stage(text_module, text_data, out, ["torchscript-lite", "onnx"])
    before = {t: _snapshot(out / t) for t in ("torchscript-lite", "onnx")}

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(OnnxExporter, "export", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _stage(_another_model(text_module), text_data, out, ["torchscript-lite", "onnx"])
    assert {t: _snapshot(out / t) for t in ("torchscript-lite", "onnx")} == before
    assert sorted(p.name for p in out.iterdir()) == ["onnx", "torchscript-lite"]  # nothing staged left over


def test_a_folder_the_stage_wrote_but_never_recorded_says_the_stage_did_not_finish(text_module, text_data, tmp_path):
    """Were a stage stopped between publishing its folders and recording them in the run's manifest, a folder
    would hold an export the manifest does not record: serving it says so, and to run the stage again, rather
    than that a file was changed after the run wrote it."""
    from edgekd.export.base import read_artifact_meta
    from edgekd.runfolder import RunFolder
    from edgekd.serving.model import verify_artifact

    run = RunFolder(tmp_path / "run")
    out = run.stage_dir("export")
    _stage(text_module, text_data, out, ["torchscript-lite"])
    run.record("export", "fp-earlier", {}, [out / "torchscript-lite"])
    folder = out / "torchscript-lite"
    verify_artifact(folder, read_artifact_meta(folder))  # as recorded: served
    _stage(_another_model(text_module), text_data, out, ["torchscript-lite"])  # published, never recorded
    with pytest.raises(ChecksumError, match=r"The export stage did not finish: it wrote this folder and stopped "
                                            r"before recording it .* Run the export stage again") as info:
        verify_artifact(folder, read_artifact_meta(folder))
    assert "model.ptl" in str(info.value)
    # A file changed after the run recorded it is still said to be that.
    _stage(text_module, text_data, out, ["torchscript-lite"])
    run.record("export", "fp-later", {}, [folder])
    (folder / "vocab-notes.txt").write_text("x")
    run.record("export", "fp-later", {}, [folder])
    (folder / "vocab-notes.txt").write_text("changed")
    with pytest.raises(ChecksumError, match="was changed after the run wrote it"):
        verify_artifact(folder, json.loads((folder / "artifact.json").read_text()))


def test_a_publish_killed_between_its_two_renames_is_put_back_by_the_next_stage(tmp_path, dead_pid):
    """A publish sets the earlier folder aside (.<name>.old-<pid>@<machine>; here a bare pid, as names were
    before they carried the machine) and then renames the staged one in; a kill between the two leaves no
    export/<name>: the next Staging of the root puts the earlier one back, and drops a set-aside folder whose
    place was taken."""
    from edgekd.export.stage import Staging

    pid = dead_pid
    (tmp_path / f".onnx.old-{pid}").mkdir()
    (tmp_path / f".onnx.old-{pid}" / "model.onnx").write_text("earlier")
    (tmp_path / "executorch").mkdir()
    (tmp_path / f".executorch.old-{pid}").mkdir()
    Staging(tmp_path)
    assert (tmp_path / "onnx" / "model.onnx").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["executorch", "onnx"]


def test_a_publish_that_raises_leaves_no_staged_folder_behind(tmp_path, monkeypatch):
    import edgekd.export.stage as stage

    staging = stage.Staging(tmp_path)
    for name in ("onnx", "executorch"):
        (staging.new(name) / "model").write_text(name)
    calls = []

    def modes(folder):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(stage, "publish_modes", modes)
    with pytest.raises(OSError, match="disk full"):
        staging.publish()
    assert (tmp_path / "onnx" / "model").read_text() == "onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # the unpublished staged folder is gone
