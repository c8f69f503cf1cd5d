"""TorchRunner: an eager export module behind the Runner protocol."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.devices.torch_runner import TorchRunner
from edgekd.errors import DataError, EdgeKDError
from edgekd.export.base import ModelIO, Runner

torch = pytest.importorskip("torch")

IO = ModelIO(["input_ids", "attention_mask"], ["logits"], {"input_ids": {0: "batch"}},
             {"input_ids": "int64", "attention_mask": "int64"})


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return (h.sum(1),)


def test_runs_like_the_module():
    mod = Toy()
    runner = TorchRunner(mod, IO)
    assert isinstance(runner, Runner)
    ids = np.array([[1, 2, 3], [4, 5, 0]], dtype=np.int32)  # cast to the declared int64
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    out = runner.run({"input_ids": ids, "attention_mask": mask})
    assert list(out) == ["logits"] and out["logits"].dtype == np.float32
    with torch.inference_mode():
        ref = mod(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask))[0].numpy()
    np.testing.assert_allclose(out["logits"], ref)
    assert runner.runtime["runtime"] == "pytorch" and runner.runtime["device"] == "cpu"


def test_missing_input_and_wrong_outputs_are_errors():
    runner = TorchRunner(Toy(), IO)
    with pytest.raises(DataError, match="missing \\['attention_mask'\\]"):
        runner.run({"input_ids": np.zeros((1, 2), np.int64)})
    two = ModelIO(IO.input_names, ["logits", "hidden"], {}, IO.dtypes)
    with pytest.raises(EdgeKDError, match="returned 1 outputs"):
        TorchRunner(Toy(), two).run({"input_ids": np.zeros((1, 2), np.int64),
                                     "attention_mask": np.ones((1, 2), np.int64)})


@pytest.mark.gpu
def test_cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    runner = TorchRunner(Toy(), IO, device="cuda")
    out = runner.run({"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((2, 3), np.int64)})
    assert out["logits"].shape == (2, 3) and runner.runtime["device"] == "cuda"
