"""Export fixtures: a tiny BERT classifier wrapped as the export module, and real tokenised examples."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import MAX_LENGTH, N_EXAMPLES


@pytest.fixture(scope="session")
def text_module(tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification

    from edgekd.tasks.text.task import SequenceClassifierExport

    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir)
    return SequenceClassifierExport(model).eval()


@pytest.fixture(scope="session")
def text_data(tiny_classifier_dir):
    """(inputs, labels): synthetic reviews tokenised by the model's own tokenizer, padded to MAX_LENGTH."""
    from transformers import AutoTokenizer

    from edgekd.testing import sentiment_rows

    rows = sentiment_rows(N_EXAMPLES, seed=3)
    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    enc = tok([t for t, _ in rows], padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    inputs = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    labels = np.array([y for _, y in rows])
    return inputs, labels


@pytest.fixture(scope="session")
def tokenizer_files(tiny_classifier_dir):
    return sorted(p for p in tiny_classifier_dir.iterdir() if p.name.startswith(("tokenizer", "vocab", "special")))
