"""What every stage of one invocation shares: the recipe, the run folder and the task family.

Built once per command by the task family (``TaskFamily.create_context``; data loaded and split
once), never cached across commands: the run folder is the only state that outlives a process.
This module knows no task and no stage: each family's context (``edgekd/tasks/<family>/context.py``)
adds its data, and stages reach each other's results through ``edgekd.stages.base``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import StageError
from edgekd.progress import console
from edgekd.recipe import Recipe
from edgekd.runfolder import RunFolder


@dataclass
class RunContext:
    """The shared part of a run context. A task family's context adds ``task`` (its Task), its
    data (``data_summary``, ``data_fingerprint``) and the real examples the shared stages feed
    (``parity_data``, ``validation_data``, ``calibration_data``)."""

    recipe: Recipe
    run: RunFolder
    family: Any  # the TaskFamily (edgekd.tasks.base) that built it: its stages, for edgekd.stages.base

    # --- what the shared stages read (each family's context defines these) -----------------------
    @property
    def task(self) -> Any:
        """The family's Task (``edgekd.tasks.base.Task``), built from the data."""
        raise NotImplementedError

    @property
    def data_summary(self) -> dict[str, Any]:
        """The data's record in the manifest (source, sizes, split)."""
        raise NotImplementedError

    @property
    def data_fingerprint(self) -> str:
        """The hash of the data settings and what they gave, covered by every stage's fingerprint."""
        raise NotImplementedError

    def parity_data(self, n: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Real test examples as model inputs, and their labels (export parity, artifact metrics)."""
        raise NotImplementedError

    def validation_data(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The validation split as model inputs and labels (quantization calibration and guard)."""
        raise NotImplementedError

    def calibration_data(self, split: str, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` examples of the train or validation split as model inputs."""
        raise NotImplementedError

    def input_desc(self) -> str | None:
        """How the bench table names the timed input shape (None: sequence length)."""
        return None

    def ood_data(self) -> tuple[str, dict[str, np.ndarray], np.ndarray] | None:
        """The out-of-domain set (``eval.ood_dataset``) as the shipped artifacts' inputs, with labels:
        (its name, inputs, labels); None without one. A family that cannot score one refuses it."""
        name = self.recipe.eval.ood_dataset
        if name:
            raise StageError(f"eval.ood_dataset ({name}): task '{self.recipe.task}' cannot be scored on an "
                             "out-of-domain set. Set eval.ood_dataset to null in the recipe.")
        return None

    def bench_torch_models(self, models: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
        """The PyTorch models bench times, made to read the shipped artifacts' inputs (default: as they are)."""
        return models

    def bench_original_inputs(self, n: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None] | None:
        """The test split's first ``n`` examples (and the out-of-domain set, or None) as the inputs the
        unpruned PyTorch models read, where those are not the shipped artifacts' (default: None, they are
        the same): the bench times those models on them, in the same plan as every other row."""
        return None

    def bench_own_outputs(self, models: dict[str, tuple[Any, Any]], n: int | None) -> dict[str, tuple[
            dict[str, np.ndarray], dict[str, np.ndarray] | None, str | None]]:
        """Outputs (test split's first ``n``, out-of-domain set, and where they came from when not from
        running the model here) to score a PyTorch model of the bench on where the inputs it is timed on
        are not the ones it reads (default: none; every model is scored on the timed inputs)."""
        return {}

    def extra_exports(self, model, inputs, labels, meta, staging=None) -> dict[str, dict[str, Any]]:
        """Task-specific artifacts beside export.targets (detection: ONNX with NMS in the graph). ``staging``
        (``edgekd.export.stage.Staging`` of the export folder): stage them there, for the export stage to
        publish with export.targets' folders; None: publish them at once."""
        return {}

    # --- run folder paths ---------------------------------------------------------------------
    def model_dir(self, stage: str) -> Path:
        return self.run.stage_dir(stage) / "model"

    def checkpoint_dir(self, stage: str, fp: str) -> Path:
        return self.run.root / "checkpoints" / f"{stage}-{fp}"

    @property
    def is_main(self) -> bool:
        """Only the main process writes to the run folder under `accelerate launch`."""
        from accelerate import PartialState

        return PartialState().is_main_process

    def sync(self) -> None:
        from accelerate import PartialState

        PartialState().wait_for_everyone()

    def say(self, msg: str) -> None:
        if self.is_main:
            console.print(msg)
