"""`edgekd run`: the stages in a straight line, each skipped when its inputs and settings are unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edgekd import __version__
from edgekd.compress import prune_fingerprint, quantize_fingerprint, run_prune, run_quantize
from edgekd.context import RunContext
from edgekd.deploy import bench_fingerprint, export_fingerprint, run_bench, run_export
from edgekd.distill import run_student_stage, stage_fingerprint
from edgekd.evaluate import eval_fingerprint, run_eval
from edgekd.progress import activity
from edgekd.recipe import Recipe
from edgekd.runfolder import atomic_write_text, environment
from edgekd.teacher import run_teacher, teacher_fingerprint
from edgekd.warnings_log import route_library_logs

StageFn = Callable[[RunContext], dict[str, Any]]

# name -> (run, fingerprint). A fingerprint covers the stage's settings and its inputs' fingerprints.
STAGES: dict[str, tuple[StageFn, Callable[[RunContext], str]]] = {
    "teacher": (run_teacher, teacher_fingerprint),
    "distill": (lambda c: run_student_stage(c, "distill"), lambda c: stage_fingerprint(c, "distill")),
    "baseline": (lambda c: run_student_stage(c, "baseline"), lambda c: stage_fingerprint(c, "baseline")),
    "eval": (run_eval, eval_fingerprint),
    "prune": (run_prune, prune_fingerprint),
    "export": (run_export, export_fingerprint),
    "quantize": (run_quantize, quantize_fingerprint),
    "bench": (run_bench, bench_fingerprint),
}


def stage_table(task: str) -> dict[str, tuple[StageFn, Callable[[RunContext], str]]]:
    """The stage functions of a task family: the same names, in the same order, for every task."""
    if task == "detection":
        from edgekd.tasks.detection.stages import STAGES as DETECTION_STAGES

        return DETECTION_STAGES
    return STAGES


def planned_stages(recipe: Recipe) -> list[str]:
    stages = ["teacher", "distill"]
    if recipe.baseline.enabled:
        stages.append("baseline")
    stages.append("eval")
    if recipe.prune.enabled:
        stages.append("prune")
    if recipe.export.targets:
        stages.append("export")
    if recipe.quantize.enabled:
        stages.append("quantize")
    if recipe.bench.enabled:
        stages.append("bench")
    return [s for s in stages if s in stage_table(recipe.task)]


def prepare_run(ctx: RunContext) -> None:
    """Write the run-level facts (versions, data split) into the run folder. The recipe is saved
    only once the command has succeeded (see :func:`run_stages`)."""
    ctx.run.root.mkdir(parents=True, exist_ok=True)
    ctx.run.update_top(
        name=ctx.recipe.name,
        edgekd_version=__version__,
        task=ctx.recipe.task,
        primary_metric=ctx.task.primary_metric,
        environment=environment(),
        data=ctx.data_summary,
        labels=ctx.task.label_names,
    )


def run_stages(recipe: Recipe, stages: list[str] | None = None, force: bool = False,
               save_recipe: Recipe | None = None) -> RunContext:
    """Run ``stages`` (default: the recipe's full plan) in order; return the context for reporting.

    ``recipe.yaml`` is what produced the run's artifacts: ``save_recipe`` (the recipe without the
    command's one-off overrides; None when the command is all one-off) is written only when every
    stage succeeded. A failed command leaves it as it was, except that a run folder that has none
    yet gets one as soon as a stage finished, so the folder always names its recipe.
    """
    ctx = RunContext.create(recipe)
    table = stage_table(recipe.task)
    if ctx.is_main:
        prepare_run(ctx)
    ctx.sync()
    todo = stages or planned_stages(recipe)
    t0 = time.perf_counter()
    finished = False
    ran: list[str] = []  # the stages this command ran (the others were unchanged): the summary says which
    try:
        for name in todo:
            fn, fp_fn = table[name]
            if not force and ctx.run.is_done(name, fp_fn(ctx)):
                ctx.say(f"[dim]{name}: unchanged since the last run, skipped[/]")
                continue
            s0 = time.perf_counter()
            route_library_logs()  # libraries imported by the stages before this one add their own handlers
            with activity(name):
                fn(ctx)
            finished = True
            ran.append(name)
            ctx.say(f"[green]{name}[/]: done in {time.perf_counter() - s0:.1f} s")
        if ctx.is_main and save_recipe is not None:
            atomic_write_text(ctx.run.recipe_path, save_recipe.to_yaml())
    except BaseException:
        if ctx.is_main and finished and save_recipe is not None and not ctx.run.recipe_path.is_file():
            atomic_write_text(ctx.run.recipe_path, save_recipe.to_yaml())
        raise
    finally:
        if ctx.is_main:
            _drop_empty_checkpoints(ctx)
    if ctx.is_main:
        from accelerate import PartialState

        ctx.run.update_top(last_invocation={"stages": todo, "ran": ran, "seconds": round(time.perf_counter() - t0, 2),
                                            "processes": PartialState().num_processes})
    return ctx


def _drop_empty_checkpoints(ctx: RunContext) -> None:
    """Stages delete their own checkpoints when they finish; the folder that held them goes too once
    it is empty (a failed stage's checkpoints stay, to resume from)."""
    root = ctx.run.root / "checkpoints"
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
