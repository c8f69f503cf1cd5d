"""Stage fingerprints are what decide whether a run folder's finished stages are still valid: the
values below were recorded once; a change to any of them makes every existing run redo that stage
(and the ones after it). Moving code around must leave them, and the stage names, exactly as they are.
A change meant to redo a stage updates its value here and says why (2026-12-03: bench, timed in rounds
since `bench.rounds`; 2026-12-04: text export and what follows it, since the exported graph computes the
last block for the first position only, `export.first_token_last_layer`; detection's is unchanged;
2026-12-07: detection baseline, and eval and bench, which hold its fingerprint, since a detection baseline
is fingerprinted by the data instead of the teacher it never reads; 2026-12-07: quantize and bench of both
recipes, whose quantize sections calibrate (static), since the calibration examples are a seeded sample of
their split, stratified by label for text, not its first rows in file order).

The recipes and data are written by the test with relative paths (the working folder is the test's
own), so the figures do not depend on where the test runs.
"""

from __future__ import annotations

import pytest

from edgekd.pipeline import create_context, fingerprint_of, planned_stages, stage_table
from edgekd.recipe import load_recipe, parse_recipe
from edgekd.testing import tiny_recipe, write_sentiment_csv

STAGE_NAMES = ["teacher", "distill", "baseline", "eval", "prune", "export", "quantize", "bench"]

TEXT = {"teacher": "f8b26d0aa99d653e", "distill": "b2c8a22cb5e2359a", "baseline": "0fff180bab4396e2",
        "eval": "5463fe2d6fddd735", "prune": "711de1ae982f4e95", "export": "751676cc7dd9a948",
        "quantize": "d4568f5ccff32551", "bench": "43390a740cbc5995"}

DETECTION = {"teacher": "39e0afe8e94ae6d6", "distill": "28c0af041e4a4070", "baseline": "f7ffa7caafe338ec",
             "eval": "9d5a7e344070d5ef", "prune": "b37cf286b2766f53", "export": "89fd49bb7054d734",
             "quantize": "c74734e4a4b7e49e", "bench": "c9bbb26b02b7700c"}


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEKD_CACHE", "cache")  # relative: the synthetic set's path is in the data summary
    # The values are for a CPU with VNNI (conftest's), whose int8 weights stay signed (quantize.unsigned_weights).
    return tmp_path


def _text_recipe():
    write_sentiment_csv("reviews.csv", n=60, seed=1)
    data = tiny_recipe(".", "teacher-model", "reviews.csv", prune={"enabled": True, "keep_params": 0.7},
                       quantize={"enabled": True, "method": "static"},
                       export={"targets": ["onnx", "torchscript-lite"]}, bench={"enabled": True})
    data["output_dir"] = "runs"
    return parse_recipe(data)


def _detection_recipe():
    data = load_recipe("detect-default").model_dump(mode="json")
    data.update(name="tiny-det", output_dir="runs")
    data["detection"].update(image_size=32, synthetic={"train": 6, "validation": 3, "test": 3, "max_objects": 2,
                                                       "seed": 1})
    data["prune"].update(enabled=True, keep_params=0.7)
    data["quantize"].update(enabled=True)
    data["export"].update(targets=["onnx"])
    data["bench"].update(enabled=True)
    return parse_recipe(data)


@pytest.mark.parametrize("make,want", [(_text_recipe, TEXT), (_detection_recipe, DETECTION)],
                         ids=["text-classification", "detection"])
def test_stage_fingerprints_are_the_recorded_ones(here, make, want):
    recipe = make()
    ctx = create_context(recipe)
    if recipe.task == "text-classification":
        # The data summary names the CSV by its absolute path: pin it to the relative one.
        ctx.__dict__["data_summary"] = {**ctx.data_summary, "source": "file:reviews.csv"}
    assert list(stage_table(recipe.task)) == STAGE_NAMES  # the names manifest.json records
    assert planned_stages(recipe) == STAGE_NAMES
    got = {name: fingerprint_of(ctx, name) for name in STAGE_NAMES}
    assert got == want


@pytest.mark.parametrize("make,want", [(_text_recipe, TEXT), (_detection_recipe, DETECTION)],
                         ids=["text-classification", "detection"])
def test_a_device_without_vnni_redoes_the_quantize_stage_only(here, make, want, monkeypatch):
    """On an x86 CPU without VNNI each quantize setup is also built with its int8 weights stored unsigned
    (``quantize.unsigned_weights: auto``): the quantize stage's fingerprint changes there, so a run made
    elsewhere quantizes again for it; the stages before it keep theirs."""
    from edgekd.quantization import weight_encoding

    monkeypatch.setattr(weight_encoding, "this_machine", lambda: ("x86_64", ["avx2", "fma"]))
    recipe = make()
    ctx = create_context(recipe)
    if recipe.task == "text-classification":
        ctx.__dict__["data_summary"] = {**ctx.data_summary, "source": "file:reviews.csv"}
    got = {name: fingerprint_of(ctx, name) for name in STAGE_NAMES}
    before = STAGE_NAMES[:STAGE_NAMES.index("quantize")]
    assert {n: got[n] for n in before} == {n: want[n] for n in before}
    assert got["quantize"] != want["quantize"]


def test_a_local_model_folder_changed_in_place_redoes_the_stages_that_read_it(here):
    """teacher.model, a kind-model ensemble member and student.model given as local folders are
    fingerprinted by their files, not only their names: a folder retrained or replaced in place redoes the
    stages that read it. Saving the same files again (new modification times) changes nothing."""
    import shutil

    from edgekd.testing import tiny_bert

    write_sentiment_csv("reviews.csv", n=60, seed=1)
    tiny_bert("teacher-model", num_labels=2, seed=0)
    tiny_bert("member-model", num_labels=2, seed=1)
    tiny_bert("student-model", num_labels=2, num_layers=1, seed=2)

    def fingerprints(**sections):
        data = tiny_recipe(".", "teacher-model", "reviews.csv", **sections)
        ctx = create_context(parse_recipe(data))
        return {name: fingerprint_of(ctx, name) for name in ("teacher", "distill", "baseline", "eval")}

    with_student = {"student": {"model": "student-model"}}
    with_member = {"teacher": {"model": "teacher-model",
                               "ensemble": [{"kind": "model", "model": "member-model"}]}}
    base = fingerprints()

    shutil.rmtree("teacher-model")
    tiny_bert("teacher-model", num_labels=2, seed=0)  # the same files again
    assert fingerprints() == base
    tiny_bert("teacher-model", num_labels=2, seed=5)  # retrained in place: same names, other weights
    retrained = fingerprints()
    assert all(retrained[n] != base[n] for n in base), (retrained, base)

    # each taken just before its folder changes, with the teacher as it then is
    before = fingerprints(**with_student)
    tiny_bert("student-model", num_labels=2, num_layers=1, seed=6)
    now = fingerprints(**with_student)
    assert now["teacher"] == before["teacher"]
    assert now["distill"] != before["distill"] and now["baseline"] != before["baseline"]

    before = fingerprints(**with_member)
    tiny_bert("member-model", num_labels=2, seed=7)
    assert fingerprints(**with_member)["teacher"] != before["teacher"]
