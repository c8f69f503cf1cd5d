"""Which models ``compare_tools.py`` measures, as JSON-able specs: the teacher, the students (the
distilled one, and the pruned one the usual tools also get), each usual path on each student, and
edgekd's export folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.devices.remote_runner import ROW_DEPENDENT_PRECISIONS
from edgekd.errors import StageError

# Suffix of the row that opens an edgekd ONNX folder with ONNX Runtime's default optimisers instead of
# the session options the folder chose (artifact.json runtime_options).
ORT_DEFAULTS = "-ort-defaults"
RUNTIMES = {"onnx": "ONNX Runtime", "executorch": "ExecuTorch", "torchscript-lite": "TorchScript lite",
            "coreml": "Core ML", "tensorrt": "TensorRT"}


def _folder_bytes(folder: Path) -> int | None:
    files = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    return sum(p.stat().st_size for p in files) if files else None


def _student_dir(run: Path) -> tuple[Path, str]:
    """The distilled student before pruning: the model a user would take to the usual tools."""
    folder = run / "distill" / "model"
    if not (folder / "config.json").is_file():
        raise StageError(f"{folder} holds no model: run the distill stage first (`edgekd run` or `edgekd distill`).")
    return folder, "distill"


def _students(run: Path) -> dict[str, Path]:
    """Every student the usual tools get: the distilled one, and the pruned one when the run pruned,
    so each tool is also compared on the *same* model edgekd ships (what the toolchain adds)."""
    found = {"student": _student_dir(run)[0]}
    pruned = run / "prune" / "model"
    if (pruned / "config.json").is_file():
        found["pruned"] = pruned
    return found


PREFIX = {"student": ("", "student"), "pruned": ("pruned-", "pruned student")}


def _specs(run: Path, students: dict[str, Path], entries: list[dict[str, Any]],
           paths: dict[str, dict[str, Any]], torchao_compile: bool = True, trimmed: bool = False) -> tuple[list, list]:
    """(specs to measure, rows that cannot be measured here), in table order. ``paths`` holds, per
    student, the records of its Optimum export/quantize and OpenVINO quantize steps. ``trimmed``: the
    run trimmed its vocabulary, so the models that read the original one (the teacher, the distilled
    student and every usual path on it) are marked ``vocab: original``: the timing child times and scores
    them on the original tokenizer's ids of the same texts."""
    teacher = run / "teacher" / "model"
    specs = [{"name": "teacher-fp32", "label": "teacher · PyTorch fp32", "group": "teacher", "kind": "hf",
              "path": str(teacher), "runtime": "PyTorch eager", "precision": "fp32",
              "size_bytes": _folder_bytes(teacher)}]
    skipped: list[dict[str, Any]] = []
    for who, folder in students.items():
        pre, what = PREFIX[who]
        specs.append({"name": f"{pre}student-fp32", "label": f"{what} · PyTorch fp32", "group": "student",
                      "student": who, "kind": "hf", "path": str(folder), "runtime": "PyTorch eager",
                      "precision": "fp32", "size_bytes": _folder_bytes(folder)})
        rec = paths.get(who) or {}
        for name, label, step, precision, group, kind, runtime in (
            ("optimum-onnx-fp32", "Optimum ONNX fp32", "export", "fp32", "optimum", "onnx", "ONNX Runtime"),
            ("optimum-onnx-int8", "Optimum ONNX dynamic int8", "quantize", "int8", "optimum", "onnx", "ONNX Runtime"),
            ("openvino-nncf-int8", "OpenVINO + NNCF int8", "openvino", "int8", "openvino", "openvino", "OpenVINO"),
        ):
            r = rec.get(step) or {"status": "error", "error": "the step before it failed"}
            row = {"name": f"{pre}{name}", "label": f"{what} · {label}", "group": group, "student": who,
                   "kind": kind, "path": r.get("path"), "runtime": runtime, "precision": precision,
                   "size_bytes": r.get("size_bytes")}
            if name == "optimum-onnx-int8":  # ORTQuantizer's dynamic int8: one activation scale per call
                row["rows_alone"] = True
            if r.get("status") == "ok":
                specs.append(row)
            else:
                skipped.append({**row, "status": r.get("status") or "error", "error": r.get("error")})
        if torchao_compile:
            specs.append({"name": f"{pre}torchao-int8-compiled", "label": f"{what} · torchao int8 + torch.compile",
                          "group": "torchao", "student": who, "kind": "torchao", "compile": True, "path": str(folder),
                          "runtime": "PyTorch compiled (torchao)", "precision": "int8", "size_bytes": None,
                          "notes": ["quantized and compiled at load; compilation happens in the warm-up calls"]})
        else:
            specs.append({"name": f"{pre}torchao-int8", "label": f"{what} · torchao int8 eager", "group": "torchao",
                          "student": who, "kind": "torchao", "path": str(folder), "runtime": "PyTorch eager (torchao)",
                          "precision": "int8", "size_bytes": None,
                          "notes": ["eager (--torchao eager): torchao's docs say to compile for speed"]})
    if trimmed:
        for spec in [*specs, *skipped]:
            if spec["group"] == "teacher" or spec.get("student") == "student":
                spec["vocab"] = "original"
    for e in entries:
        target = e.get("target", e["name"])
        row = {"name": f"edgekd-{e['name']}", "label": f"edgekd · export/{e['name']}", "group": "edgekd",
               "kind": "artifact", "path": e["folder"], "file": e.get("file"),
               "runtime": RUNTIMES.get(str(target), str(target)), "precision": e.get("precision", "fp32"),
               "size_bytes": e.get("size_bytes"), "meta": _meta_facts(e.get("meta") or {}),
               "rows_alone": str(e.get("precision")) in ROW_DEPENDENT_PRECISIONS}
        if e.get("status") == "skipped":
            skipped.append({**row, "status": "skipped", "error": e.get("reason")})
            continue
        specs.append(row)
        if ((e.get("meta") or {}).get("runtime_options") or {}).get("disabled_optimizers"):
            # The same file opened with ONNX Runtime's default optimisers: what the folder's own
            # session choice adds (the ablation's session step).
            specs.append({**row, "name": f"{row['name']}{ORT_DEFAULTS}", "label": f"{row['label']} · ONNX Runtime defaults",
                          "runtime_options": {"disabled_optimizers": []},
                          "meta": {**row["meta"], "session_baseline_of": row["name"]}})
    return specs, skipped


def _meta_facts(meta: dict[str, Any]) -> dict[str, Any]:
    """What the ablation table reads from an export folder's artifact.json: the stage it came from
    and any step record the quantize/export stages leave there."""
    keep = ("source_stage", "precision", "target", "quantization", "method", "derived_from", "step", "fusions",
            "graph_optimization", "vocab", "vocabulary", "first_token_last_layer", "runtime_options", "session_tuning")
    return {k: meta[k] for k in keep if k in meta}
