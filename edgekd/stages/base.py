"""What a stage is, and how one stage reaches the results of another.

A stage is a plain function over a run context plus the fingerprint of its settings and inputs;
``Stage`` records the two with when the recipe runs it and whether it saves a model. A task family
supplies its own stages (``TaskFamily.stages``); export, quantize and bench are shared
(``edgekd.stages.export``, ``.quantize``, ``.bench``) and reach the family's stages through
:func:`stage_fingerprint` and :func:`load_stage_model`, never by importing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgekd.errors import StageError

if TYPE_CHECKING:
    from edgekd.context import RunContext
    from edgekd.recipe import Recipe


def _always(recipe: Recipe) -> bool:
    return True


def _nothing(recipe: Recipe) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    name: the stage's name in the run folder, the manifest and the CLI (``edgekd <name>``).
    run: ctx -> the metrics it recorded.
    fingerprint: ctx -> the hash of its settings and its inputs' fingerprints; unchanged means the
        recorded result is still valid.
    enabled: recipe -> whether ``edgekd run`` plans it.
    produces_model: it saves a model under ``<run>/<name>/model`` that later stages load.
    load: ctx -> that model, once the stage is known to be finished and current (default: the
        task's ``load_model`` on the folder, in eval mode); may return None (a black-box teacher).
    inputs: recipe -> the stages whose results it reads. Its record keeps the ids of theirs, and it is
        out of date once one of them is run again (``RunFolder.stale_reason``).
    read_only_when_on: later stages read its result only while the recipe turns it on (``<name>.enabled``):
        a command that names it while it is off is refused, since nothing would use what it made.
    """

    name: str
    run: Callable[[RunContext], dict[str, Any]]
    fingerprint: Callable[[RunContext], str]
    enabled: Callable[[Recipe], bool] = _always
    produces_model: bool = False
    load: Callable[[RunContext], Any] | None = None
    inputs: Callable[[Recipe], tuple[str, ...]] = _nothing
    read_only_when_on: bool = False


def source_stage_of(recipe: Recipe) -> str:
    """The model that ships: the pruned student when the recipe prunes, else the distilled one."""
    return "prune" if recipe.prune.enabled else "distill"


def eval_inputs(recipe: Recipe) -> tuple[str, ...]:
    """What an eval stage reads: the teacher, the distilled student and the baseline when it trains."""
    return ("teacher", "distill", "baseline") if recipe.baseline.enabled else ("teacher", "distill")


def task_stage(ctx: RunContext, name: str) -> Stage:
    """The context's task family's own stage ``name``."""
    stages = ctx.family.stages()
    if name not in stages:
        raise StageError(f"task '{ctx.recipe.task}' has no {name} stage (its stages: {', '.join(stages)}).")
    return stages[name]


def stage_fingerprint(ctx: RunContext, name: str) -> str:
    """The fingerprint of the family's stage ``name`` for this recipe."""
    return task_stage(ctx, name).fingerprint(ctx)


def load_stage_model(ctx: RunContext, name: str):
    """The model the finished stage ``name`` saved, checked against the recipe first: a stage that is
    missing or out of date is an error saying what to run."""
    stage = task_stage(ctx, name)
    if not stage.produces_model:
        raise StageError(f"the {name} stage saves no model to load.")
    why = ctx.run.stale_reason(name, stage.fingerprint(ctx))
    if why:
        raise StageError(f"The {name} stage of run '{ctx.recipe.name}' is missing or out of date ({why}). "
                         f"Run `edgekd {name}` (or `edgekd run`) first.")
    if stage.load is not None:
        return stage.load(ctx)
    return ctx.task.load_model(ctx.model_dir(name)).eval()
