"""The summary at the end of a command and from `edgekd report`: every stage the run folder holds,
with its headline, built from the manifest alone."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from edgekd import report
from edgekd.cli import app
from edgekd.errors import StageError
from edgekd.runfolder import RunFolder

STAGES = ("teacher", "distill", "baseline", "eval", "prune", "export", "quantize", "bench")


def _summary_text(run: RunFolder, monkeypatch) -> str:
    out = io.StringIO()
    monkeypatch.setattr(report, "console", Console(file=out, width=160))
    report.print_summary(run)
    return out.getvalue()


@pytest.mark.slow
def test_the_end_of_a_run_names_every_stage_with_its_headline(full_run):
    _, run, output = full_run
    table = output[output.index("edgekd run 'tiny': stages"):output.index("test split")]
    rows = {line.split("│")[1].strip(): line for line in table.splitlines()
            if line.startswith("│") and line.split("│")[1].strip()}
    assert set(rows) == set(STAGES)
    assert all(rows[s].split("│")[2].strip() == "ran" for s in STAGES)  # the first command ran them all
    assert "heads-ffn: params" in table and "removed" in table and "attention heads" in table
    assert "onnx: fp32 parity ok" in table and "source: the pruned student" in table
    assert "accuracy guard" in table and "kept in float:" in table and "recommended:" in table
    assert "fastest: onnx" in table
    assert f"serve it: edgekd serve {run} --target onnx" in output.replace("\n", " ") or \
        f"serve it: edgekd serve {run} --target onnx-int8" in output.replace("\n", " ")


@pytest.mark.slow
def test_report_prints_the_same_summary_and_a_rerun_says_unchanged(full_run):
    copy, run, output = full_run
    summary = output[output.index("edgekd run 'tiny': stages"):]
    res = CliRunner().invoke(app, ["report", str(run)])  # the folder the output names (report writes nothing)
    assert res.exit_code == 0, res.output
    assert res.output.startswith(summary)
    assert "Bench: tiny on local" in res.output  # the bench table, rendered on the same stream
    again = CliRunner().invoke(app, ["run", str(copy)])
    assert again.exit_code == 0, again.output
    stages = again.output[again.output.index("edgekd run 'tiny': stages"):again.output.index("test split")]
    rows = [line.split("│") for line in stages.splitlines() if line.startswith("│ ")]
    assert {r[1].strip(): r[2].strip() for r in rows if r[1].strip() in STAGES} == dict.fromkeys(STAGES, "unchanged")


def test_guard_decisions_and_a_rejected_candidate_are_in_the_summary(tmp_path, monkeypatch):
    """The guard kept two MatMuls in float and rejected the static candidate: the summary says so."""
    run = RunFolder(tmp_path / "r")
    for name in ("onnx", "onnx-int8"):
        (run.root / "export" / name).mkdir(parents=True)
        (run.root / "export" / name / "artifact.json").write_text("{}")
    run.record("export", "fp", {"source_stage": "distill", "targets": {
        "onnx": {"status": "ok", "precision": "fp32", "parity": {"ran": True, "passed": True, "top1_agreement": 1.0,
                                                                  "max_abs_diff": 2e-6}},
        "coreml": {"status": "unavailable", "reason": "coremltools is not installed\nmore"}}}, seconds=3.0)
    guard = {"metric": "accuracy", "budget": 0.01, "passed": True, "drop": 0.004,
             "attempts": [{"float_nodes": []}, {"float_nodes": ["mm_a"]}, {"float_nodes": ["mm_a", "mm_b"]}],
             "float_nodes": [{"node": "/layer.0/MatMul", "op_type": "MatMul"},
                             {"node": "/layer.1/MatMul", "op_type": "MatMul"}]}
    run.record("quantize", "fp", {
        "method": "dynamic", "candidate": "dynamic", "precision": "int8-dynamic", "accuracy_guard": guard,
        "speed_guard": {"batch": 1, "speedup": 1.8},
        "candidates": [{"name": "dynamic", "chosen": True, "why": "chosen: fastest within the budget"},
                       {"name": "static/per-channel", "chosen": False,
                        "why": "rejected: accuracy drop 0.031 above the budget 0.01"}],
        "test": {"float": {"accuracy": 0.9}, "quantized": {"accuracy": 0.895}},
        "recommended": "quantized", "recommended_dir": str(run.root / "export" / "onnx-int8"), "reasons": []},
        seconds=12.0)
    text = _summary_text(run, monkeypatch)
    assert "accuracy guard passed after 3 attempts, accuracy drop 0.40 pts (budget 1.00)" in text
    assert "kept in float: /layer.0/MatMul (MatMul), /layer.1/MatMul (MatMul)" in text
    assert "rejected static/per-channel: rejected: accuracy drop 0.031 above the budget 0.01" in text
    assert "coreml: unavailable: coremltools is not installed" in text and "more" not in text
    assert "recommended: quantized (onnx-int8)" in text
    assert f"serve it: edgekd serve {run.root} --target onnx-int8" in text
    assert "no evaluation yet" in text
    assert "which ships" not in text  # no bench yet


def test_the_summary_says_when_the_bench_timed_another_export_faster_than_what_ships(tmp_path, monkeypatch):
    """The quantize stage ships by its own timing; a bench that timed the float file faster says both figures
    and whose choice the shipped one is, instead of a "fastest" line and a "ship" line that disagree unexplained."""
    run = RunFolder(tmp_path / "r")
    for name in ("onnx", "onnx-int8"):
        (run.root / "export" / name).mkdir(parents=True)
        (run.root / "export" / name / "artifact.json").write_text("{}")
    run.record("export", "fp", {"source_stage": "distill", "targets": {"onnx": {"status": "ok", "precision": "fp32"}}})
    run.record("quantize", "fp", {
        "method": "static", "precision": "int8-static", "recommended": "quantized",
        "recommended_dir": str(run.root / "export" / "onnx-int8"), "reasons": [],
        "speed_guard": {"batch": 1, "speedup": 1.17, "inputs": "50 validation examples, one at a time"}}, seconds=1.0)

    def bench(int8_ms):
        run.record("bench", "fp", {"profile": "local", "headline": {"batch": 1}, "models": {
            "onnx": {"status": "ok", "p50_ms": 1.006, "accuracy": 0.51},
            "onnx-int8": {"status": "ok", "p50_ms": int8_ms, "accuracy": 0.509},
            "pytorch-teacher": {"status": "ok", "p50_ms": 15.6, "accuracy": 0.68}}}, seconds=1.0)
        return " ".join(_summary_text(run, monkeypatch).split())

    text = bench(1.164)
    assert "fastest: onnx, 1.006 ms p50" in text
    assert ("note: the bench timed onnx-int8, which ships, at 1.164 ms p50 and onnx at 1.006 ms (batch 1); what ships "
            "is the quantize stage's choice, by its accuracy and speed guards on its own timing (×1.17 at batch 1, 50 "
            "validation examples, one at a time)") in text
    assert "which ships" not in bench(0.98)  # what ships is the fastest: nothing to explain


def test_a_folder_without_stages_says_what_to_run(tmp_path, monkeypatch):
    assert "no stage has finished yet (run `edgekd run`)" in _summary_text(RunFolder(tmp_path), monkeypatch)


def test_a_copied_run_folder_names_its_own_bench_table(tmp_path, monkeypatch):
    """The bench records the absolute folder it wrote; a copy (cp -a runs/a runs/b) names its own table."""
    run = RunFolder(tmp_path / "copy")
    run.root.mkdir()
    run.record("bench", "fp", {"profile": "local", "dir": str(tmp_path / "original" / "bench" / "local")})
    text = _summary_text(run, monkeypatch)
    assert f"bench table: {run.root / 'bench' / 'local' / 'table.md'}" in text
    assert "original" not in text


def test_the_prune_line_names_the_prunable_part_by_method():
    heads = report._prune({"method": "heads-ffn", "params_before": 100_000, "params_after": 60_000,
                           "prunable_params_before": 50_000, "prunable_params_after": 10_000}, "prune", "prune")
    assert "prunable part (encoder layers)" in heads
    # Channel pruning's prunable part is the whole detector: no second, mislabelled figure.
    channels = report._prune({"method": "channels", "params_before": 730_000, "params_after": 6_500,
                              "prunable_params_before": 730_000, "prunable_params_after": 6_500}, "prune", "prune")
    assert "prunable part" not in channels and "encoder" not in channels


@pytest.mark.slow  # one export and one bench of the shared tiny run (about 20 s)
def test_a_quantized_folder_made_from_an_export_redone_since_is_neither_benched_nor_shipped(full_run):
    """With the quantize stage turned off and the ONNX file exported again (fused), export/onnx-int8* still holds
    files quantized from the old one: the bench says so instead of timing them as current, the summary ships none of
    them, and `edgekd serve` without --target refuses the stale recommendation."""
    import json

    from edgekd.serving.model import choose_export

    run = full_run[0]
    quantized = sorted(p.name for p in (run / "export").iterdir() if p.name.startswith("onnx-"))
    assert quantized  # the shared run quantized its export
    # (an export whose file comes out the same, at other parity settings, would leave them current)
    res = CliRunner().invoke(app, ["run", str(run), "--set", "quantize.enabled=false",
                                   "--set", "export.options={onnx: {optimize: true}}"])
    assert res.exit_code == 0, res.output
    stages = res.output[res.output.index("edgekd run 'tiny': stages"):res.output.index("test split")]
    rows = {r[1].strip(): r[2].strip() for r in (line.split("│") for line in stages.splitlines())
            if len(r) > 2 and r[1].strip()}
    assert rows["export"] == "ran" and rows["bench"] == "ran" and rows["quantize"] == "earlier, out of date"  # made from the export redone here
    results = json.loads((run / "bench" / "local" / "results.json").read_text())["results"]
    by_name = {e["name"]: e for e in results}
    for name in quantized:
        assert by_name[name]["status"] == "skipped", by_name[name]
        assert by_name[name]["reason"] == ("made from the onnx export, which was exported again since: run "
                                           "`edgekd quantize` again"), by_name[name]
    assert by_name["onnx"]["status"] == "ok"
    # What ships: not the guard's recommendation, which was chosen among files this export replaced: a
    # quantized one made from the old file, or the float file itself (the guard may keep it for a model this
    # small), whose sha256 the stage recorded. The next tests pin each refusal on a folder they build.
    recommended = Path(json.loads((run / "manifest.json").read_text())["stages"]["quantize"]["metrics"]
                       ["recommended_dir"]).name
    ship = " ".join(res.output.split()).split("ship: ")[1]
    assert ship.startswith(f"the quantize stage's recommendation ({recommended}) is out of date")
    stale = "made from" if recommended in quantized else "the onnx export was exported again after"
    with pytest.raises(StageError, match=rf"the quantize stage's recommendation \(.*\) is out of date: {stale}"):
        choose_export(run)
    assert choose_export(run, "onnx")[0] == run / "export" / "onnx"  # an export named by the caller still serves


def test_the_quantized_folders_of_a_quantize_stage_turned_off_are_not_benched_as_current(full_run):
    """quantize.enabled: false with the export as it was: export/onnx-int8* hold an earlier quantize run's models,
    which the bench timed and scored as current rows; it now lists them as skipped and says why."""
    import json

    run = full_run[0]
    quantized = sorted(p.name for p in (run / "export").iterdir() if p.name.startswith("onnx-"))
    assert quantized
    res = CliRunner().invoke(app, ["bench", str(run), "--set", "quantize.enabled=false"])
    assert res.exit_code == 0, res.output
    by_name = {e["name"]: e for e in json.loads((run / "bench" / "local" / "results.json").read_text())["results"]}
    for name in quantized:
        assert by_name[name]["status"] == "skipped", by_name[name]
        assert "quantize stage this recipe turns off" in by_name[name]["reason"], by_name[name]
    assert by_name["onnx"]["status"] == "ok"


def test_a_quantized_folder_is_judged_by_the_file_it_was_made_from(tmp_path):
    """Only the source folder's file counts: an export of another target since (a one-off `edgekd export RUN
    --to executorch`) leaves the quantized folder current; a new file in its source, or none, does not."""
    import json

    from edgekd.export.base import made_from_an_earlier_export

    export = tmp_path / "moved" / "export"
    for name, meta in (("onnx", {"sha256": "aaa"}), ("executorch", {"sha256": "ccc"}),
                       ("onnx-int8", {"sha256": "bbb", "source": {"folder": "/old/place/export/onnx", "sha256": "aaa"}})):
        (export / name).mkdir(parents=True)
        (export / name / "artifact.json").write_text(json.dumps(meta))
    assert made_from_an_earlier_export(export / "onnx-int8") is None  # found by name, where the run is now
    assert made_from_an_earlier_export(export / "onnx") is None  # an export of its own
    (export / "executorch" / "artifact.json").write_text(json.dumps({"sha256": "ddd"}))
    assert made_from_an_earlier_export(export / "onnx-int8") is None
    (export / "onnx" / "artifact.json").write_text(json.dumps({"sha256": "eee"}))
    assert made_from_an_earlier_export(export / "onnx-int8") == (
        "made from the onnx export, which was exported again since: run `edgekd quantize` again")
    (export / "onnx" / "artifact.json").write_text("{not json")
    assert made_from_an_earlier_export(export / "onnx-int8").startswith("made from the onnx export, which has an "
                                                                        "unreadable artifact.json")
    (export / "onnx-int8" / "artifact.json").write_text("[1, 2]")  # its own unreadable meta: its loader says so
    assert made_from_an_earlier_export(export / "onnx-int8") is None
    (export / "onnx-int8" / "artifact.json").write_text(json.dumps(
        {"sha256": "bbb", "source": {"folder": "/old/place/export/onnx", "sha256": "aaa"}}))
    (export / "onnx" / "artifact.json").unlink()
    assert made_from_an_earlier_export(export / "onnx-int8") == (
        "made from the onnx export, which is gone: run `edgekd quantize` again")


def _run_with_int8(tmp_path, onnx_sha256: str, int8_made_from: str) -> Path:
    """runs/tiny with export/onnx (its artifact.json's sha256) and export/onnx-int8 quantized from the onnx file
    whose sha256 was ``int8_made_from``: only the artifact.json files the staleness rules read."""
    import json

    run = tmp_path / "runs" / "tiny"
    for name, meta in (("onnx", {"sha256": onnx_sha256}),
                       ("onnx-int8", {"sha256": "bbb",
                                      "source": {"folder": "/elsewhere/export/onnx", "sha256": int8_made_from}})):
        (run / "export" / name).mkdir(parents=True)
        (run / "export" / name / "artifact.json").write_text(json.dumps(meta))
    return run


def test_a_recommendation_made_from_an_earlier_export_is_neither_shipped_nor_served(tmp_path, caplog):
    import json
    import logging

    from edgekd.report import shipped_artifact
    from edgekd.serving.model import choose_export

    run = _run_with_int8(tmp_path, onnx_sha256="new", int8_made_from="old")
    quantize = {"status": "done", "metrics": {"recommended": "quantized",
                                              "recommended_dir": "/elsewhere/export/onnx-int8"}}
    (run / "manifest.json").write_text(json.dumps({"stages": {"quantize": quantize}}))
    why = "made from the onnx export, which was exported again since: run `edgekd quantize` again"
    assert shipped_artifact(RunFolder(run)) == (
        None, f"the quantize stage's recommendation (onnx-int8) is out of date: {why}, or choose an export")
    with pytest.raises(StageError) as e:
        choose_export(run)
    assert str(e.value) == (f"{run}: the quantize stage's recommendation (onnx-int8) is out of date: {why}, or choose "
                            "one with --target.")
    with caplog.at_level(logging.WARNING, logger="edgekd.serving"):  # named by the caller: served, and said
        assert choose_export(run, "onnx-int8")[0] == run / "export" / "onnx-int8"
        assert choose_export(run / "export" / "onnx-int8")[0] == run / "export" / "onnx-int8"
        assert choose_export(run, "onnx")[0] == run / "export" / "onnx"
    assert [r.getMessage() for r in caplog.records] == [
        f"serving {run / 'export' / 'onnx-int8'} as asked, though it is out of date: {why}"] * 2
    (run / "export" / "onnx-int8" / "artifact.json").write_text(json.dumps(
        {"sha256": "bbb", "source": {"folder": "/elsewhere/export/onnx", "sha256": "new"}}))
    assert shipped_artifact(RunFolder(run))[0] == "onnx-int8"
    assert choose_export(run) == (run / "export" / "onnx-int8", "onnx-int8, the quantize stage's recommendation (quantized)")


def test_a_float_recommendation_exported_again_since_is_neither_shipped_nor_served(tmp_path):
    """The quantize stage chose the float folder by the file it measured (its record's float sha256): a file
    exported since is not what it chose, so the summary and `edgekd serve` without a target refuse it too."""
    import json

    from edgekd.report import shipped_artifact
    from edgekd.serving.model import choose_export

    run = _run_with_int8(tmp_path, onnx_sha256="new", int8_made_from="new")

    def record(measured):
        quantize = {"status": "done", "metrics": {"recommended": "float", "recommended_dir": "/elsewhere/export/onnx",
                                                  "float": {"sha256": measured}}}
        (run / "manifest.json").write_text(json.dumps({"stages": {"quantize": quantize}}))

    record("old")
    why = "the onnx export was exported again after the quantize stage measured and chose it: run `edgekd quantize` again"
    assert shipped_artifact(RunFolder(run)) == (
        None, f"the quantize stage's recommendation (onnx) is out of date: {why}, or choose an export")
    with pytest.raises(StageError, match=re.escape(f"recommendation (onnx) is out of date: {why}")):
        choose_export(run)
    assert choose_export(run, "onnx")[0] == run / "export" / "onnx"  # named by the caller: served
    record("new")
    assert shipped_artifact(RunFolder(run))[0] == "onnx"
    assert choose_export(run) == (run / "export" / "onnx", "onnx, the quantize stage's recommendation (float)")


def test_the_distillation_gain_says_when_the_distilled_student_trained_on_more_texts():
    """The default recipe's teacher labels a perturbed copy of each training text, which distillation trains
    on and the baseline does not: the gain line must not call that the same data."""
    from edgekd.report import training_data
    from edgekd.tasks.text.summary import summary_lines

    more = {"distill_gain_over_baseline": 0.012, "distill_train_examples": 20166, "baseline_train_examples": 10083,
            "student_keeps_teacher_accuracy": 0.99, "student_params_ratio": 0.7}
    line = summary_lines(more)[-1]
    assert "+1.20" in line and "distillation trained on 20,166 texts, the 10,083 labelled ones" in line
    assert "so the gain is not distillation's alone" in line and "same data" not in line
    assert training_data({**more, "distill_train_examples": 10083}) == "same student, same 10,083 training texts"
    assert training_data({"distill_gain_over_baseline": 0.01}) == "same student"  # a record from before


def test_a_recommendation_of_a_quantize_stage_the_recipe_turns_off_is_not_shipped(tmp_path):
    """Turned off (quantize.enabled: false), the stage's earlier choice is no longer read: the summary and
    `edgekd serve` without a target do not ship its folder, which stays on disk as an earlier result."""
    import json

    from edgekd.report import shipped_artifact
    from edgekd.serving.model import choose_export

    run = _run_with_int8(tmp_path, onnx_sha256="aaa", int8_made_from="aaa")
    quantize = {"status": "done", "metrics": {"recommended": "quantized",
                                              "recommended_dir": "/elsewhere/export/onnx-int8"}}
    export = {"status": "done", "metrics": {"targets": {"onnx": {"status": "ok"}}}}
    (run / "manifest.json").write_text(json.dumps({"stages": {"quantize": quantize, "export": export}}))
    (run / "recipe.yaml").write_text("name: tiny\nquantize:\n  enabled: true\n")
    assert shipped_artifact(RunFolder(run))[0] == "onnx-int8" and choose_export(run)[0] == run / "export" / "onnx-int8"
    (run / "recipe.yaml").write_text("name: tiny\nquantize:\n  enabled: false\n")
    # Turned off, its folder is an earlier result: the summary and `edgekd serve` both ship the one current export.
    ships = ("onnx", "the run's only export (onnx-int8: made by a quantize stage this recipe turns off, kept as an "
             "earlier result)")
    assert shipped_artifact(RunFolder(run)) == ships
    assert choose_export(run) == (run / "export" / "onnx", f"onnx, {ships[1]}")
    assert choose_export(run, "onnx-int8")[0] == run / "export" / "onnx-int8"  # named: served as asked


def test_a_record_made_from_a_stage_run_again_since_is_marked_out_of_date(monkeypatch):
    """`edgekd distill --force` (or a one-off --set on the run folder) leaves eval's record made from the
    old student: the summary marks it and says the accuracy table is not the current models'."""
    import tempfile

    run = RunFolder(Path(tempfile.mkdtemp()) / "r")
    run.root.mkdir(parents=True)

    def m(acc, params):
        return {"accuracy": acc, "macro_f1": acc, "agreement_with_teacher": 1.0, "params": params,
                "size_bytes": params * 4, "layers": 3}

    run.record("teacher", "t", {"finetuned": True, "train_seconds": 100.0, "params": 22_000_000})
    run.will_read("distill", ["teacher"])
    run.record("distill", "d1", {"train_seconds": 50.0, "params": 11_000_000, "validation": {"accuracy": 0.80}})
    run.will_read("eval", ["teacher", "distill"])
    run.record("eval", "e", {"teacher": m(0.85, 22_000_000), "student": m(0.80, 11_000_000),
                             "summary": {"test_examples": 100, "student_keeps_teacher_accuracy": 0.94,
                                         "student_params_ratio": 0.5}})
    run.update_top(task="text-classification", primary_metric="accuracy")
    assert run.superseded("eval") is None and "out of date" not in _summary_text(run, monkeypatch)
    run.will_read("distill", ["teacher"])
    run.record("distill", "d2", {"train_seconds": 999.0, "params": 11_000_000, "validation": {"accuracy": 0.60}})
    assert run.superseded("eval") == "the distill stage it was made from was run again or removed since"
    text = " ".join(_summary_text(run, monkeypatch).split())
    assert "earlier, out of date" in text and "out of date: the table above is the eval stage's record" in text



def _ships_and_serves(run: Path) -> tuple[str | None, str | None]:
    """(what the summary ships, what `edgekd serve RUN` serves without --target), None for none."""
    from edgekd.report import shipped_artifact
    from edgekd.serving.model import choose_export

    ships = shipped_artifact(RunFolder(run))[0]
    try:
        serves = choose_export(run)[0].name
    except StageError:
        serves = None
    return ships, serves


def test_the_summary_and_serve_choose_the_same_export_in_every_case(tmp_path):
    """They followed two rules (the summary the export record, serve the folders on disk) and named different
    exports: a lone quantized folder made from an export redone since was served as "the run's only export"
    while the summary shipped nothing; a recommended folder gone from disk was still the summary's ship while
    serve served the other folder. One rule now (``edgekd.shipping``), and both refuse those two cases."""
    import json
    import shutil

    run = _run_with_int8(tmp_path, onnx_sha256="new", int8_made_from="old")
    (run / "manifest.json").write_text(json.dumps({"stages": {}}))
    shutil.rmtree(run / "export" / "onnx")  # only the int8 folder, made from an onnx file since replaced
    assert _ships_and_serves(run) == (None, None)

    run = _run_with_int8(tmp_path / "b", onnx_sha256="aaa", int8_made_from="aaa")
    quantize = {"status": "done", "metrics": {"recommended": "quantized",
                                              "recommended_dir": "/elsewhere/export/onnx-int8"}}
    (run / "manifest.json").write_text(json.dumps({"stages": {"quantize": quantize}}))
    assert _ships_and_serves(run) == ("onnx-int8", "onnx-int8")
    shutil.rmtree(run / "export" / "onnx-int8")  # the recommendation is gone: nothing else is shipped in its place
    assert _ships_and_serves(run) == (None, None)
    from edgekd.report import shipped_artifact

    assert shipped_artifact(RunFolder(run))[1].startswith("the quantize stage's recommendation (onnx-int8) is not in ")

    run = tmp_path / "c" / "runs" / "tiny"
    run.mkdir(parents=True)
    export = {"status": "done", "metrics": {"targets": {"onnx": {"status": "ok"}}}}
    (run / "manifest.json").write_text(json.dumps({"stages": {"export": export}}))
    assert shipped_artifact(RunFolder(run)) == (
        None, f"the export stage recorded onnx, but {run / 'export'} holds no export folder: run `edgekd export` again")
