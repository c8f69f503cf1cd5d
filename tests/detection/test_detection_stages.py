"""The detection stages' own contracts: where distillation runs its teacher, and what the baseline is
made from (and so when it must train again)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from edgekd.pipeline import create_context, fingerprint_of, run_stages, stage_table
from edgekd.recipe import load_recipe, parse_recipe
from edgekd.tasks.detection import stages
from edgekd.tasks.detection.models import build_detector, save_detector
from edgekd.testing import tiny_detector_config

SHAPES = 4  # the classes of the synthetic set (circle, square, triangle, cross)


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(tiny_detector_config(), SHAPES, 32)


def test_distillation_moves_the_teacher_and_the_kd_projectors_to_the_accelerators_device(monkeypatch):
    """The teacher is loaded on the CPU and the projectors are built there; the accelerator moves only the
    student (and the optimizer over it), so on a GPU the teacher's forward and the projectors met a student
    on another device. ``meta`` stands in for the device the accelerator reports (no weights are copied)."""
    device = torch.device("meta")
    monkeypatch.setattr(stages, "init_process_state", lambda: SimpleNamespace(device=device))
    seen = {}

    def train(model, data, cfg, loss_fn, *, extra_params=None, **kwargs):
        seen.update(model=model, extra=extra_params)
        return "trained"

    monkeypatch.setattr(stages, "train", train)
    recipe = load_recipe("detect-default")
    ctx = SimpleNamespace(recipe=recipe, split=lambda name: name)
    student, teacher = _tiny(0), _tiny(1)
    assert stages.train_student(ctx, student, teacher, recipe.distill.train, None, "distill", 0) == "trained"
    assert {t.device for t in (*teacher.parameters(), *teacher.buffers())} == {device}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # the projectors (detection.feature_weight 1 in detect-default), as the optimizer is given them
    assert seen["extra"] and {p.device for p in seen["extra"]} == {device}
    # the student is the accelerator's to move (accelerator.prepare), with the optimizer built over it
    assert seen["model"] is student and {p.device.type for p in student.parameters()} == {"cpu"}

    seen.clear()  # the baseline: no teacher, nothing else to move
    stages.train_student(ctx, student, None, recipe.distill.train, None, "baseline", 0)
    assert seen["extra"] is None and {p.device.type for p in student.parameters()} == {"cpu"}


def _recipe(tmp_path, teacher: str, student: str, **changes):
    data = load_recipe("detect-default").model_dump(mode="json")
    data.update(name="tiny-det", output_dir=str(tmp_path / "runs"))
    data["detection"].update(image_size=32, synthetic={"train": 4, "validation": 2, "test": 2, "max_objects": 2,
                                                       "seed": 1})
    data["teacher"] = {"model": teacher}  # a saved detector: the teacher stage trains nothing
    data["student"] = {"model": student}
    data["distill"]["train"].update(epochs=1, batch_size=4)
    data["runtime"]["precision"] = "fp32"
    data["eval"]["batch_size"] = 4
    for section, values in changes.items():
        data[section] = {**data[section], **values}
    return parse_recipe(data)


def test_the_baseline_trains_again_when_its_data_or_student_change_not_when_the_teacher_does(tmp_path):
    """A detection baseline starts from a fresh student and never reads the teacher: a new teacher redoes
    the teacher and the distilled student, and leaves the baseline as it was (the text family's baseline
    starts from the teacher's layers, so there the teacher is its input)."""
    for name, seed in (("t1", 1), ("t2", 2), ("s", 3)):
        save_detector(_tiny(seed), tmp_path / name)
    teacher, other, student = (str(tmp_path / n) for n in ("t1", "t2", "s"))

    def fingerprints(recipe):
        ctx = create_context(recipe)
        return {name: fingerprint_of(ctx, name) for name in ("teacher", "distill", "baseline")}

    first = _recipe(tmp_path, teacher, student)
    assert stage_table("detection")["baseline"].inputs(first) == ()
    assert stage_table("detection")["distill"].inputs(first) == ("teacher",)
    base = fingerprints(first)
    new_teacher = fingerprints(_recipe(tmp_path, other, student))
    assert new_teacher["teacher"] != base["teacher"] and new_teacher["distill"] != base["distill"]
    assert new_teacher["baseline"] == base["baseline"]
    # what it does read: the data, the student and its training
    for changes in ({"detection": {"image_size": 64}}, {"distill": {"train": {"epochs": 2, "batch_size": 4}}}):
        assert fingerprints(_recipe(tmp_path, teacher, student, **changes))["baseline"] != base["baseline"], changes
    assert fingerprints(_recipe(tmp_path, teacher, teacher))["baseline"] != base["baseline"]


def test_a_saved_detector_replaced_in_place_redoes_the_stages_that_read_it(tmp_path):
    """teacher.model and student.model as saved detector folders are fingerprinted by their files: one
    retrained in place (same path) redoes what reads it; a preset name stays a name."""
    for name, seed in (("t", 1), ("s", 3)):
        save_detector(_tiny(seed), tmp_path / name)
    teacher, student = str(tmp_path / "t"), str(tmp_path / "s")

    def fingerprints():
        ctx = create_context(_recipe(tmp_path, teacher, student))
        return {name: fingerprint_of(ctx, name) for name in ("teacher", "distill", "baseline")}

    base = fingerprints()
    save_detector(_tiny(1), tmp_path / "t")  # the same weights saved again
    assert fingerprints() == base
    save_detector(_tiny(2), tmp_path / "t")
    new_teacher = fingerprints()
    assert new_teacher["teacher"] != base["teacher"] and new_teacher["distill"] != base["distill"]
    assert new_teacher["baseline"] == base["baseline"]  # it never reads the teacher
    save_detector(_tiny(4), tmp_path / "s")
    new_student = fingerprints()
    assert new_student["distill"] != new_teacher["distill"] and new_student["baseline"] != base["baseline"]


@pytest.mark.slow
def test_a_new_teacher_leaves_the_baselines_record_current_in_the_run_folder(tmp_path):
    for name, seed in (("t1", 1), ("t2", 2), ("s", 3)):
        save_detector(_tiny(seed), tmp_path / name)
    teacher, other, student = (str(tmp_path / n) for n in ("t1", "t2", "s"))
    planned = ["teacher", "distill", "baseline"]
    ctx = run_stages(_recipe(tmp_path, teacher, student), planned)
    made = {name: ctx.run.stage_record(name)["id"] for name in planned}
    ctx = run_stages(_recipe(tmp_path, other, student), planned)
    assert ctx.run.stage_record("teacher")["source"] == other  # the teacher stage ran again
    assert ctx.run.stage_record("distill")["id"] != made["distill"]  # and so did distillation from it
    assert ctx.run.stage_record("baseline")["id"] == made["baseline"]
    assert ctx.run.stale_reason("baseline", fingerprint_of(ctx, "baseline")) is None
