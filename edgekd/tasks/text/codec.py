"""The text classifiers' serving codec: texts in, token arrays out; logits in, labels out. No torch.

It follows ``edgekd.serving.codec.Codec`` (the loader picks it through this family's ``serve.py``).

Tokenisation uses the ``tokenizers`` library on the export folder's ``tokenizer.json`` (the file a
fast Hugging Face tokenizer saves). Only a folder without one falls back to
``transformers.AutoTokenizer`` (which may import torch: re-export with a fast tokenizer to avoid it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from edgekd.errors import StageError
from edgekd.export.base import ARTIFACT_META
from edgekd.serving.codec import label_names, softmax
from edgekd.serving.errors import TextTooLongError

if TYPE_CHECKING:
    from edgekd.export.base import Runner
    from edgekd.serving.settings import ServeSettings

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Encoded:
    """One tokenised text: its token ids (special tokens included) and whether it was cut."""

    ids: tuple[int, ...]
    truncated: bool


@dataclass(frozen=True)
class Prediction:
    """One text's answer, with the names of ``POST /predict``'s."""

    label: str
    score: float
    probabilities: dict[str, float]
    truncated: bool  # the text had more than max_length tokens and was cut (with overflow: truncate)


class _FastTokenizer:
    """``tokenizers.Tokenizer`` with truncation on and padding off (padding is done per batch)."""

    def __init__(self, path: Path, max_length: int):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str]) -> list[tuple[list[int], bool]]:
        # ``overflowing`` holds the cut-off pieces, so a non-empty list means the text was truncated.
        # One text: ``encode``, not ``encode_batch``, whose thread pool hand-off costs more than
        # the text itself, the more so when the runner keeps the other cores busy.
        encs = [self._tok.encode(texts[0])] if len(texts) == 1 else self._tok.encode_batch(list(texts))
        return [(enc.ids, bool(enc.overflowing)) for enc in encs]

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def special_ids(self) -> set[int]:
        """Its special tokens' ids ([CLS], [SEP], [PAD], [MASK]...), the unknown token's left out: it stands
        for characters the vocabulary lacks, which are text."""
        ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        unk = getattr(self._tok.model, "unk_token", None)
        return ids - {self._tok.token_to_id(unk) if isinstance(unk, str) else None}


class _AutoTokenizer:
    """Fallback for export folders without tokenizer.json (slow tokenizers, sentencepiece models)."""

    def __init__(self, folder: Path, max_length: int):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # the serve extra ships tokenizers only
            raise StageError(
                f"{folder} has no tokenizer.json and transformers is not installed to read its other "
                "tokenizer files: re-export the model with a fast tokenizer, or pip install transformers."
            ) from e
        self._tok = AutoTokenizer.from_pretrained(str(folder))
        self.max_length = max_length
        self.vocab_size = len(self._tok)

    def encode(self, texts: Sequence[str]) -> list[tuple[list[int], bool]]:
        out = self._tok(list(texts), truncation=True, max_length=self.max_length)
        full = self._tok(list(texts), truncation=False)["input_ids"]
        return [(ids, len(f) > len(ids)) for ids, f in zip(out["input_ids"], full, strict=True)]

    def token_id(self, token: str) -> int | None:
        tid = self._tok.convert_tokens_to_ids(token)
        return None if tid == self._tok.unk_token_id and token != self._tok.unk_token else tid

    def special_ids(self) -> set[int]:
        """As ``_FastTokenizer.special_ids``."""
        return set(self._tok.all_special_ids) - {self._tok.unk_token_id}


def _pad_id(folder: Path, tok: _FastTokenizer | _AutoTokenizer) -> int:
    pad_token = None
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        pad_token = json.loads(cfg.read_text()).get("pad_token")
        if isinstance(pad_token, dict):  # AddedToken serialised as a dict
            pad_token = pad_token.get("content")
    for candidate in (pad_token, "[PAD]", "<pad>"):
        if candidate and (tid := tok.token_id(candidate)) is not None:
            return tid
    return 0


class TextCodec:
    """Tokenise texts into the runner's int64 inputs and turn logits into predictions."""

    task: ClassVar[str] = "text-classification"
    accepts: ClassVar[str] = "texts"

    def __init__(
        self,
        tokenizer: _FastTokenizer | _AutoTokenizer,
        *,
        max_length: int,
        overflow: Literal["truncate", "reject"],
        pad_id: int,
        input_names: Sequence[str],
        labels: Sequence[str],
    ):
        unknown = [n for n in input_names if n not in TOKEN_INPUTS]
        if unknown:
            raise StageError(
                f"the artifact takes input(s) {unknown}, which a text server cannot fill; "
                f"text models take {', '.join(TOKEN_INPUTS)}."
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.overflow = overflow
        self.pad_id = pad_id
        self.input_names = tuple(input_names)
        self.labels = list(labels)
        self.vocab_size = tokenizer.vocab_size

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """The ids no text content gives: the tokens added around every text, padding and the tokenizer's
        other special tokens (not the unknown token: characters missing from the vocabulary are text)."""
        return frozenset(set(self.tokenizer.encode([""])[0][0]) | {self.pad_id} | self.tokenizer.special_ids())

    def without_content(self, items: Sequence[Encoded]) -> int | None:
        """The index of the first encoded text that holds special tokens only (its characters were all
        dropped by the normalizer: zero-width spaces, byte-order marks, control or format characters), or None."""
        special = self.special_ids
        return next((i for i, it in enumerate(items) if all(t in special for t in it.ids)), None)

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        *,
        max_length: int,
        overflow: Literal["truncate", "reject"],
        input_names: Sequence[str],
        labels: Sequence[str],
    ) -> TextCodec:
        folder = Path(folder)
        tok_file = folder / "tokenizer.json"
        tok = _FastTokenizer(tok_file, max_length) if tok_file.is_file() else _AutoTokenizer(folder, max_length)
        return cls(tok, max_length=max_length, overflow=overflow, pad_id=_pad_id(folder, tok),
                   input_names=input_names, labels=labels)

    @classmethod
    def for_artifact(cls, folder: Path, meta: dict[str, Any], runner: Runner, settings: ServeSettings) -> TextCodec:
        """The codec of a served text export: max_length from the settings, bounded by the artifact's;
        one text is run through the runner so that outputs not fitting the metadata fail at load."""
        from edgekd.serving.settings import refuse_unread

        refuse_unread(settings, ("max_images", "max_image_pixels"),
                      f"only a detection export reads it, and {folder} is a text export")
        artifact_max = meta.get("max_length")
        max_length = settings.max_length or artifact_max
        if max_length is None:
            raise StageError(
                f"{folder / ARTIFACT_META} records no max_length (the longest input the model takes): "
                "set max_length in the server settings, or re-export with the task's max_length."
            )
        if artifact_max and max_length > int(artifact_max):
            raise StageError(
                f"max_length={max_length} exceeds the artifact's max_length={artifact_max} (the longest input it "
                f"was exported and checked for): set max_length to at most {artifact_max}."
            )
        codec = cls.from_folder(folder, max_length=int(max_length), overflow=settings.overflow,
                                input_names=list(runner.input_names), labels=label_names(meta))
        codec.warm_up(runner)
        return codec

    def warm_up(self, runner: Runner) -> None:
        """One real call: catches an artifact whose outputs do not fit its metadata before serving."""
        out = runner.run(self.pad(self.encode(["warm up"])))
        name = self.select_outputs(list(out))[0]
        logits = np.asarray(out[name])
        if not self.labels:
            if logits.ndim != 2:
                raise StageError(f"the model returned {name} of shape {list(logits.shape)}; a classifier returns "
                                 "[batch, labels].")
            self.labels = [f"LABEL_{i}" for i in range(logits.shape[1])]
        self.probabilities(logits)

    def select_outputs(self, output_names: Sequence[str]) -> tuple[str, ...]:
        return ("logits",) if "logits" in output_names else (output_names[0],)

    def facts(self) -> dict[str, Any]:
        return {"task": self.task, "inputs": self.accepts, "max_length": self.max_length, "overflow": self.overflow}

    # --- text -> arrays ----------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        items = [Encoded(tuple(ids), cut) for ids, cut in self.tokenizer.encode(texts)]
        if self.overflow == "reject":
            for i, item in enumerate(items):
                if item.truncated:
                    raise TextTooLongError(i, self.max_length)
        return items

    def pad(self, items: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """Pad to the longest item of this batch (not to max_length), int64, with attention mask 0
        on padding, so that a text gets the same logits whatever batch it runs in. (Runners of
        fixed-shape artifacts pad further to their planned shape themselves.)"""
        width = max(len(it.ids) for it in items)
        ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for row, it in enumerate(items):
            ids[row, : len(it.ids)] = it.ids
            mask[row, : len(it.ids)] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: arrays[name] for name in self.input_names}

    # --- logits -> predictions ---------------------------------------------------------------------
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise StageError(
                f"the model returned logits of shape {list(logits.shape)}, expected [batch, {len(self.labels)}] "
                "(one score per label in artifact.json): the artifact and its metadata do not match."
            )
        return softmax(logits)

    def predictions(self, logits: np.ndarray, items: Sequence[Encoded]) -> list[Prediction]:
        """One Prediction per row of ``logits``, the answer to the encoded text ``items`` of that row."""
        probs = self.probabilities(logits)
        top = probs.argmax(axis=-1).tolist()
        labels = self.labels
        return [
            Prediction(label=labels[k], score=p[k], probabilities=dict(zip(labels, p, strict=True)),
                       truncated=it.truncated)
            for p, k, it in zip(probs.tolist(), top, items, strict=True)  # Python floats, converted in one call
        ]
