"""Parity as a server calls an artifact: each text alone at its own length. A runner right on padded
batches and wrong on a shorter row is caught."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.export.parity import check_parity, check_real_lengths

torch = pytest.importorskip("torch")


class MeanOfTokens(torch.nn.Module):
    """logits = [mean id, -mean id] over the tokens the mask marks: depends on the real length."""

    def forward(self, input_ids, attention_mask):
        m = attention_mask.float()
        mean = (input_ids.float() * m).sum(1) / m.sum(1)
        return torch.stack([mean - 20.0, 20.0 - mean], dim=1)


class PaddedOnly:
    """Right whenever the batch is as wide as it was traced (16), wrong on any shorter row."""

    input_names, output_names = ["input_ids", "attention_mask"], ["logits"]

    def run(self, inputs):
        out = MeanOfTokens()(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
        return {"logits": out if inputs["input_ids"].shape[1] == 16 else -out}


def _inputs(n=20, width=16):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 40, (n, width)).astype(np.int64)
    lengths = rng.integers(3, width, n)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_a_runner_right_on_padded_batches_and_wrong_at_real_lengths_is_caught():
    inputs = _inputs()
    batched = check_parity(PaddedOnly(), MeanOfTokens(), inputs, None, None, batch_size=8)
    assert batched.top1_agreement == 1.0 and not batched.failures(0.99, None)
    real = check_real_lengths(PaddedOnly(), MeanOfTokens(), inputs, examples=12)
    assert real.examples == 12 and real.batch_size == 1
    assert real.top1_agreement < 0.5 and real.failures(0.99, None)


def test_inputs_without_a_mask_have_no_real_length_check():
    assert check_real_lengths(PaddedOnly(), MeanOfTokens(), {"images": np.zeros((2, 3, 4, 4), np.float32)}) is None
