"""What a recipe names outside itself, checked before any stage runs.

``load_recipe`` checks the recipe's own shape (keys, types, ranges). This checks what it points at:
the task family's inputs (data files and their columns, local teacher exports; see each family's
``check_inputs``) and the device profile (a shipped name or a YAML file). Every problem is reported
at once, each naming its recipe key, so a typo fails in a second instead of after training.
"""

from __future__ import annotations

from edgekd.recipe import Recipe
from edgekd.tasks import get_family


def _check_profile(recipe: Recipe) -> list[str]:
    from edgekd.devices.profiles import ProfileError, load_profile

    try:
        load_profile(recipe.bench.profile, detect=False)
    except ProfileError as e:
        return [f"bench.profile: {e}"]
    return []


def check_inputs(recipe: Recipe) -> list[str]:
    """Every problem with what ``recipe`` points at, each starting with its recipe key; [] when none."""
    return get_family(recipe.task).check_inputs(recipe) + _check_profile(recipe)
