"""Helpers of the server tests: a plain ONNX Runtime runner and loaders, a tiny ONNX export, a
live uvicorn on loopback, and a torch-free subprocess check. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export.base import read_artifact_meta, write_artifact_meta
from edgekd.runfolder import sha256_file

RUN_NAME = "tiny"
LABELS = ["negative", "positive"]
MAX_LENGTH = 32


class OrtRunner:
    """A plain ONNX Runtime runner: the Runner protocol over one .onnx file."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.threads = threads

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, inputs), strict=True))


def ort_loader(folder: Path, **opts: Any):
    meta = read_artifact_meta(folder)
    return OrtRunner(Path(folder) / meta["file"], **opts), meta


class SlowRunner:
    """Wraps a runner and sleeps before each call, to make requests overlap in tests."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.calls: list[int] = []

    def run(self, inputs):
        time.sleep(self.delay)
        self.calls.append(len(inputs["input_ids"]))
        return self.inner.run(inputs)


def slow_loader(delay: float, box: list | None = None):
    def load(folder, **opts):
        runner, meta = ort_loader(folder, **opts)
        slow = SlowRunner(runner, delay)
        if box is not None:
            box.append(slow)
        return slow, meta

    return load


def export_tiny_onnx(model_dir: Path, out_dir: Path) -> Path:
    """Export a tiny HF classifier to ONNX with its tokenizer and artifact.json, as an export stage does."""
    import torch
    from transformers import AutoModelForSequenceClassification

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return (self.m(input_ids=input_ids, attention_mask=attention_mask).logits,)

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    onnx_path = out_dir / "model.onnx"
    token_axes = {0: "batch", 1: "sequence"}
    dynamic_axes = {"input_ids": token_axes, "attention_mask": token_axes, "logits": {0: "batch"}}
    torch.onnx.export(
        Logits(model), (ids, torch.ones_like(ids)), str(onnx_path), input_names=["input_ids", "attention_mask"],
        output_names=["logits"], opset_version=17, dynamo=False, dynamic_axes=dynamic_axes,
    )
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
    for name in tokenizer_files:
        shutil.copy(model_dir / name, out_dir / name)
    write_artifact_meta(out_dir, {
        "target": "onnx", "exporter": "onnx", "file": "model.onnx", "sha256": sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size, "precision": "fp32",
        "io": {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"],
               "dynamic_axes": dynamic_axes, "dtypes": {"input_ids": "int64", "attention_mask": "int64"}},
        "labels": LABELS, "max_length": MAX_LENGTH, "task": "text-classification",
        "extra_sha256": {n: sha256_file(out_dir / n) for n in tokenizer_files},
        "source_model": str(model_dir), "parity": {"max_abs_diff": 1e-6, "top1_agreement": 1.0},
    })
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on a free loopback port in a background thread."""

    def __init__(self, app):
        import uvicorn

        from edgekd.serving.app import uvicorn_config

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The server's own configuration (timeouts included), on a free loopback port.
        self.server = uvicorn.Server(uvicorn_config(app, app.state.settings, host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def wait_in_flight(self, n: int, timeout: float = 30) -> None:
        """Wait until the server is handling ``n`` POST requests at once (all of them received)."""
        deadline = time.monotonic() + timeout
        while self.app.state.metrics.in_flight() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.app.state.metrics.in_flight()} of {n} requests reached the server")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)



SLIM = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import onnxruntime as ort
    from fastapi.testclient import TestClient
    from edgekd.export.base import read_artifact_meta
    from edgekd.serving import ServeSettings, create_app

    folder = Path(sys.argv[1])

    class Runner:
        def __init__(self, path):
            self.s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self.s.get_inputs()]
            self.output_names = [o.name for o in self.s.get_outputs()]
        def run(self, inputs):
            return dict(zip(self.output_names, self.s.run(None, inputs)))

    def loader(folder, **opts):
        if sys.argv[2] == "stage":
            from edgekd.export.stage import load_artifact
            return load_artifact(folder, **opts)
        meta = read_artifact_meta(folder)
        return Runner(folder / meta["file"]), meta

    with TestClient(create_app(ServeSettings(export_dir=folder), loader=loader)) as client:
        r = client.post("/predict", json={"texts": ["good", "bad"]})
        v2 = client.post("/v2/models/x/infer", json={})
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "optimum") if m in sys.modules)
        print(json.dumps({"status": r.status_code, "v2": v2.status_code, "heavy": heavy}))
    """
)


def _run_slim(folder, how: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SLIM, str(folder), how], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_cli(monkeypatch, capsys, *args):
    """Run `edgekd serve ...` in-process with the server start replaced (``monkeypatch``); return (exit code, the
    output in one line, [(folder, settings)] it would have served)."""
    import edgekd.serving
    from edgekd import cli

    started = []
    monkeypatch.setattr(edgekd.serving, "serve", lambda folder, target, settings: started.append((folder, settings)))
    monkeypatch.setattr(sys, "argv", ["edgekd", "serve", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split()), started
