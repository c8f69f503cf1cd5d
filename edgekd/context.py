"""What every stage of one invocation shares: the recipe, the run folder, the task and the data.

Built once per command (data loaded, split and tokenised once), never cached across commands:
the run folder is the only state that outlives a process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import StageError
from edgekd.progress import console
from edgekd.recipe import Recipe
from edgekd.runfolder import RunFolder, fingerprint
from edgekd.tasks.text import TextClassificationTask, TokenizedSplit


@dataclass
class RunContext:
    recipe: Recipe
    run: RunFolder

    @classmethod
    def create(cls, recipe: Recipe) -> RunContext:
        if recipe.task == "detection":
            from edgekd.tasks.detection.context import DetectionRunContext

            return DetectionRunContext(recipe=recipe, run=RunFolder(recipe.run_dir()))
        return cls(recipe=recipe, run=RunFolder(recipe.run_dir()))

    # --- data ---------------------------------------------------------------------------------
    @cached_property
    def examples(self):
        from edgekd.data import load_examples

        return load_examples(self.recipe.data)

    @cached_property
    def splits(self):
        from edgekd.data import split_examples

        return split_examples(self.examples, self.recipe.data.split, self.recipe.data.max_train_examples)

    @cached_property
    def data_summary(self) -> dict[str, Any]:
        return self.splits.summary()

    @cached_property
    def data_fingerprint(self) -> str:
        return fingerprint({"data": self.recipe.data.model_dump(mode="json"), "split": self.data_summary})

    @cached_property
    def task(self) -> TextClassificationTask:
        return TextClassificationTask(self.examples.label_names, self.recipe.data.max_length)

    @cached_property
    def tokenizer(self):
        """The teacher's tokenizer (the student shares it unless it is loaded from its own id)."""
        return self.task.load_tokenizer(self.recipe.teacher.model)

    def tokenized(self, split: str, tokenizer=None) -> TokenizedSplit:
        tok = tokenizer or self.tokenizer
        key = (split, id(tok))
        cache = self.__dict__.setdefault("_tokenized", {})
        if key not in cache:
            idx = getattr(self.splits, split)
            texts = [self.examples.texts[i] for i in idx]
            labels = self.examples.labels[idx]
            cache[key] = TokenizedSplit(self.task.tokenize(tok, texts), labels, tok.pad_token_id or 0)
        return cache[key]

    @property
    def shipped_tokenizer(self):
        """The tokenizer of the model that ships: the pruned student's own when ``prune.trim_vocab``
        rewrote its vocabulary (export, quantize and bench feed its ids), else the teacher's."""
        p = self.recipe.prune
        if p.enabled and p.trim_vocab:
            from edgekd.compress import load_pruned_tokenizer

            return load_pruned_tokenizer(self)
        return self.tokenizer

    def parity_data(self, n: int | None = None, tokenizer=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Real test examples, padded to one shape, for export parity and artifact accuracy
        (tokenized for the shipped model unless ``tokenizer`` is given)."""
        test = self.tokenized("test", tokenizer or self.shipped_tokenizer)
        idx = np.arange(len(test) if n is None else min(n, len(test)))
        batch = test.collate(idx)
        return {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"]

    def validation_data(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The validation split as model inputs and labels (quantization calibration and guard)."""
        val = self.tokenized("validation", self.shipped_tokenizer)
        batch = val.collate(np.arange(len(val)))
        return {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"]

    def calibration_data(self, split: str, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` examples of the train or validation split as model inputs (quantization
        calibration; the test split is never read for it)."""
        if split not in ("train", "validation"):
            raise StageError(f"calibration reads the train or validation split, not {split!r}")
        part = self.tokenized(split)
        batch = part.collate(np.arange(min(n, len(part))))
        return {k: batch[k] for k in ("input_ids", "attention_mask")}

    def input_desc(self) -> str | None:
        """How the bench table names the timed input shape (None: sequence length)."""
        return None

    # --- stages ---------------------------------------------------------------------------------
    def stage_fp(self, stage: str) -> str:
        """The settings fingerprint of ``stage`` for this recipe (the task's stage table)."""
        from edgekd.pipeline import stage_table

        return stage_table(self.recipe.task)[stage][1](self)

    def load_stage_model(self, stage: str):
        """The model a finished stage saved (distill, baseline, prune), checked against the recipe."""
        if stage == "prune":
            from edgekd.compress import load_pruned

            return load_pruned(self)
        from edgekd.distill import load_student

        return load_student(self, stage)

    def extra_exports(self, model, inputs, labels, meta) -> dict[str, dict[str, Any]]:
        """Task-specific artifacts beside export.targets (detection: ONNX with NMS in the graph)."""
        return {}

    def teacher_model(self):
        """The local teacher (None for a black box)."""
        from edgekd.teacher import load_teacher_outputs

        return load_teacher_outputs(self)[0]

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
