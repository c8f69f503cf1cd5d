"""The path most Hugging Face users take instead of edgekd: ``optimum-cli export onnx``, then
Optimum's ``ORTQuantizer`` with the dynamic int8 ``AutoQuantizationConfig`` of this CPU.

Both steps run in child processes (the CLI as users type it; the quantizer through this file's
``quantize`` mode), so Optimum's imports and logging never touch the caller's process.

    python benchmarks/_optimum_path.py quantize ONNX_DIR OUT_DIR ISA

In optimum 2.x the ONNX Runtime integration ships in the ``optimum-onnx`` package, still imported
as ``optimum.onnxruntime``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ISAS = ("avx512_vnni", "avx512", "avx2", "arm64")
QUANTIZED_FILE = "model_quantized.onnx"


def choose_isa(flags: list[str], machine: str | None = None) -> tuple[str, str]:
    """The ``AutoQuantizationConfig`` constructor for this CPU and why, as Optimum's docs pair them:
    arm64 on ARM; on x86 avx512_vnni when the CPU has VNNI, else avx512, else avx2."""
    machine = (machine or platform.machine()).lower()
    have = set(flags)
    if machine in ("aarch64", "arm64") or machine.startswith("armv8"):
        return "arm64", f"machine is {machine}"
    if "avx512_vnni" in have or "avx512vnni" in have:
        return "avx512_vnni", "the CPU flags include avx512_vnni"
    if "avx512f" in have:
        return "avx512", "the CPU flags include avx512f but not avx512_vnni"
    if "avx2" in have:
        return "avx2", "the CPU flags include avx2 but not avx512f"
    return "avx2", "no AVX2 flag found: avx2 is Optimum's lowest x86 configuration"


def optimum_cli() -> list[str]:
    """The ``optimum-cli`` of this interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).with_name("optimum-cli")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("optimum-cli")
    if found:
        return [found]
    return [sys.executable, "-m", "optimum.commands.optimum_cli"]


def offline_env() -> dict[str, str]:
    """The child's environment: a local model folder needs no hub, so the hub is never asked."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _run(cmd: list[str], timeout_s: float, cwd: Path) -> tuple[int | None, str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=offline_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s", time.perf_counter() - t0
    return proc.returncode, proc.stderr + proc.stdout, time.perf_counter() - t0


def needs_python_export(model_dir: Path) -> bool:
    """A pruned student whose layers have different FFN widths (``config.ffn_sizes_per_layer``):
    ``from_pretrained``, and so ``optimum-cli``, cannot build it from its config."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return bool(config.get("ffn_sizes_per_layer"))


def export_onnx(model_dir: Path, out_dir: Path, timeout_s: float = 1800) -> dict[str, Any]:
    """``optimum-cli export onnx --model MODEL_DIR --task text-classification OUT_DIR``; for a pruned
    student with per-layer FFN widths, the exporter the CLI calls (``onnx_export_from_model``) on the
    model loaded by ``edgekd.pruning.load_pruned_model``, in a child process."""
    if needs_python_export(model_dir):
        cmd = [sys.executable, str(Path(__file__).resolve()), "export", str(model_dir), str(out_dir)]
    else:
        cmd = [*optimum_cli(), "export", "onnx", "--model", str(model_dir), "--task", "text-classification",
               str(out_dir)]
    code, log, seconds = _run(cmd, timeout_s, out_dir.parent)
    model = out_dir / "model.onnx"
    rec: dict[str, Any] = {"command": " ".join(cmd), "seconds": round(seconds, 2), "path": str(model)}
    if code == 0 and model.is_file():
        return {**rec, "status": "ok", "size_bytes": onnx_bytes(model)}
    return {**rec, "status": "error", "error": f"optimum-cli export exited with {code}: {_tail(log)}"}


def quantize_onnx(onnx_dir: Path, out_dir: Path, isa: str, timeout_s: float = 1800) -> dict[str, Any]:
    """ORTQuantizer + AutoQuantizationConfig.<isa>(is_static=False, per_channel=False), in a child."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "quantize", str(onnx_dir), str(out_dir), isa]
    code, log, seconds = _run(cmd, timeout_s, out_dir.parent)
    model = out_dir / QUANTIZED_FILE
    rec: dict[str, Any] = {
        "api": f"ORTQuantizer.from_pretrained(onnx_dir).quantize(AutoQuantizationConfig.{isa}("
               "is_static=False, per_channel=False), save_dir)",
        "isa": isa, "seconds": round(seconds, 2), "path": str(model),
    }
    if code == 0 and model.is_file():
        config = out_dir / "ort_config.json"
        return {**rec, "status": "ok", "size_bytes": onnx_bytes(model),
                "ort_config": json.loads(config.read_text()) if config.is_file() else None}
    return {**rec, "status": "error", "error": f"ORTQuantizer exited with {code}: {_tail(log)}"}


def onnx_bytes(path: Path) -> int:
    """An ONNX file plus its external-data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _quantize_main(onnx_dir: str, out_dir: str, isa: str) -> int:
    if isa not in ISAS:
        print(f"unknown ISA '{isa}'; choose one of {', '.join(ISAS)}", file=sys.stderr)
        return 2
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    config = getattr(AutoQuantizationConfig, isa)(is_static=False, per_channel=False)
    ORTQuantizer.from_pretrained(onnx_dir).quantize(quantization_config=config, save_dir=out_dir)
    return 0


def _export_main(model_dir: str, out_dir: str) -> int:
    from optimum.exporters.onnx import onnx_export_from_model

    from edgekd.pruning import load_pruned_model

    onnx_export_from_model(load_pruned_model(model_dir).eval(), out_dir, task="text-classification")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "export":
        sys.exit(_export_main(*sys.argv[2:]))
    if len(sys.argv) != 5 or sys.argv[1] != "quantize":
        print("usage: _optimum_path.py quantize ONNX_DIR OUT_DIR ISA | _optimum_path.py export MODEL_DIR OUT_DIR",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(_quantize_main(*sys.argv[2:]))
