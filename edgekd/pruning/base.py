"""What the prune stage is given (a context) and what a pruning method implements.

A method is registered under the name the recipe uses (``prune.method``); ``prune_model`` looks
it up there and runs the schedule (steps, targets, recovery) the same way for every method.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from edgekd.errors import RecipeError, StageError
from edgekd.recipe import PruneConfig


@dataclass
class PruneContext:
    """What the caller supplies. Everything is optional except what the chosen method needs.

    score_batches: labelled batches (dicts of tensors with ``labels``) for taylor importance.
    evaluate: model -> metrics, called before pruning and after every step.
    recover: (model, step) -> model, called after every step (e.g. distillation from the teacher).
    recover_final: model -> model, called once after a search (``prune.final_recover_epochs``).
    latency_fn: model -> milliseconds; required by ``target_latency_ms``, else measured before/after
        (and after every search round). Its ``where`` and ``form`` attributes, when set, are recorded as
        ``latency_timed_on`` (the machine, runtime and threads) and ``latency_timed_form`` (what was timed).
    metric: the key of ``evaluate``'s result that ``max_accuracy_drop`` budgets.
    budget_baseline: the metrics (``evaluate``'s form) that ``max_accuracy_drop`` counts from, when that is
        not the model given (the text stage: the distilled student before ``prune.trim_vocab``, so the trim's
        cost is spent out of the same budget); None: the model given, as evaluated before pruning.
    budget_baseline_of: what ``budget_baseline`` is, in words, for the record and its messages.
    loss_fn: (model, batch) -> scalar loss for taylor scores; default: the model's own loss.
    example_inputs: channels: what torch-pruning traces the dependency graph with.
    ignored_layers: channels: modules whose output width must not change (default: the last Linear).
    """

    score_batches: Iterable[Mapping[str, Any]] | None = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    recover: Callable[[nn.Module, int], nn.Module] | None = None
    latency_fn: Callable[[nn.Module], float] | None = None
    recover_final: Callable[[nn.Module], nn.Module] | None = None
    metric: str = "accuracy"
    budget_baseline: dict[str, float] | None = None
    budget_baseline_of: str = "the unpruned model"
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], Any] | None = None
    example_inputs: Any = None
    ignored_layers: list[nn.Module] | None = None


@dataclass(frozen=True)
class StepGoal:
    """What one step must remove. Exactly one field is set."""

    param_budget: int | None = None  # prunable parameters left after the step
    heads: int | None = None  # heads to remove in this step
    neurons: int | None = None  # FFN neurons to remove in this step
    fraction: float | None = None  # share of the remaining units to remove
    sparsity: float | None = None  # share of prunable weights that are zero after the step


class PruneMethod(Protocol):
    """One pruning method. Constructed once per ``prune_model`` call, on the unpruned model, so it
    can remember floors (what every layer must keep). A method that ranks by one measure whatever
    ``prune.importance`` says names it in a class attribute ``importance``, which the metrics record."""

    def __init__(self, model: nn.Module, cfg: PruneConfig, ctx: PruneContext) -> None: ...

    def prunable_params(self, model: nn.Module) -> int:
        """Parameters the method can remove from, the base of ``keep_params``."""

    def min_prunable_params(self, model: nn.Module) -> int:
        """The fewest prunable parameters the floors allow, to reject unreachable targets up front."""

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Structure figures for the metrics (heads/neurons per layer, channels, sparsity)."""

    def step(self, model: nn.Module, goal: StepGoal) -> tuple[nn.Module, dict[str, Any]]:
        """Remove what ``goal`` asks; the info dict has ``removed`` (units removed, 0 when stuck)."""

    def finish(self, model: nn.Module) -> nn.Module:
        """Make the result plain (e.g. fold unstructured masks into the weights)."""


_METHODS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Register a pruning method under ``name``, which edgekd.registry.PRUNE_METHODS must list (the
    recipe validates prune.method against that table)."""
    from edgekd.registry import PRUNE_METHODS

    if name not in PRUNE_METHODS:
        raise ValueError(f"pruning method '{name}' is not in edgekd.registry.PRUNE_METHODS: add it there")

    def deco(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"pruning method '{name}' registered twice")
        _METHODS[name] = cls
        return cls
    return deco


def registered_methods() -> dict[str, type]:
    return dict(_METHODS)


def get_method(name: str) -> type:
    """The method registered as ``name``; its module (edgekd.registry.PRUNE_METHODS) is imported first."""
    import importlib

    from edgekd.registry import PRUNE_METHODS

    if name in PRUNE_METHODS:
        importlib.import_module(PRUNE_METHODS[name])
    if name not in _METHODS:
        raise RecipeError([f"prune.method: unknown method '{name}'; known: {', '.join(sorted(_METHODS))}"])
    return _METHODS[name]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def taylor_batches(cfg: PruneConfig, ctx: PruneContext) -> list[Mapping[str, Any]] | None:
    """The labelled batches Taylor or Fisher importance scores on (None for magnitude importance).

    Kept as a list: a generator would be spent after the first pruning step."""
    if cfg.importance not in ("taylor", "fisher"):
        return None
    if ctx.score_batches is None:
        raise StageError(
            f"prune.importance '{cfg.importance}' needs labelled batches (PruneContext.score_batches); "
            "give them or set prune.importance: magnitude"
        )
    return list(itertools.islice(ctx.score_batches, cfg.score_batches))
