"""An export made from the pruned student (artifact.json ``source_stage: prune``) is marked as such in the
bench table, the CSV and a comparison's header, so it is never read as a peer of the unpruned fp32 student
that "Δ vs student" is measured against; the same for text and detection runs."""

from __future__ import annotations

import csv
import io
import json
import shutil

from edgekd.devices import tables
from edgekd.devices.bench import bench_run
from edgekd.devices.tables import load_results
from edgekd.export.base import read_artifact_meta, write_artifact_meta
from edgekd.recipe import BenchConfig
from edgekd.tasks.text.task import classification_metrics

FP = "cd" * 32
PRUNED_MARK = "pruned student"  # the note column's mark (tables.PRUNED_MARK)


def _row(table: str, name: str) -> list[str]:
    return next(line.split(" | ") for line in table.splitlines() if line.startswith(f"| {name} |"))


def test_a_text_bench_marks_the_exports_of_the_pruned_student(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir / "export", run / "export")
    for name, stage in (("onnx", "distill"), ("onnx-int8", "prune")):
        folder = run / "export" / name
        write_artifact_meta(folder, {**read_artifact_meta(folder), "source_stage": stage})
    cfg = BenchConfig(warmup=1, runs=3, batch_sizes=[1], isolate=False, targets=["onnx", "onnx-int8"])
    bench_run(run, "local", cfg, tiny_run.eval_inputs, tiny_run.labels, classification_metrics,
              reference={"teacher": 0.9, "student": 0.8})
    data = load_results(run)
    stages = {e["name"]: e.get("source_stage") for e in data["results"]}
    assert stages == {"onnx": "distill", "onnx-int8": "prune"}  # kept from artifact.json into results.json
    table = (run / "bench" / "local" / "table.md").read_text()
    assert _row(table, "onnx-int8")[-1].startswith(PRUNED_MARK)
    assert PRUNED_MARK not in _row(table, "onnx")[-1]
    assert "Pruned: onnx-int8 export the pruned student" in table
    rows = {r["name"]: r["note"] for r in csv.DictReader(io.StringIO((run / "bench" / "local" / "results.csv")
                                                                     .read_text()))}
    assert rows["onnx-int8"].startswith(PRUNED_MARK) and PRUNED_MARK not in rows["onnx"]


def _detection_data(run: str, source_stage: str | None) -> dict:
    def entry(name, p50, precision):
        e = {"name": name, "kind": "artifact", "target": "onnx", "precision": precision, "status": "ok",
             "accuracy": 0.5, "delta_vs_student": -0.02, "size_bytes": 2**20,
             "cases": [{"batch": 1, "seq": None, "runs": 5, "p50_ms": p50, "p99_ms": p50, "mean_ms": p50,
                        "throughput": 1000 / p50, "inputs_sha256": FP}]}
        if source_stage:
            e["source_stage"] = source_stage
        if precision == "int8":
            e["note"] = "ONNX Runtime session without SkipLayerNormFusion (artifact.json runtime_options)"
        return e

    torch = {"name": "pytorch-student-pruned", "kind": "torch", "target": "pytorch", "precision": "fp32",
             "status": "ok", "accuracy": 0.5, "source_stage": "prune",  # a torch row says pruned by its name
             "cases": [{"batch": 1, "seq": None, "runs": 5, "p50_ms": 3.0, "inputs_sha256": FP}]}
    return {"run": run, "profile": {"name": "local", "processor": "auto"}, "config": {"runs": 5, "warmup": 1},
            "headline": {"batch": 1, "seq": None}, "metric": "map50_95", "input": "image 64x64",
            "inputs": {"description": "fixed-shape inputs", "source": "real", "timed_calls": 5, "warmup_calls": 1,
                       "threads": 1, "rounds": 1},
            "reference": {"teacher": 0.6, "student": 0.52, "source": "eval stage"},
            "results": [entry("onnx", 0.5, "fp32"), entry("onnx-int8-static", 0.6, "int8"), torch]}


def test_a_detection_table_marks_pruned_exports_and_leaves_an_unpruned_runs_alone(tmp_path):
    table = tables.markdown(_detection_data("det", "prune"))
    assert _row(table, "onnx")[-1] == f"{PRUNED_MARK} |"
    # the mark comes first, the row's own note after it
    assert _row(table, "onnx-int8-static")[-1].startswith(f"{PRUNED_MARK}; ONNX Runtime session without")
    assert not _row(table, "pytorch-student-pruned")[-1].startswith(PRUNED_MARK)
    assert ("Pruned: onnx, onnx-int8-static export the pruned student (note: pruned student); their Δ vs student "
            "is against the unpruned fp32 student's mAP@0.5:0.95 above") in table
    plain = tables.markdown(_detection_data("det", "distill"))
    assert PRUNED_MARK not in plain and "Pruned:" not in plain
    # results written before the bench kept source_stage say nothing either way
    assert PRUNED_MARK not in tables.markdown(_detection_data("det", None))
    # side by side, each side says which of its rows are pruned exports
    for run, stage in (("pruned", "prune"), ("unpruned", "distill")):
        out = tmp_path / run / "bench" / "local"
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(_detection_data(run, stage)))
    both = tables.report(tmp_path / "pruned", compare=[tmp_path / "unpruned"])
    pruned_side = next(line for line in both.splitlines() if line.startswith("- pruned/local"))
    unpruned_side = next(line for line in both.splitlines() if line.startswith("- unpruned/local"))
    assert pruned_side.endswith("; onnx, onnx-int8-static: exports of the pruned student.")
    assert "pruned student" not in unpruned_side
    # and in the cells: a row pruned on one side and not on the other says so, with what its ratio compares
    onnx = _row(both, "onnx")
    assert onnx[1:5] == ["0.500 (pruned student)", "0.5000", "0.500", "0.5000"], onnx
    assert ("Pruned on one side, not on another: onnx, onnx-int8-static. Their ratios compare an export of the pruned "
            "student with one of the unpruned student") in " ".join(both.split())
    alike = tables.report(tmp_path / "unpruned", compare=[tmp_path / "unpruned"])
    assert "pruned student" not in alike and "Pruned on one side" not in alike


def test_the_summarys_fastest_line_marks_a_pruned_export(tmp_path):
    """The run summary's bench line named the fastest model with no word that it is the pruned student's
    export, beside the unpruned student's accuracy above it."""
    from edgekd.devices.bench import summary
    from edgekd.report import _bench

    data = _detection_data("det", "prune")
    data["results"] = [r for r in data["results"] if r["kind"] == "artifact"]
    met = summary(data, tmp_path)
    assert met["models"]["onnx"]["pruned"] is True
    assert "fastest: onnx (pruned student), 0.500 ms p50" in _bench(met, "map50_95", "mAP")
    plain = summary(_detection_data("det", "distill"), tmp_path)
    assert "pruned student" not in _bench(plain, "map50_95", "mAP")
