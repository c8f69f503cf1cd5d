"""`edgekd run`: the stages in a straight line, each skipped when its inputs and settings are unchanged."""

from __future__ import annotations

import contextlib
import time

from edgekd import __version__
from edgekd.context import RunContext
from edgekd.errors import RecipeError, StageError
from edgekd.progress import activity
from edgekd.recipe import Recipe
from edgekd.runfolder import atomic_write_text, environment
from edgekd.stages.base import Stage, source_stage_of
from edgekd.stages.bench import bench_fingerprint, run_bench
from edgekd.stages.export import export_fingerprint, run_export
from edgekd.stages.quantize import quantize_fingerprint, run_quantize
from edgekd.tasks import get_family
from edgekd.warnings_log import route_library_logs

# The stage table: every stage by name, in the one order they run. A task family supplies the
# stages of TASK_STAGES (edgekd/tasks/<family>/family.py); the shared ones are SHARED_STAGES.
TASK_STAGES = ("teacher", "distill", "baseline", "eval", "prune")
SHARED_STAGES = {
    "export": Stage("export", run_export, export_fingerprint, enabled=lambda r: bool(r.export.targets),
                    inputs=lambda r: (source_stage_of(r),)),
    "quantize": Stage("quantize", run_quantize, quantize_fingerprint, enabled=lambda r: r.quantize.enabled,
                      inputs=lambda r: ("export",), read_only_when_on=True),
    # the exported files, the quantized ones beside them, and the PyTorch models it times for reference
    "bench": Stage("bench", run_bench, bench_fingerprint, enabled=lambda r: r.bench.enabled,
                   inputs=lambda r: tuple(dict.fromkeys(("teacher", "distill", source_stage_of(r), "export",
                                                         *(("quantize",) if r.quantize.enabled else ()))))),
}
STAGE_ORDER = (*TASK_STAGES, *SHARED_STAGES)
# What `edgekd <stage>` says it does: every stage of the table is also a command of its own.
STAGE_HELP = {
    "teacher": "Fine-tune the teacher if it has no task head; cache its outputs on the training split.",
    "distill": "Distill the teacher into the student (needs the teacher stage).",
    "baseline": "Train the same student on hard labels only, to measure what distillation adds.",
    "eval": "Evaluate teacher, student and baseline on the held-out test split.",
    "prune": "Prune the distilled student (heads, FFN neurons, channels or weights), recovering by distillation.",
    "export": "Export the shipped student to each target and check it against the source model.",
    "quantize": "Quantize the ONNX export (dynamic/static int8, fp16) under an accuracy and a speed guard.",
    "bench": "Measure every exported artifact of a run (latency, memory, accuracy) on a device profile.",
}


def stage_table(task: str) -> dict[str, Stage]:
    """The stages of a task family in run order: its own, then the shared ones. A family must give
    every stage of TASK_STAGES or name it in its ``skipped`` (with the reason), and nothing else."""
    family = get_family(task)
    own = family.stages()
    missing = [n for n in TASK_STAGES if n not in own and n not in family.skipped]
    unknown = [n for n in own if n not in TASK_STAGES]
    if missing or unknown:
        raise StageError(f"task family '{task}' " + "; ".join(
            ([f"lacks stage(s) {', '.join(missing)} (give them, or name them in its skipped)"] if missing else [])
            + ([f"gives stage(s) {', '.join(unknown)} that edgekd.pipeline.TASK_STAGES does not list"]
               if unknown else [])))
    table = {**own, **SHARED_STAGES}
    return {name: table[name] for name in STAGE_ORDER if name in table}


def create_context(recipe: Recipe) -> RunContext:
    """The run context of ``recipe``'s task family (built once per command)."""
    return get_family(recipe.task).create_context(recipe)


def fingerprint_of(ctx: RunContext, name: str) -> str:
    """The settings fingerprint of stage ``name`` for the context's recipe: what the run folder
    compares to decide whether the stage's recorded result is still valid."""
    return stage_table(ctx.recipe.task)[name].fingerprint(ctx)


def planned_stages(recipe: Recipe) -> list[str]:
    """What ``edgekd run`` runs for ``recipe``: every stage of its table the recipe enables, in order."""
    return [name for name, stage in stage_table(recipe.task).items() if stage.enabled(recipe)]


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
    table = stage_table(recipe.task)
    todo = stages or planned_stages(recipe)
    unknown = [name for name in todo if name not in table]
    if unknown:
        raise StageError(f"task '{recipe.task}' has no stage(s) {', '.join(unknown)}; its stages: {', '.join(table)}.")
    off = [name for name in stages or () if table[name].read_only_when_on and not table[name].enabled(recipe)]
    if off:
        raise StageError("; ".join(
            f"{name}.enabled is false in this recipe, so no later stage would read what the {name} stage made: turn "
            f"it on ({name}.enabled: true in the recipe, or --set {name}.enabled=true on a recipe file)" for name in off))
    ctx = create_context(recipe)
    with contextlib.ExitStack() as held:
        if ctx.is_main:  # one command at a time on a run folder; the main process speaks for `accelerate launch`
            held.enter_context(ctx.run.exclusive(f"stages {', '.join(todo)}"))
        _run_locked(ctx, table, todo, force, save_recipe)
    return ctx


def _run_locked(ctx: RunContext, table: dict[str, Stage], todo: list[str], force: bool,
                save_recipe: Recipe | None) -> None:
    """:func:`run_stages` with the run folder held (see ``RunFolder.exclusive``)."""
    recipe = ctx.recipe
    _refuse_changed_upstream(ctx, table, todo)
    if ctx.is_main:
        prepare_run(ctx)
    ctx.sync()
    t0 = time.perf_counter()
    finished = False
    ran: list[str] = []  # the stages this command ran (the others were unchanged): the summary says which
    try:
        for name in todo:
            stage = table[name]
            if name in SHARED_STAGES and not ctx.is_main:
                # Under `accelerate launch` the shared stages (export, quantize, bench) train nothing: the main
                # process runs them alone (two would export into one folder, time each other's latencies and
                # interleave their manifest writes); the others stop after the stages that train.
                continue
            why = ctx.run.stale_reason(name, stage.fingerprint(ctx))
            if not force and why is None:
                ctx.say(f"[dim]{name}: unchanged since the last run, skipped[/]")
                continue
            if not force and ctx.run.stage_record(name):
                ctx.say(f"[dim]{name}: runs again: {why}[/]")
            _refuse_stale_inputs(ctx, table, name)
            ctx.run.will_read(name, stage.inputs(recipe))
            s0 = time.perf_counter()
            route_library_logs()  # libraries imported by the stages before this one add their own handlers
            with activity(name):
                stage.run(ctx)
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


def _refuse_stale_inputs(ctx: RunContext, table: dict[str, Stage], name: str) -> None:
    """A stage never builds on a broken result: an input recorded here whose files changed, or whose own
    inputs ran again since it was made (a quantized file of an export that was redone), is an error
    saying what to run. An input made with other settings than the recipe's now (``edgekd export --to``
    for a one-off set of targets) is left to the stage: a stage that loads a model refuses it
    (``load_stage_model``), one that reads files uses them as recorded."""
    for dep in table[name].inputs(ctx.recipe):
        if dep in table and ctx.run.stage_record(dep):
            why = ctx.run.stale_reason(dep, None)
            if why:
                raise StageError(f"the {name} stage reads the {dep} stage's result, which is out of date ({why}): "
                                 f"run `edgekd {dep}` first, or `edgekd run` for every stage in order.")


def _refuse_changed_upstream(ctx: RunContext, table: dict[str, Stage], todo: list[str]) -> None:
    """A command that runs later stages only must not build on a stage whose settings its recipe changes
    (``edgekd quantize my.yaml`` after editing ``prune.keep_params``, or with ``--set`` on it): the stage
    run would read the old result, record the new settings, and the run folder would claim a model that
    no stage made. Each finished stage read (directly or down the chain) that the command does not run
    is compared with the run folder's saved recipe: made with the saved settings, and changed by the
    recipe given now, it is an error naming the keys and what to run. A result made with other settings
    than the saved ones (``edgekd export --to`` for once) is left to the stage, as before."""
    from edgekd.recipe import load_recipe
    from edgekd.sections import changed_keys

    upstream, todo_set = [], set(todo)
    frontier = [dep for name in todo for dep in table[name].inputs(ctx.recipe)]
    while frontier:
        dep = frontier.pop()
        if dep in table and dep not in todo_set and dep not in upstream:
            upstream.append(dep)
            frontier += table[dep].inputs(ctx.recipe)
    path = ctx.run.recipe_path
    if not upstream or not path.is_file():
        return
    try:
        saved = load_recipe(path, [f"output_dir={ctx.run.root.parent}", f"name={ctx.run.root.name}"])
    except RecipeError as e:  # written by an older edgekd with keys this one no longer takes
        ctx.say(f"[yellow]the run's saved recipe.yaml does not load ({e}): the stages this command reads are "
                "not compared with it[/]")
        return
    keys = [k for k in changed_keys(ctx.recipe, saved) if k not in ("output_dir", "name")]
    if not keys:
        return
    saved_ctx, changed = None, []
    for dep in (name for name in table if name in upstream):  # in run order
        rec = ctx.run.stage_record(dep)
        if not rec or rec.get("status") != "done" or rec.get("fingerprint") == table[dep].fingerprint(ctx):
            continue
        saved_ctx = saved_ctx or create_context(saved)
        if rec.get("fingerprint") == table[dep].fingerprint(saved_ctx):
            changed.append(dep)
    if changed:
        plural, runs = len(changed) > 1, ", ".join(todo)
        raise StageError(
            f"this recipe changes {', '.join(keys)} from the run's saved recipe.yaml, and with "
            f"{'them' if len(keys) > 1 else 'it'} the {' and '.join(changed)} stage{'s' if plural else ''} that "
            f"{runs} read{'s' if len(todo) == 1 else ''}; this command does not run {'them' if plural else 'it'}, "
            f"so {runs} would build on the result made with the old settings. Run `edgekd run` with this recipe "
            f"(every stage in order), or `edgekd {changed[0]}` with it first.")


def _drop_empty_checkpoints(ctx: RunContext) -> None:
    """Stages delete their own checkpoints when they finish; the folder that held them goes too once
    it is empty (a failed stage's checkpoints stay, to resume from)."""
    root = ctx.run.root / "checkpoints"
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
