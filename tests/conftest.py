"""Shared fixtures: tiny random models and data built in code, nothing from the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Progress bars are noise in test logs; the cache never points at the user's real cache.
os.environ.setdefault("EDGEKD_QUIET", "1")
# Console output is read back by the tests at one width whatever runs them: pytest-xdist's workers
# inherit COLUMNS=80, which would wrap and truncate tables that a plain run prints at 120.
os.environ["COLUMNS"] = "120"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path_factory.getbasetemp() / "edgekd-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _a_cpu_with_vnni():
    """Tests quantize as for a CPU with VNNI, whose int8 weights stay signed, whatever CPU runs them: on an
    x86 CPU without VNNI ``quantize.unsigned_weights: auto`` builds every setup twice. Session-wide, so the
    module-scoped runs that tests re-run see the same CPU; the tests of that choice
    (``test_weight_encoding.py``) set the CPU they need."""
    from edgekd.quantization import weight_encoding

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weight_encoding, "this_machine", lambda: ("x86_64", ["avx2", "avx512f", "avx512_vnni"]))
        yield


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tests' models are tiny: a second intra-op thread gains them nothing, and on a busy machine
    OpenMP's spinning threads make them many times slower (a tiny teacher fine-tune: 7 s on one
    thread, over 3 minutes on two while another process holds a core). Tests and the stages they run
    that ask for a thread count still set it; the child processes of isolated measurements pin theirs."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny 4-layer BERT without a task head (like the default teacher before fine-tuning)."""
    from edgekd.testing import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-teacher"), num_layers=4)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory):
    """A tiny 2-layer BERT sequence classifier with two labels."""
    from edgekd.testing import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-classifier"), num_layers=2, num_labels=2)


@pytest.fixture
def tiny_csv(tmp_path):
    from edgekd.testing import write_sentiment_csv

    return write_sentiment_csv(tmp_path / "reviews.csv", n=240, seed=1)


def _build_full_run(root) -> None:
    """A tiny text run through every stage into ``root``: prune, ONNX export, quantize with a static
    candidate beside the default, bench (with the eager teacher and student). Its console output is kept
    in ``root/output.txt``."""
    import yaml
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.testing import tiny_bert, tiny_recipe, write_sentiment_csv

    csv = write_sentiment_csv(root / "reviews.csv", n=240, seed=1)
    teacher = tiny_bert(root / "teacher", num_layers=4)
    recipe = tiny_recipe(root, teacher, csv,
                         teacher={"finetune": {"epochs": 2, "batch_size": 32, "lr": 3e-3}},
                         distill={"train": {"epochs": 1, "batch_size": 32, "lr": 2e-3}},
                         prune={"enabled": True, "keep_params": 0.6, "recover_epochs": 0.5},
                         export={"targets": ["onnx"]},
                         quantize={"enabled": True, "speed_runs": 5, "sensitivity_examples": 12,
                                   "calibration_samples": 8, "candidates": [{"method": "static"}]},
                         bench={"enabled": True, "batch_sizes": [1], "runs": 3, "warmup": 1, "isolate": False},
                         runtime={"threads": 1})
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEKD_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        res = CliRunner().invoke(app, ["run", str(root / "recipe.yaml")])
    assert res.exit_code == 0, res.output
    (root / "output.txt").write_text(res.output)


@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
    """``built_once(name, build)``: the folder ``name`` that ``build(folder)`` fills, built once per test
    session. The first pytest-xdist worker that asks builds it under a lock in the session's shared
    temporary folder; the others wait, then read it (a plain run builds it in its own). Read it, or copy
    it to change it."""
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base

    def get(name: str, build) -> Path:
        root = shared / name
        with FileLock(f"{root}.lock"):
            if not (root / ".built").exists():
                shutil.rmtree(root, ignore_errors=True)  # a build that failed in another worker starts again
                root.mkdir()
                build(root)
                (root / ".built").touch()
        return root

    return get


@pytest.fixture(scope="session")
def _shared_full_run(built_once):
    root = built_once("shared-full-run", _build_full_run)
    return root / "runs" / "tiny", (root / "output.txt").read_text()


@pytest.fixture
def full_run(_shared_full_run, tmp_path):
    """A copy of the shared tiny run (runs/tiny, every stage done) that the test may change, the path of the
    original and the console output of the command that ran it: (copy, original, output)."""
    import shutil

    original, output = _shared_full_run
    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(original, copy)
    return copy, original, output


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has ended (the owner of a leftover that a kill left behind)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
