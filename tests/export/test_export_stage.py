"""The export stage: self-contained folders, artifact.json, parity records, and what happens when a
target cannot be exported or fails parity."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from export_helpers import MAX_LENGTH, TOLERANCE, eigh_inputs, eigh_io, eigh_module

from edgekd.errors import (
    ChecksumError,
    EdgeKDError,
    MissingBackendError,
    ParityError,
    RecipeError,
    StageError,
    UnsupportedTargetError,
)
from edgekd.export.stage import artifact_digest, export_all, load_artifact
from edgekd.export.torchscript_lite import TorchScriptLiteExporter
from edgekd.recipe import ExportConfig
from edgekd.tasks.text.task import TEXT_IO, classification_metrics

META = {"labels": ["negative", "positive"], "max_length": MAX_LENGTH, "source_model": "tiny-bert", "task": "text-classification"}
FAST_TARGETS = ["onnx", "torchscript-lite", "tensorrt"]


def run_stage(module, data, out, tokenizer_files, targets=FAST_TARGETS, **cfg):
    inputs, labels = data
    config = ExportConfig(targets=targets, **cfg)
    return export_all(module, TEXT_IO, targets, out, config, inputs, labels, classification_metrics, META, tokenizer_files)


@pytest.fixture(scope="module")
def stage_run(text_module, text_data, tokenizer_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return out, run_stage(text_module, text_data, out, tokenizer_files, min_top1_agreement=1.0, max_abs_diff=TOLERANCE)


@pytest.mark.slow
def test_each_target_gets_a_self_contained_folder(stage_run, tokenizer_files):
    out, records = stage_run
    assert sorted(p.name for p in out.iterdir()) == sorted(FAST_TARGETS)  # nothing half-written beside them
    for target in FAST_TARGETS:
        folder = out / target
        meta = json.loads((folder / "artifact.json").read_text())
        assert meta["target"] == meta["exporter"] == target
        for key, value in META.items():
            assert meta[key] == value
        assert meta["io"]["input_names"] == TEXT_IO.input_names
        for f in tokenizer_files:
            assert (folder / f.name).read_bytes() == f.read_bytes()
        assert records[target]["folder"] == str(folder)


@pytest.mark.slow
def test_built_targets_record_sha256_size_and_parity(stage_run, text_data):
    out, records = stage_run
    for target in ("onnx", "torchscript-lite"):
        rec = records[target]
        meta = json.loads((out / target / "artifact.json").read_text())
        artifact = out / target / meta["file"]
        assert rec["status"] == "ok" and rec["built"] is True
        assert rec["sha256"] == meta["sha256"] == artifact_digest(artifact)
        assert rec["size_bytes"] == meta["size_bytes"] == artifact.stat().st_size
        parity = rec["parity"]
        assert parity == meta["parity"]
        assert parity["ran"] and parity["passed"] and parity["examples"] == len(text_data[1])
        assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < TOLERANCE
        assert parity["artifact_metric"]["accuracy"] == pytest.approx(parity["source_metric"]["accuracy"])
        real = parity["real_lengths"]  # and as a server calls it: each text alone at its own length
        assert real["batch_size"] == 1 and real["examples"] == min(64, len(text_data[1]))
        assert real["top1_agreement"] == 1.0 and real["max_abs_diff"] < TOLERANCE
        assert rec["export_seconds"] > 0 and rec["seconds"] >= rec["export_seconds"]


@pytest.mark.slow
def test_tensorrt_without_tensorrt_is_recorded_not_built(stage_run):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    out, records = stage_run
    rec = records["tensorrt"]
    assert rec["status"] == "not_built" and rec["built"] is False
    assert rec["reason"] == "not built: TensorRT not installed"
    assert rec["parity"]["ran"] is False and "trtexec.sh" in rec["parity"]["reason"]
    meta = json.loads((out / "tensorrt" / "artifact.json").read_text())
    assert meta["file"] == "model.plan" and meta["sha256"] is None
    assert set(meta["files"]) == {"model.onnx", "model_fp16.onnx", "trtexec.sh", "trtexec.txt"}  # fp16: strongly typed from an fp16 graph
    # TensorRT's profile goes up to the task's max_length, which the stage passes as max_sequence.
    assert meta["notes"]["profile"]["input_ids"]["max"] == [32, MAX_LENGTH]


def test_trtexec_sh_records_the_engine_it_builds_so_edgekd_verifies_and_benches_it(stage_run, tmp_path):
    """On the device: trtexec.sh builds model.plan (a stand-in trtexec here) with the recipe's workspace limit,
    then records it in artifact.json, sealed again, so serve's checksum check and the bench take the folder."""
    import importlib.util
    import os
    import shutil

    from edgekd.devices.bench import discover
    from edgekd.export.base import meta_digest
    from edgekd.runfolder import sha256_file
    from edgekd.serving.model import verify_artifact

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    out, _ = stage_run
    folder = tmp_path / "run" / "export" / "tensorrt"
    shutil.copytree(out / "tensorrt", folder)
    before = (folder / "artifact.json").read_text()
    with pytest.raises(StageError, match=r"holds an export that was not built \(not built: TensorRT not installed\): "
                                         r"run .*trtexec.sh on the device \(it builds model.plan and records it"):
        verify_artifact(folder, json.loads(before))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "trtexec"
    fake.write_text('#!/bin/sh\n[ "$1" = --help ] && { echo "TensorRT v100300"; exit 0; }\n[ -n "$FAIL" ] && exit 3\n'
                    'echo "$@" > trtexec.args\nfor a in "$@"; do case "$a" in --saveEngine=*) '
                    'printf engine-bytes > "${a#--saveEngine=}";; esac; done\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    failed = subprocess.run(["sh", str(folder / "trtexec.sh")], env={**env, "FAIL": "1"}, capture_output=True, text=True)
    assert failed.returncode == 3 and (folder / "artifact.json").read_text() == before  # nothing recorded
    built = subprocess.run(["sh", str(folder / "trtexec.sh")], env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    args = (folder / "trtexec.args").read_text().split()
    assert "--memPoolSize=workspace:4096M" in args and args[-1] == "--stronglyTyped"
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["sha256"] == sha256_file(folder / "model.plan") and meta["built"] is True and meta["reason"] is None
    assert meta["size_bytes"] == len(b"engine-bytes") and meta["meta_sha256"] == meta_digest(meta)
    assert meta["parity"]["ran"] is False and "trtexec.sh" in meta["parity"]["reason"]
    assert verify_artifact(folder, meta)[0] == folder / "model.plan"
    (entry,) = discover(tmp_path / "run")
    assert entry["name"] == "tensorrt" and "status" not in entry and entry["sha256"] == meta["sha256"]


@pytest.mark.slow
def test_load_artifact_verifies_the_checksum(stage_run, text_data, tmp_path):
    import shutil

    out, _ = stage_run
    runner, meta = load_artifact(out / "onnx", threads=1)
    assert meta["target"] == "onnx" and runner.run({k: v[:2] for k, v in text_data[0].items()})["logits"].shape == (2, 2)
    copy = tmp_path / "onnx"
    shutil.copytree(out / "onnx", copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumError, match="changed after export"):
        load_artifact(copy)


@pytest.mark.slow
def test_onnx_artifact_loads_and_runs_without_torch(stage_run):
    out, _ = stage_run
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "import numpy as np\n"
        "from edgekd.export.stage import load_artifact\n"
        f"runner, meta = load_artifact({str(out / 'onnx')!r})\n"
        "ids = np.array([[2, 10, 11, 3]]); out = runner.run({'input_ids': ids, 'attention_mask': np.ones_like(ids)})\n"
        "print(out['logits'].shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "(1, 2)"


@pytest.mark.slow
def test_serving_accepts_the_recorded_digest(stage_run):
    serving = pytest.importorskip("edgekd.serving.model")
    out, _ = stage_run
    for target in ("onnx", "torchscript-lite"):
        meta = json.loads((out / target / "artifact.json").read_text())
        artifact, _ = serving.verify_artifact(out / target, meta)
        assert artifact == out / target / meta["file"]


def test_unavailable_target_is_recorded_unless_strict(text_module, text_data, tokenizer_files, tmp_path, monkeypatch):
    monkeypatch.setattr(TorchScriptLiteExporter, "requires", ("edgekd_no_such_backend",))
    records = run_stage(text_module, text_data, tmp_path, tokenizer_files, targets=["torchscript-lite"])
    rec = records["torchscript-lite"]
    assert rec["status"] == "unavailable" and rec["built"] is False
    assert "'edgekd_no_such_backend' is not installed" in rec["reason"]
    assert not (tmp_path / "torchscript-lite").exists()
    with pytest.raises(MissingBackendError, match="edgekd_no_such_backend"):
        run_stage(text_module, text_data, tmp_path, tokenizer_files, targets=["torchscript-lite"], strict=True)


def test_failed_conversion_is_recorded_unless_strict(tmp_path):
    inputs = {"x": np.repeat(eigh_inputs()["x"], 3, axis=0)}

    def stage(**cfg):
        return export_all(eigh_module(), eigh_io(), ["onnx"], tmp_path, ExportConfig(targets=["onnx"], **cfg),
                          inputs, None, None, {}, [])

    rec = stage()["onnx"]
    assert rec["status"] == "failed" and "aten._linalg_eigh" in rec["reason"]
    assert list(tmp_path.iterdir()) == []  # the atomic folder was discarded
    with pytest.raises(UnsupportedTargetError, match="aten._linalg_eigh"):
        stage(strict=True)


def test_a_parity_check_that_cannot_run_leaves_no_loadable_folder(text_module, text_data, tokenizer_files, tmp_path):
    """The folder is published before parity runs; a check that stops (here the source gives one more output
    column than the artifact) must not leave it behind with no parity figure, which load_artifact would accept."""
    import torch

    class Wider(torch.nn.Module):
        def forward(self, **kw):
            logits = text_module(**kw)[0]
            return (torch.cat([logits, logits[:, :1]], dim=-1),)

    inputs, labels = text_data

    def stage(strict):
        cfg = ExportConfig(targets=["torchscript-lite"], strict=strict)
        return export_all(text_module, TEXT_IO, ["torchscript-lite"], tmp_path, cfg, inputs, labels,
                          classification_metrics, META, tokenizer_files, reference=Wider())

    rec = stage(strict=False)["torchscript-lite"]
    assert rec["status"] == "failed" and rec["built"] is False and rec["folder"] is None
    assert rec["reason"].startswith("parity check: Export target 'torchscript-lite': output 'logits' has shape")
    assert not (tmp_path / "torchscript-lite").exists()
    with pytest.raises(ParityError, match="output 'logits' has shape"):
        stage(strict=True)
    assert not (tmp_path / "torchscript-lite").exists()


@pytest.mark.slow
def test_threshold_miss_raises_after_writing_the_figures(text_module, text_data, tokenizer_files, tmp_path):
    with pytest.raises(ParityError, match="'onnx': max abs diff .* > allowed 1e-30") as info:
        run_stage(text_module, text_data, tmp_path, tokenizer_files, targets=["onnx", "torchscript-lite"],
                  max_abs_diff=1e-30)
    records = info.value.records
    assert records["onnx"]["parity"]["passed"] is False
    assert records["torchscript-lite"]["parity"]["passed"] is True  # bit-exact, so even 1e-30 holds
    meta = json.loads((tmp_path / "onnx" / "artifact.json").read_text())
    assert meta["parity"]["passed"] is False
    # The folder stays for inspection, but what serves, benches and edgekd.load refuse to answer with it.
    with pytest.raises(ParityError, match="failed its parity check .* max_abs_diff"):
        load_artifact(tmp_path / "onnx")
    runner, _ = load_artifact(tmp_path / "onnx", allow_failed_parity=True)
    assert runner.run({k: v[:2] for k, v in text_data[0].items()})
    load_artifact(tmp_path / "torchscript-lite")  # the target that passed opens as before


def test_bad_requests_fail_before_anything_is_written(text_module, text_data, tokenizer_files, tmp_path):
    inputs, labels = text_data
    cfg = ExportConfig(targets=["onnx"])
    with pytest.raises(UnsupportedTargetError, match="Unknown export target 'tflite'"):
        export_all(text_module, TEXT_IO, ["onnx", "tflite"], tmp_path, cfg, inputs, labels, None, META, [])
    with pytest.raises(EdgeKDError, match="reserved"):
        export_all(text_module, TEXT_IO, ["onnx"], tmp_path, cfg, inputs, labels, None, {"sha256": "x"}, [])
    cfg.options = {"onnx": {"optimize": True}}
    bad = cfg.model_copy(update={"options": {"onnx": {"fuse": True}}})  # bypasses validation, as code could
    with pytest.raises(RecipeError, match="does not accept option\\(s\\) fuse"):
        export_all(text_module, TEXT_IO, ["onnx"], tmp_path, bad, inputs, labels, None, META, [])
    assert list(tmp_path.iterdir()) == []


def test_a_coreml_package_enumerates_the_batch_sizes_the_bench_times(tmp_path, monkeypatch):
    """bench.batch_sizes reach the Core ML exporter's enumerated shapes (a size it does not plan would be
    padded up to the next one and timed under the smaller label) and the export fingerprint; the
    exporter's own default, or export.options.coreml.batch_sizes, leaves both as they were."""
    from edgekd.pipeline import create_context, fingerprint_of
    from edgekd.recipe import parse_recipe
    from edgekd.stages.export import export_defaults
    from edgekd.testing import tiny_recipe, write_sentiment_csv

    monkeypatch.chdir(tmp_path)
    write_sentiment_csv("reviews.csv", n=60, seed=1)

    def ctx(bench_sizes, coreml=None, targets=("onnx", "coreml")):
        data = tiny_recipe(".", "teacher-model", "reviews.csv",
                           export={"targets": list(targets), "options": {"coreml": coreml} if coreml else {}})
        data.update(output_dir="runs", bench={"batch_sizes": bench_sizes})
        return create_context(parse_recipe(data))

    assert "coreml" not in export_defaults(ctx([1, 8]))  # the exporter's own default: (1, 8)
    assert export_defaults(ctx([1, 4, 16, 64]))["coreml"] == {"batch_sizes": [1, 4, 16]}  # up to max_batch 32
    assert export_defaults(ctx([1, 64], {"max_batch": 64}))["coreml"] == {"batch_sizes": [1, 64]}
    assert "coreml" not in export_defaults(ctx([1, 4], {"batch_sizes": [2]}))  # the recipe's own choice
    assert "coreml" not in export_defaults(ctx([1, 4], targets=("onnx",)))
    assert fingerprint_of(ctx([1, 4]), "export") != fingerprint_of(ctx([1, 8]), "export")
    assert fingerprint_of(ctx([1, 4], targets=("onnx",)), "export") == fingerprint_of(ctx([1, 8], targets=("onnx",)),
                                                                                      "export")
