"""The Intel path a user would take: OpenVINO, with NNCF post-training int8 quantization
(``nncf.quantize(..., model_type=nncf.ModelType.TRANSFORMER)``) calibrated on training texts.

The model converted is the Optimum ONNX export of the same student (``ov.convert_model`` reads
ONNX), so the OpenVINO rows differ from the Optimum rows by the runtime and the quantizer only.
Quantization runs in a child process (this file's ``quantize`` mode): NNCF's imports and logging
never touch the caller.

    python benchmarks/_openvino_path.py quantize MODEL.onnx OUT_DIR CALIB.npz SUBSET

``CALIB.npz`` holds ``ids``, ``mask`` and ``lengths`` of training texts; each calibration item is
one text at its own length, as the model sees it when serving.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.xml"


def available() -> str | None:
    """None when openvino and nncf import, else why not (with the install hint)."""
    missing = []
    for name in ("openvino", "nncf"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        return (f"{' and '.join(missing)} not installed: pip install -c constraints.txt 'edgekd[intel]' "
                "(openvino, nncf)")
    return None


def quantize(onnx_path: Path, out_dir: Path, calib_npz: Path, subset: int, timeout_s: float = 1800) -> dict[str, Any]:
    """NNCF int8 PTQ of ``onnx_path`` into ``out_dir/model.xml``, in a child process."""
    rec: dict[str, Any] = {
        "api": f"nncf.quantize(ov.convert_model(model.onnx), nncf.Dataset(training texts), "
               f"model_type=nncf.ModelType.TRANSFORMER, subset_size={subset})",
        "path": str(out_dir / MODEL_FILE), "calibration_texts": subset,
    }
    why = available()
    if why:
        return {**rec, "status": "skipped", "error": why}
    cmd = [sys.executable, str(Path(__file__).resolve()), "quantize", str(onnx_path), str(out_dir), str(calib_npz),
           str(subset)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**rec, "status": "error", "error": f"NNCF quantization timed out after {timeout_s:.0f} s"}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    xml = out_dir / MODEL_FILE
    if proc.returncode == 0 and xml.is_file():
        size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
        return {**rec, "status": "ok", "size_bytes": size}
    tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-12:])
    return {**rec, "status": "error", "error": f"NNCF quantization exited with {proc.returncode}: {tail}"}


class OpenVinoRunner:
    """One compiled OpenVINO model on the CPU, latency hint, ``threads`` inference threads; the
    same ``run(inputs) -> {"logits": ...}`` interface as edgekd's runners."""

    def __init__(self, path: Path, threads: int | None = None):
        import openvino as ov

        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.threads = threads
        self.runtime = {"runtime": "openvino", "version": ov.__version__, "device": "CPU",
                        "inference_precision": str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.request.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return {"logits": np.asarray(next(iter(out.values())))}


def _quantize_main(onnx_path: str, out_dir: str, calib_npz: str, subset: str) -> int:
    import nncf
    import openvino as ov

    model = ov.convert_model(onnx_path)
    names = [p.get_any_name() for p in model.inputs]
    with np.load(calib_npz) as z:
        ids, mask, lengths = z["ids"], z["mask"], z["lengths"]
    n = min(int(subset), len(lengths))

    def item(i: int) -> dict[str, np.ndarray]:
        w = int(lengths[i])
        feed = {"input_ids": ids[i : i + 1, :w], "attention_mask": mask[i : i + 1, :w]}
        return {k: feed.get(k, np.zeros((1, w), dtype=np.int64)) for k in names}  # token_type_ids: zeros

    q = nncf.quantize(model, nncf.Dataset([item(i) for i in range(n)]), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=n)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ov.save_model(q, str(Path(out_dir) / MODEL_FILE))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "quantize":
        print("usage: _openvino_path.py quantize MODEL.onnx OUT_DIR CALIB.npz SUBSET", file=sys.stderr)
        sys.exit(2)
    sys.exit(_quantize_main(*sys.argv[2:]))
