"""Shared fixtures: tiny random models and data built in code, nothing from the network."""

from __future__ import annotations

import os

import pytest

# Progress bars are noise in test logs; the cache never points at the user's real cache.
os.environ.setdefault("EDGEKD_QUIET", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path_factory.getbasetemp() / "edgekd-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


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
