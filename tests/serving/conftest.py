"""Fixtures for the server: a real tiny ONNX export in a run folder, apps, and a live uvicorn."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import MAX_LENGTH, RUN_NAME, LiveServer, export_tiny_onnx, ort_loader

from edgekd.runfolder import RunFolder


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tiny_classifier_dir) -> Path:
    """runs/tiny/ with export/onnx/ and a manifest that records the artifact and an accuracy."""
    root = tmp_path_factory.mktemp("runs") / RUN_NAME
    folder = export_tiny_onnx(tiny_classifier_dir, root / "export" / "onnx")
    run = RunFolder(root)
    run.record("eval", "fp", {"student": {"accuracy": 0.75}})
    run.record("export", "fp", {"onnx": {"top1_agreement": 1.0, "max_abs_diff": 1e-6}},
               artifacts=[folder / "model.onnx"])
    return root


@pytest.fixture(scope="session")
def export_dir(run_dir) -> Path:
    return run_dir / "export" / "onnx"


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A private copy of the run folder, for tests that tamper with it."""
    dst = tmp_path / RUN_NAME
    shutil.copytree(run_dir, dst)
    return dst


@pytest.fixture(scope="session")
def reference(export_dir):
    """Logits straight from ONNX Runtime, text by text, unpadded: what the server must reproduce."""
    from tokenizers import Tokenizer

    runner, _ = ort_loader(export_dir)
    tok = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    tok.enable_truncation(MAX_LENGTH)

    def logits(text: str) -> np.ndarray:
        ids = np.asarray([tok.encode(text).ids], dtype=np.int64)
        return runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"][0]

    return logits


@pytest.fixture
def make_client(export_dir):
    """make_client(loader=..., **settings) -> TestClient with the lifespan run (model loaded)."""
    from fastapi.testclient import TestClient

    from edgekd.serving import ServeSettings, create_app

    stack = contextlib.ExitStack()

    def make(loader=ort_loader, **overrides):
        settings = ServeSettings(export_dir=overrides.pop("export_dir", export_dir), **overrides)
        app = create_app(settings, loader=loader)
        return stack.enter_context(TestClient(app))

    with stack:
        yield make


@pytest.fixture
def live_server(export_dir):
    """live_server(loader=..., **settings) -> a started LiveServer; stopped at teardown."""
    from edgekd.serving import ServeSettings, create_app

    servers: list[LiveServer] = []

    def start(loader=ort_loader, **overrides):
        settings = ServeSettings(export_dir=overrides.pop("export_dir", export_dir), **overrides)
        srv = LiveServer(create_app(settings, loader=loader)).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()

