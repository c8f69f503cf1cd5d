"""Task families behind one interface (see base.py): each family's folder holds its task, its run
context and its own stages; ``edgekd.registry.TASKS`` names them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edgekd.registry import TASKS

if TYPE_CHECKING:
    from edgekd.tasks.base import TaskFamily


def get_family(name: str) -> TaskFamily:
    """The task family registered as ``name`` (its module is imported on first use)."""
    from edgekd.errors import RecipeError

    if name not in TASKS:
        raise RecipeError([f"task: unknown task '{name}'; registered: {', '.join(TASKS)}"])
    return importlib.import_module(f"{TASKS[name]}.family").FAMILY
