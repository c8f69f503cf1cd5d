"""A finished stage is reused only while what it read is unchanged: every record keeps an id of its
own and the ids of the records it read, so running a stage again (``--force``, or the stage alone)
makes every stage downstream of it out of date, however equal the settings; and a stage refuses to
read an input that is out of date instead of building on it."""

from __future__ import annotations

import json

import pytest

from edgekd import pipeline
from edgekd.errors import StageError
from edgekd.pipeline import SHARED_STAGES, run_stages, stage_table
from edgekd.recipe import parse_recipe
from edgekd.runfolder import RunFolder
from edgekd.stages.base import Stage
from edgekd.testing import tiny_recipe


def test_a_record_is_current_only_while_the_records_it_read_are(tmp_path):
    run = RunFolder(tmp_path)
    run.record("teacher", "t1", {})
    run.will_read("distill", ["teacher", "never-run"])
    run.record("distill", "d1", {})
    run.will_read("export", ["distill"])
    run.record("export", "e1", {})
    rec = run.stage_record("distill")
    assert rec["inputs"] == {"teacher": run.stage_record("teacher")["id"], "never-run": None}  # not finished: None
    assert run.is_done("distill", "d1") and run.is_done("export", "e1")
    assert run.stale_reason("export", None) is None  # None: whole, whatever the settings

    run.record("teacher", "t1", {})  # the same settings, run again
    assert run.stale_reason("distill", "d1") == "the teacher stage it was made from was run again or removed since"
    # down the whole chain: export read distill, which read the old teacher
    assert run.stale_reason("export", "e1") == "the teacher stage it was made from was run again or removed since"
    assert run.stale_reason("export", None) == "the teacher stage it was made from was run again or removed since"
    run.will_read("export", ["distill"])
    run.record("export", "e1", {})  # remade from the distill record it reads: whole again, but not distill
    assert run.stale_reason("export", "e2") == "the recipe's settings for it changed"
    assert run.stale_reason("bench", "b1") == "it has not finished in this run folder"


def test_a_record_made_before_a_stage_it_reads_finished_is_out_of_date_once_that_stage_finishes(tmp_path):
    """`edgekd export`, `edgekd bench`, then `edgekd run`: quantize ran, and the bench, which had read no quantize
    record, was skipped as unchanged, so the shipped int8 file was never timed."""
    run = RunFolder(tmp_path)
    run.record("export", "e1", {})
    run.will_read("bench", ["export", "quantize"])
    run.record("bench", "b1", {})
    assert run.stale_reason("bench", "b1") is None  # quantize has not run: still whole
    run.record("quantize", "q1", {})
    why = "the quantize stage, which it reads, had not finished when it was made and has since"
    assert run.stale_reason("bench", "b1") == why and run.superseded("bench") == why


def test_records_written_before_ids_existed_stay_valid_until_their_inputs_run_again(tmp_path):
    run = RunFolder(tmp_path)
    old = {"status": "done", "fingerprint": "t1", "finished": "2026-12-01T00:00:00+00:00", "artifacts": {}}
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"teacher": old,
                                                                   "distill": {**old, "fingerprint": "d1"}}}))
    assert run.is_done("teacher", "t1") and run.is_done("distill", "d1")  # no ids, no inputs: as before
    run.will_read("prune", ["distill"])
    run.record("prune", "p1", {})
    assert run.stage_record("prune")["inputs"] == {"distill": "d1@2026-12-01T00:00:00+00:00"}
    assert run.is_done("prune", "p1")
    run.record("distill", "d1", {})
    assert not run.is_done("prune", "p1")


def test_the_stage_tables_declare_what_each_stage_reads():
    def reads(recipe, name):
        return stage_table(recipe.task)[name].inputs(recipe)

    for prune in (True, False):
        r = parse_recipe({"name": "x", "prune": {"enabled": prune, "keep_params": 0.5}, "quantize": {"enabled": True},
                          "export": {"targets": ["onnx"]}})
        source = "prune" if prune else "distill"
        assert reads(r, "export") == (source,)
        assert reads(r, "quantize") == ("export",)
        assert {"export", "quantize", source, "distill", "teacher"} <= set(reads(r, "bench"))
        assert reads(r, "distill") == ("teacher",) and reads(r, "baseline") == ("teacher",)
        assert set(reads(r, "eval")) == {"teacher", "distill", "baseline"}
        assert set(reads(r, "prune")) == {"teacher", "distill"}
    r = parse_recipe({"name": "x", "quantize": {"enabled": False}, "baseline": {"enabled": False}})
    assert "quantize" not in reads(r, "bench") and "baseline" not in reads(r, "eval")


@pytest.fixture
def toy_table(monkeypatch, tmp_path):
    """The real pipeline over three stand-in stages (export, quantize, bench) that write a file each
    and count their runs: quantize reads export, bench reads quantize (as declared in SHARED_STAGES)."""
    runs = {"export": 0, "quantize": 0, "bench": 0}

    def stage(name):
        def run(ctx):
            runs[name] += 1
            out = ctx.run.stage_dir(name) / "out.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f"{name} {runs[name]}")
            ctx.run.record(name, "fp", {}, [out])
            return {}
        return Stage(name, run, lambda c: "fp", inputs=SHARED_STAGES[name].inputs)

    table = {name: stage(name) for name in runs}
    monkeypatch.setattr(pipeline, "stage_table", lambda task: table)
    return runs


def test_running_export_again_makes_quantize_and_bench_run_again(tmp_path, tiny_teacher_dir, tiny_csv, toy_table):
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, quantize={"enabled": True},
                                      export={"targets": ["onnx"]}))
    run_stages(recipe, ["export", "quantize", "bench"])
    run_stages(recipe, ["export", "quantize", "bench"])
    assert toy_table == {"export": 1, "quantize": 1, "bench": 1}  # nothing changed: all skipped

    run_stages(recipe, ["export"], force=True)  # `edgekd export --force`: same settings, a new result
    with pytest.raises(StageError) as err:  # bench alone would read a quantized file of the old export
        run_stages(recipe, ["bench"])
    assert "reads the quantize stage's result, which is out of date" in str(err.value)
    assert "the export stage it was made from was run again" in str(err.value)
    assert "run `edgekd quantize` first" in str(err.value)
    assert toy_table == {"export": 2, "quantize": 1, "bench": 1}

    run_stages(recipe, ["export", "quantize", "bench"])  # `edgekd run`: what read the old export runs again
    assert toy_table == {"export": 2, "quantize": 2, "bench": 2}
    run_stages(recipe, ["export", "quantize", "bench"])
    assert toy_table == {"export": 2, "quantize": 2, "bench": 2}
