"""The interfaces the code really uses, written down as protocols (a test checks both families
against them): a task family (what the pipeline asks of it), a task (what the shared stages, export
and bench, ask of the model side) and a split (what the training loop asks of the data).

Training-side methods take torch objects; the export/serving side speaks numpy so that a server
needs no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from edgekd.context import RunContext
    from edgekd.export.base import ModelIO
    from edgekd.recipe import Recipe
    from edgekd.stages.base import Stage


@runtime_checkable
class TaskFamily(Protocol):
    """A task family (text classification, object detection), registered by name in
    ``edgekd.registry.TASKS``. ``stages()`` are its own stages (teacher, distill, baseline, eval,
    prune, by name); a name of ``edgekd.pipeline.TASK_STAGES`` it does not run is in ``skipped``
    with the reason."""

    name: str
    skipped: dict[str, str]
    # Recipe keys (dotted; a whole section too) the family never reads -> why: a recipe that sets one
    # away from its default is refused before any stage runs (edgekd.recipe_check).
    unread_keys: dict[str, str]
    # The keys of its task's metrics (quantize.guard_metric must name one).
    metric_names: tuple[str, ...]

    def create_context(self, recipe: Recipe) -> RunContext:
        """The run context every stage of one command shares (its data loaded once)."""

    def stages(self) -> dict[str, Stage]:
        """Its own stages by name."""

    def check_inputs(self, recipe: Recipe) -> list[str]:
        """Every problem with what ``recipe`` points at (data files, columns), each starting with
        its recipe key; [] when none. Run before any stage."""


@runtime_checkable
class Task(Protocol):
    """The model side of a task family, as the shared stages (export, quantize, bench) use it."""

    name: str
    label_names: list[str]
    primary_metric: str  # the metrics key that heads tables and guards (accuracy, map50_95)
    # (got, want) -> 0..1: how far two models' outputs agree on the same inputs (detection: class,
    # score and box location by location); None: parity compares the argmax (top-1 agreement).
    agreement: Any

    def load_model(self, source: str | Path) -> Any:
        """Load a model (named asset, hub id or local folder); add a fresh task head if it has none."""

    def model_io(self) -> ModelIO:
        """Input/output names, dtypes and dynamic axes, the same for every export target."""

    def export_module(self, model: Any) -> Any:
        """A torch.nn.Module taking ``model_io().input_names`` as tensors and returning a tuple
        of tensors in the order of ``model_io().output_names`` (no dict outputs)."""

    def shipped_module(self, model: Any, cfg: Any, inputs: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
        """The module every export target captures (``export_module``'s outputs, possibly computed with
        less work; ``cfg`` is the recipe's export section, ``inputs`` real examples to check it on) and
        what artifact.json records about it. Parity and the PyTorch bench rows use ``export_module``."""

    def metrics(self, outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
        """The task metric(s) from raw model outputs (e.g. accuracy, macro_f1 from logits)."""

    def export_meta(self) -> dict[str, Any]:
        """Task facts written into every artifact.json (max_length; image_size)."""


@runtime_checkable
class Split(Protocol):
    """One split of a task's data, as ``edgekd.train`` reads it: example indices in, numpy batches out."""

    def __len__(self) -> int: ...

    def train_batches(self, batch_size: int, seed: int) -> list[np.ndarray]:
        """The epoch's batches of example indices, in an order fixed by ``seed``."""

    def eval_batches(self, batch_size: int) -> list[np.ndarray]:
        """Every example once, in order, in batches of indices."""

    def collate(self, idx: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """The batch of examples ``idx`` as numpy arrays (model inputs, ``labels``/targets, ``index``)."""
