"""What the server needs from a task family's codec: request inputs in, model inputs out; model
outputs in, answers out. No torch anywhere.

Each family has its codec in its own folder (``edgekd/tasks/text/codec.py``,
``edgekd/tasks/detection/codec.py``), handed to the loader by the family's ``serve.py``
(``edgekd.serving.family``). A codec says which inputs it takes (``accepts``), stacks items into the
runner's arrays (``pad``, which is all the micro-batcher needs) and names the outputs it reads, so
routes and batcher stay task-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np


class Codec(Protocol):
    """What the loader, the batcher and the task-agnostic routes need from a task's codec."""

    task: ClassVar[str]  # artifact.json's ``task``
    accepts: ClassVar[str]  # "texts" | "images": picks the request handlers, names the input in errors
    labels: list[str]
    input_names: tuple[str, ...]

    def pad(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        """Stack encoded items (one per row) into the runner's inputs."""
        ...

    def select_outputs(self, output_names: Sequence[str]) -> tuple[str, ...]:
        """The runner outputs this codec reads (each keeps the batch axis)."""
        ...

    def facts(self) -> dict[str, Any]:
        """Task facts for /metadata (task, inputs, max_length or image_size...)."""
        ...


def label_names(meta: dict[str, Any]) -> list[str]:
    """Class names from artifact.json's ``labels`` (a list, or a {id: name} mapping); [] when absent."""
    labels = meta.get("labels")
    if isinstance(labels, dict):
        names = [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))]
    elif isinstance(labels, list):
        names = [str(x) for x in labels]
    else:
        names = []
    return names


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits (the row maximum is subtracted first)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)
