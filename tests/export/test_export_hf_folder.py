"""Export folders are ordinary Hugging Face / Optimum folders: config.json with the served labels,
ordinary file modes, loadable by optimum's ORTModelForSequenceClassification (fp32 and int8)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from export_helpers import MAX_LENGTH

from edgekd.export.base import read_artifact_meta
from edgekd.export.stage import export_all
from edgekd.recipe import ExportConfig, QuantizeConfig
from edgekd.tasks.text.task import TEXT_IO, classification_metrics

LABELS = ["negative", "positive"]


def accuracy(outputs, labels):
    return {"accuracy": float((np.asarray(outputs["logits"]).argmax(-1) == labels).mean())}


@pytest.fixture(scope="module")
def hf_folders(text_module, text_data, tokenizer_files, tiny_classifier_dir, tmp_path_factory):
    """export/onnx from the export stage and export/onnx-int8 from the quantize stage, written under umask 022."""
    from edgekd.quantization import quantize_onnx

    inputs, labels = text_data
    out = tmp_path_factory.mktemp("run") / "export"
    meta = {"labels": LABELS, "max_length": MAX_LENGTH, "source_model": str(tiny_classifier_dir),
            "task": "text-classification"}
    old = os.umask(0o022)
    try:
        export_all(text_module, TEXT_IO, ["onnx"], out, ExportConfig(targets=["onnx"]), inputs, labels,
                   classification_metrics, meta, tokenizer_files)
        quantize_onnx(out / "onnx", out / "onnx-int8", QuantizeConfig(enabled=True, speed_runs=5, max_accuracy_drop=1.0),
                      None, inputs, labels, accuracy)
    finally:
        os.umask(old)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "onnx-int8"])
def test_optimum_loads_the_export_folder_as_is(hf_folders, target, text_data):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    folder = hf_folders / target
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert config["model_type"] == "bert"  # from the source model's own config
    model = ORTModelForSequenceClassification.from_pretrained(folder)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    inputs, _ = text_data
    got = model(input_ids=inputs["input_ids"][:4], attention_mask=inputs["attention_mask"][:4]).logits
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(["logits"], {k: inputs[k][:4] for k in ("input_ids", "attention_mask")})[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.slow
def test_int8_folder_names_its_own_target(hf_folders):
    assert read_artifact_meta(hf_folders / "onnx-int8")["target"] == "onnx-int8"
    assert read_artifact_meta(hf_folders / "onnx")["target"] == "onnx"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "onnx-int8"])
def test_export_folders_have_ordinary_modes(hf_folders, target):
    """Readable by any user (a container's non-root user reading a mounted folder), not 0700/0600."""
    folder = hf_folders / target
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for path in folder.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


@pytest.mark.slow
def test_every_file_the_folder_serves_is_checksummed(hf_folders):
    """artifact.json records a sha256 for the tokenizer files and config.json, not only the model."""
    folder = hf_folders / "onnx"
    meta = read_artifact_meta(folder)
    others = {p.name for p in folder.iterdir()} - {"artifact.json", "model.onnx"}
    assert others and set(meta["extra_sha256"]) == others
    assert {"tokenizer.json", "vocab.txt", "config.json"} <= others
    assert set(read_artifact_meta(hf_folders / "onnx-int8")["extra_sha256"]) == others


@pytest.mark.slow
def test_a_mounted_copy_is_read_by_another_user_and_served(hf_folders):
    """As `docker run -v folder:/model:ro` shows the folder to the image's non-root user: the modes travel
    with the files. Another user (nobody) reads every file; then the server loads the copy (torch-free path).
    Docker cannot run here, so the other user is a plain process under uid 65534."""
    import shutil
    import subprocess
    import tempfile

    from edgekd.serving.model import load_served_model
    from edgekd.serving.settings import ServeSettings

    if os.geteuid() != 0:
        pytest.skip("reading as another user needs root to switch users")
    mount = tempfile.mkdtemp(prefix="edgekd-mount-", dir="/tmp")
    try:
        os.chmod(mount, 0o755)  # the mount point itself, as docker creates it
        model = shutil.copytree(hf_folders / "onnx-int8", os.path.join(mount, "model"))  # copy2 keeps the modes

        def read_as_nobody() -> subprocess.CompletedProcess:
            script = 'cd "$1" && for f in $(find . -type f); do cat "$f" > /dev/null || exit 1; done'
            return subprocess.run(["sh", "-c", script, "sh", model], user=65534, group=65534, capture_output=True,
                                  text=True)

        assert read_as_nobody().returncode == 0
        served = load_served_model(ServeSettings(export_dir=model))
        assert served.target == "onnx-int8" and served.codec.labels == LABELS
        os.chmod(os.path.join(model, "tokenizer.json"), 0o600)  # what the folders were before: unreadable
        denied = read_as_nobody()
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
    finally:
        shutil.rmtree(mount)
