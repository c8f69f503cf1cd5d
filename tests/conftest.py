"""Shared fixtures: tiny random models and data built in code, nothing from the network."""

from __future__ import annotations

import os

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
