"""Text classification: encoder teachers (families in edgekd.encoders) and DistilBERT-style students."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.export.base import ModelIO

TEXT_IO = ModelIO(
    input_names=["input_ids", "attention_mask"],
    output_names=["logits"],
    dynamic_axes={
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    },
    dtypes={"input_ids": "int64", "attention_mask": "int64"},
)


class SequenceClassifierExport(nn.Module):
    """What every export target sees: (input_ids, attention_mask) -> (logits,), no dict outputs.

    token_type_ids are left out: single-sentence classification uses segment 0 everywhere, which
    is what BERT does when they are not given.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids, attention_mask=attention_mask).logits,)


def classification_metrics(outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """accuracy and macro-F1 from logits."""
    pred = np.asarray(outputs["logits"]).argmax(-1)
    labels = np.asarray(labels)
    acc = float((pred == labels).mean()) if len(labels) else float("nan")
    f1s = []
    for c in np.unique(np.concatenate([labels, pred])):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": acc, "macro_f1": float(np.mean(f1s)) if f1s else float("nan")}


# ---------------------------------------------------------------------------------------------
# Tokenised splits and batching


class TokenizedSplit:
    """One split, tokenised once (no padding); batches are padded to their longest member."""

    def __init__(self, input_ids: list[list[int]], labels: np.ndarray, pad_id: int):
        if len(input_ids) != len(labels):
            raise ValueError("input_ids and labels differ in length")
        self.input_ids = input_ids
        self.labels = np.asarray(labels, dtype=np.int64)
        self.pad_id = pad_id
        self.lengths = np.array([len(x) for x in input_ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, idx: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        width = int(self.lengths[idx].max())
        ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for row, i in enumerate(idx):
            seq = self.input_ids[i]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[idx], "index": idx}

    def train_batches(self, batch_size: int, seed: int, group: int = 50) -> list[np.ndarray]:
        """Shuffled batches of similar lengths (less padding, same randomness per seed)."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self))
        batches = []
        chunk = batch_size * group
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def eval_batches(self, batch_size: int) -> list[np.ndarray]:
        """Batches sorted by length; callers put results back with the returned indices."""
        order = np.argsort(self.lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------
# Models


class TextClassificationTask:
    """Text classification with Hugging Face sequence-classification models."""

    name = "text-classification"
    # Export option defaults of this task (target -> options; the recipe's export.options override).
    export_defaults: dict[str, dict] = {}  # noqa: RUF012 (read only)
    # Export keys shipped_module reads (they are part of the export fingerprint even when unset).
    shipped_settings = ("first_token_last_layer",)

    def __init__(self, label_names: list[str], max_length: int = 64):
        self.label_names = list(label_names)
        self.max_length = max_length
        self._parity: tuple[dict[str, np.ndarray], np.ndarray] | None = None

    # --- models -------------------------------------------------------------------------------
    @staticmethod
    def resolve(source: str | Path) -> str:
        from edgekd.assets import resolve_model

        return resolve_model(str(source))

    def has_task_head(self, source: str | Path) -> bool:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.resolve(source))
        archs = cfg.architectures or []
        return any(a.endswith("ForSequenceClassification") for a in archs) and cfg.num_labels == len(
            self.label_names
        )

    def _label_maps(self) -> dict:
        id2label = dict(enumerate(self.label_names))
        return {"num_labels": len(self.label_names), "id2label": id2label,
                "label2id": {v: k for k, v in id2label.items()}}

    def load_model(self, source: str | Path) -> nn.Module:
        """Load a sequence classifier; a model without a head gets a fresh one for our labels."""
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        path = self.resolve(source)
        if self.has_task_head(path):
            return AutoModelForSequenceClassification.from_pretrained(path)
        # A fresh head is expected here: silence transformers' "newly initialized" notice for this call.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoModelForSequenceClassification.from_pretrained(path, **self._label_maps())
        finally:
            hf_logging.set_verbosity(verbosity)

    def load_tokenizer(self, source: str | Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.resolve(source))

    def build_student(self, teacher: nn.Module, layers: list[int]) -> nn.Module:
        """DistilBERT-style student: same width, the teacher's ``layers`` only, every weight copied, then
        checked block by block against the teacher (edgekd.encoders: where each family keeps its blocks)."""
        from edgekd.encoders import build_student

        return build_student(teacher, layers)

    @staticmethod
    def default_layers(n_teacher: int) -> list[int]:
        return list(range(0, n_teacher, 2))

    @staticmethod
    def save_model(model: nn.Module, tokenizer, out_dir: Path) -> None:
        from edgekd.runfolder import atomic_dir

        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

    # --- data ---------------------------------------------------------------------------------
    def tokenize(self, tokenizer, texts: list[str]) -> list[list[int]]:
        enc = tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return enc["input_ids"]

    # --- export / parity ----------------------------------------------------------------------
    def model_io(self) -> ModelIO:
        return TEXT_IO

    def export_module(self, model: nn.Module) -> nn.Module:
        return SequenceClassifierExport(model)

    def shipped_module(self, model: nn.Module, cfg: Any, inputs: dict[str, np.ndarray]) -> tuple[nn.Module, dict]:
        """The classifier with its last block over the first position only, where the family allows it
        (edgekd.tasks.text.first_token; ``export.first_token_last_layer``), else ``export_module``."""
        from edgekd.tasks.text.first_token import shipped_text_module

        module, notes = shipped_text_module(model, cfg.first_token_last_layer, self.export_module(model), inputs)
        return module, {"first_token_last_layer": notes}

    def metrics(self, outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
        return classification_metrics(outputs, labels)

    # Parity compares argmax of the logits (no task-specific agreement); accuracy heads the tables.
    agreement = None
    primary_metric = "accuracy"

    def export_meta(self) -> dict:
        """Task facts every artifact.json carries (the server and the benchmark read them)."""
        return {"max_length": self.max_length}
