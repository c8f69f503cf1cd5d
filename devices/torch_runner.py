"""An eager PyTorch module behind the Runner protocol, so the fp32 teacher and student are timed
by the same harness, on the same inputs, as the exported artifacts."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekd.errors import DataError, EdgeKDError
from edgekd.export.base import ModelIO


class TorchRunner:
    """Runs an export module (keyword tensors in ``io.input_names`` -> tuple in ``io.output_names``)
    under ``torch.inference_mode`` on ``device``. Thread counts are left to the caller: setting
    them here would change the whole process."""

    def __init__(self, module: Any, io: ModelIO, device: str = "cpu"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self.input_names = list(io.input_names)
        self.output_names = list(io.output_names)
        self.dtypes = dict(io.dtypes)
        self.runtime = {"runtime": "pytorch", "torch": torch.__version__, "device": str(self.device)}

    @property
    def threads(self) -> int:
        """torch's intra-op thread count in this process as it is now (the caller sets it): each row of a
        comparison records the threads it ran on, PyTorch rows as well as ONNX Runtime ones."""
        return int(self.torch.get_num_threads())

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise DataError(f"TorchRunner needs inputs {self.input_names}; missing {missing}")
        torch = self.torch
        tensors = {n: torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=self.dtypes.get(n))).to(self.device)
                   for n in self.input_names}
        with torch.inference_mode():
            out = self.module(**tensors)
        out = out if isinstance(out, (tuple, list)) else (out,)
        if len(out) != len(self.output_names):
            raise EdgeKDError(
                f"the export module returned {len(out)} outputs but io names {len(self.output_names)}: {self.output_names}"
            )
        # .cpu() waits for the device, so a timed call covers the whole inference.
        return {n: o.detach().float().cpu().numpy() if o.is_floating_point() else o.detach().cpu().numpy()
                for n, o in zip(self.output_names, out, strict=True)}
