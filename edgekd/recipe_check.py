"""What a recipe names outside itself, checked before any stage runs.

``load_recipe`` checks the recipe's own shape (keys, types, ranges). This checks what it points at:
the task family's inputs (data files and their columns, local teacher exports; see each family's
``check_inputs``), the keys its task family never reads (``unread_keys``), a prune latency target the search
cannot time on the shipped form, and the device profile (a shipped name or a YAML file). Every problem is reported
at once, each naming its recipe key, so a typo fails in a second instead of after training.
"""

from __future__ import annotations

from edgekd.recipe import Recipe, keys_set
from edgekd.tasks import get_family


def _check_profile(recipe: Recipe) -> list[str]:
    from edgekd.devices.bench import config_problems
    from edgekd.devices.profiles import ProfileError, load_profile

    try:
        profile = load_profile(recipe.bench.profile, detect=False)
    except ProfileError as e:
        return [f"bench.profile: {e}"]
    return config_problems(recipe.bench, profile)


def _check_family_keys(recipe: Recipe) -> list[str]:
    """Keys the task family never reads, set anyway; a guard metric its task does not compute."""
    family = get_family(recipe.task)
    problems = keys_set(recipe, family.unread_keys)
    q = recipe.quantize
    if q.enabled and q.guard_metric not in family.metric_names:
        problems.append(f"quantize.guard_metric: '{q.guard_metric}' is not a metric of {family.name} (its metrics: "
                        f"{', '.join(family.metric_names)}): set one of them")
    return problems


def _check_prune_search(recipe: Recipe) -> list[str]:
    """A prune search setting the code cannot honour, the same for every task family (the search's rounds are
    timed by ``edgekd.stages.prune_common``, shared by both families' prune stages)."""
    from edgekd.stages.prune_common import search_problems

    return search_problems(recipe)


def check_inputs(recipe: Recipe) -> list[str]:
    """Every problem with what ``recipe`` points at, and every key its task family does not read, each
    starting with its recipe key; [] when none."""
    return (_check_family_keys(recipe) + get_family(recipe.task).check_inputs(recipe) + _check_prune_search(recipe)
            + _check_profile(recipe))
