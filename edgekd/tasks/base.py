"""The task interface. Stages are written against it, never against BERT or YOLO directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekd.export.base import ModelIO


class Task(Protocol):
    """A task family (text classification, object detection).

    Training-side methods take torch objects; the export/serving side speaks numpy so that a
    server needs no torch.
    """

    name: str
    label_names: list[str]
    primary_metric: str  # the metrics key that heads tables and guards (accuracy, map50_95)

    # --- models -------------------------------------------------------------------------------
    def load_model(self, source: str | Path, num_labels: int | None = None) -> Any:
        """Load a model (named asset, hub id or local folder); add a fresh task head if it has none."""

    def has_task_head(self, source: str | Path) -> bool:
        """True when ``source`` already carries a trained head for this task."""

    def build_student(self, teacher: Any, layers: list[int]) -> Any:
        """A smaller model initialised from the teacher's ``layers`` (DistilBERT-style)."""

    def save_model(self, model: Any, out_dir: Path) -> None:
        """Save in the model family's own format (Hugging Face: safetensors + config + tokenizer)."""

    # --- export / parity / serving --------------------------------------------------------------
    def model_io(self) -> ModelIO:
        """Input/output names, dtypes and dynamic axes, the same for every export target."""

    def export_module(self, model: Any) -> Any:
        """A torch.nn.Module taking ``model_io().input_names`` as tensors and returning a tuple
        of tensors in the order of ``model_io().output_names`` (no dict outputs)."""

    def example_inputs(self, n: int = 8) -> dict[str, np.ndarray]:
        """Real preprocessed examples from the test split, padded to one shape."""

    def parity_data(self, n: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(inputs, labels) of real test examples for parity checks and accuracy of artifacts."""

    def metrics(self, outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
        """The task metric(s) from raw model outputs (e.g. accuracy, macro_f1 from logits)."""

    def agreement(self, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
        """Optional (None on the class: parity uses top-1 agreement): how far two models' outputs
        agree on the same inputs, 0..1 (detection: class, score and box location by location)."""

    def export_meta(self) -> dict[str, Any]:
        """Task facts written into every artifact.json (max_length; image_size)."""
