"""Helpers shared by the export tests (imported by name: this folder has no __init__.py)."""

from __future__ import annotations

import sys

import numpy as np

MAX_LENGTH = 24
N_EXAMPLES = 48
# Float32 export of a 2-layer, 32-wide BERT: anything beyond rounding noise is a real disagreement.
TOLERANCE = 1e-4


def eigh_module():
    """A module with an operator (symmetric eigendecomposition) that no edge target converts."""
    import torch

    class Eigh(torch.nn.Module):
        def forward(self, x):
            return (torch.linalg.eigh(x @ x.transpose(-1, -2))[0],)

    return Eigh()


def eigh_io():
    from edgekd.export.base import ModelIO

    return ModelIO(["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}}, {"x": "float32"})


def eigh_inputs():
    return {"x": np.random.default_rng(0).standard_normal((2, 4, 4)).astype(np.float32)}


def shorter(inputs: dict[str, np.ndarray], rows: int, length: int) -> dict[str, np.ndarray]:
    """The first ``rows`` examples cut to ``length`` tokens: a shape the export never saw."""
    return {k: np.ascontiguousarray(v[:rows, :length]) for k, v in inputs.items()}


def source_logits(module, inputs):
    import torch

    with torch.inference_mode():
        return module(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].numpy()


on_macos = sys.platform == "darwin"
