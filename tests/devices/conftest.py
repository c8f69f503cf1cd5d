"""A tiny run folder for the device tests, built once per test session (each xdist worker reads its own
copy): a 2-layer random BERT exported by the export stage to ONNX (plus a dynamic-int8 copy) and
TensorRT (not built without TensorRT), and real tokenized test examples with labels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

MAX_LEN = 16


@dataclass
class TinyRun:
    run_dir: Path
    eval_inputs: dict[str, np.ndarray]
    labels: np.ndarray
    module: Any
    io: Any


def _build(root: Path) -> None:
    """runs/tiny under ``root``: the export stage's onnx/ and tensorrt/ of a tiny BERT (model/), and a
    dynamic-int8 copy of the ONNX file as the quantize stage makes it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import BertForSequenceClassification

    from edgekd.export.base import write_artifact_meta
    from edgekd.export.stage import export_all
    from edgekd.recipe import ExportConfig
    from edgekd.runfolder import sha256_file
    from edgekd.tasks.text.task import TEXT_IO, SequenceClassifierExport, classification_metrics
    from edgekd.testing import tiny_bert

    model_dir = tiny_bert(root / "model", num_labels=2)
    eval_inputs, labels = _examples(model_dir)
    module = SequenceClassifierExport(BertForSequenceClassification.from_pretrained(model_dir)).eval()
    run_dir = root / "runs" / "tiny"
    # The export stage itself writes onnx/ and tensorrt/ (not built here: no TensorRT on this machine).
    records = export_all(module, TEXT_IO, ["onnx", "tensorrt"], run_dir / "export", ExportConfig(),
                         eval_inputs, labels, classification_metrics,
                         {"labels": ["negative", "positive"], "max_length": MAX_LEN}, [])
    assert records["onnx"]["built"], records
    # A second precision of the same target, as the quantize stage makes.
    fp32, int8 = run_dir / "export" / "onnx", run_dir / "export" / "onnx-int8"
    int8.mkdir()
    quantize_dynamic(str(fp32 / "model.onnx"), str(int8 / "model.onnx"), weight_type=QuantType.QInt8)
    meta = json.loads((fp32 / "artifact.json").read_text())
    # As the quantize stage writes it: the folder's own target name, the exporter that runs it.
    assert meta["exporter"] == "onnx"
    meta.update(target="onnx-int8", precision="int8", sha256=sha256_file(int8 / "model.onnx"), size_bytes=(int8 / "model.onnx").stat().st_size,
                files={}, parity=None)
    write_artifact_meta(int8, meta)
    (run_dir / "manifest.json").write_text(json.dumps(
        {"stages": {"eval": {"metrics": {"teacher.accuracy": 0.75, "student.accuracy": 0.5}}}}
    ))


def _examples(model_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Real tokenized test examples (padded to MAX_LEN) and their labels."""
    from transformers import BertTokenizerFast

    from edgekd.testing import sentiment_rows

    tok = BertTokenizerFast.from_pretrained(model_dir)
    rows = sentiment_rows(48, seed=3)
    enc = tok([t for t, _ in rows], padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np")
    return ({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)},
            np.array([y for _, y in rows]))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, built_once) -> TinyRun:
    """This worker's own copy of the tiny run (the tests write their bench folders into it), built once
    per session (tests/conftest.py's built_once)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    import shutil

    from transformers import BertForSequenceClassification

    from edgekd.tasks.text.task import TEXT_IO, SequenceClassifierExport

    root = tmp_path_factory.mktemp("devices")
    shutil.copytree(built_once("devices-tiny-run", _build), root, dirs_exist_ok=True)
    eval_inputs, labels = _examples(root / "model")
    module = SequenceClassifierExport(BertForSequenceClassification.from_pretrained(root / "model")).eval()
    return TinyRun(root / "runs" / "tiny", eval_inputs, labels, module, TEXT_IO)
