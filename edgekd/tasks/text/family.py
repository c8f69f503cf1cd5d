"""Text classification as a task family: its run context, its own stages and its recipe checks."""

from __future__ import annotations

from edgekd.recipe import Recipe
from edgekd.runfolder import RunFolder
from edgekd.stages.base import Stage, eval_inputs
from edgekd.tasks.text import checks
from edgekd.tasks.text.context import TextRunContext
from edgekd.tasks.text.distill import run_student_stage, stage_fingerprint
from edgekd.tasks.text.evaluate import eval_fingerprint, run_eval
from edgekd.tasks.text.prune import load_pruned, prune_fingerprint, run_prune
from edgekd.tasks.text.teacher import load_teacher_outputs, run_teacher, teacher_fingerprint

STAGES = {
    "teacher": Stage("teacher", run_teacher, teacher_fingerprint, produces_model=True,
                     load=lambda c: load_teacher_outputs(c)[0]),  # None for a black-box teacher
    "distill": Stage("distill", lambda c: run_student_stage(c, "distill"), lambda c: stage_fingerprint(c, "distill"),
                     produces_model=True, inputs=lambda r: ("teacher",)),
    # the student starts from the teacher's layers
    "baseline": Stage("baseline", lambda c: run_student_stage(c, "baseline"),
                      lambda c: stage_fingerprint(c, "baseline"), enabled=lambda r: r.baseline.enabled,
                      read_only_when_on=True,
                      produces_model=True, inputs=lambda r: ("teacher",)),
    "eval": Stage("eval", run_eval, eval_fingerprint, inputs=eval_inputs),
    # recovery distils from the teacher's cached outputs
    "prune": Stage("prune", run_prune, prune_fingerprint, enabled=lambda r: r.prune.enabled, produces_model=True,
                   read_only_when_on=True,
                   load=load_pruned, inputs=lambda r: ("teacher", "distill")),
}


# Recipe keys a text-classification run never reads (edgekd.recipe_check refuses them when set).
UNREAD_KEYS = {
    "detection": "only task: detection reads the detection section",
    **dict.fromkeys(("serve.max_images", "serve.max_image_pixels"), "only a detection server reads it; a text "
                    "server's limits are serve.max_items and max_length"),
}


class TextClassification:
    name = "text-classification"
    skipped: dict[str, str] = {}
    unread_keys = UNREAD_KEYS
    metric_names = ("accuracy", "macro_f1")

    def create_context(self, recipe: Recipe) -> TextRunContext:
        return TextRunContext(recipe=recipe, run=RunFolder(recipe.run_dir()), family=self)

    def stages(self) -> dict[str, Stage]:
        return dict(STAGES)

    def check_inputs(self, recipe: Recipe) -> list[str]:
        return checks.check_inputs(recipe)


FAMILY = TextClassification()
