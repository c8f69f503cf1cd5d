"""Text classification: encoder teachers (families in edgekd.encoders) and DistilBERT-style students."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from edgekd.errors import RecipeError, StageError
from edgekd.export.base import ModelIO

log = logging.getLogger(__name__)

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
# A saved classification head against the run's labels


def _norm(name: Any) -> str:
    return str(name).strip().casefold()


def numbered_only(names: list[str]) -> bool:
    """Names that only number the outputs: transformers' default LABEL_0, LABEL_1, ... (any case), or integer
    ids in increasing order (the names a dataset with integer labels gets, e.g. 0, 1)."""
    normed = [_norm(n) for n in names]
    if normed and all(n == f"label_{i}" for i, n in enumerate(normed)):
        return True
    try:
        ints = [int(n) for n in normed]
    except ValueError:
        return False
    return bool(ints) and all(a < b for a, b in zip(ints, ints[1:], strict=False))


HeadKind = Literal["none", "same", "reordered", "numbered", "other_count", "other_names"]


@dataclass(frozen=True)
class HeadMatch:
    """How a saved classifier's outputs line up with the run's labels (:func:`match_head`).

    ``same``: the run's labels in the run's order (names compared without case); ``reordered``: the
    run's labels in another order, ``order[i]`` the head's output row of run label i; ``numbered``: one
    side's names only number the outputs (LABEL_0, ... or 0, 1, ...), so row i is read as run label i;
    ``other_count`` / ``other_names``: a head trained for other labels; ``none``: no classification head."""

    kind: HeadKind
    head_labels: tuple[str, ...] = ()
    order: tuple[int, ...] = ()
    config: Any = field(default=None, compare=False, repr=False)

    @property
    def usable(self) -> bool:
        return self.kind in ("same", "reordered", "numbered")

    def mismatch(self, run_labels: list[str]) -> str:
        """What is wrong with a head for other labels (``kind`` other_count or other_names)."""
        head, run = list(self.head_labels), list(run_labels)
        if self.kind == "other_count":
            return f"its classification head is for {len(head)} labels {head}, and this run's data has {len(run)} {run}"
        return (f"its classification head is for the labels {head}, and this run's data has {run}: no name "
                "matches up, so which output is which label is unknown")

    def refusal(self, where: str, run_labels: list[str]) -> str:
        """Why a head for other labels is not this run's, and what to give instead."""
        return (f"{where}: {self.mismatch(run_labels)}. Use a classifier trained for these labels; or, if its "
                "outputs are these labels under other names, set id2label in its config.json to the data's names "
                "in the order of its outputs; or give the model without its head (the base model it was "
                "fine-tuned from), which edgekd fine-tunes for these labels (teacher.finetune) or trains as the "
                "student.")


def match_head(config: Any, run_labels: list[str]) -> HeadMatch:
    """Compare the head a config describes (``architectures``, ``id2label``) with the run's labels."""
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return HeadMatch("none", config=config)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    n = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
    head = tuple(id2label.get(i, f"LABEL_{i}") for i in range(n))
    run = list(run_labels)
    if len(head) != len(run):
        return HeadMatch("other_count", head, config=config)
    h_norm, r_norm = [_norm(x) for x in head], [_norm(x) for x in run]
    if h_norm == r_norm:
        return HeadMatch("same", head, tuple(range(n)), config=config)
    if len(set(h_norm)) == n and set(h_norm) == set(r_norm):
        return HeadMatch("reordered", head, tuple(h_norm.index(x) for x in r_norm), config=config)
    if numbered_only(list(head)) or numbered_only(run):
        return HeadMatch("numbered", head, tuple(range(n)), config=config)
    return HeadMatch("other_names", head, config=config)


def classifier_output_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last linear layer of the classification head (outside the encoder) with one output row per label:
    BERT/ALBERT/DeBERTa/ModernBERT ``classifier``, RoBERTa/XLM-R/ELECTRA/MPNet ``classifier.out_proj``,
    DistilBERT ``classifier`` (after its ``pre_classifier``)."""
    n = int(model.config.num_labels)
    base = model.base_model
    inside = {id(m) for m in base.modules()} if base is not model else set()
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == n and id(m) not in inside]
    if not found:
        raise StageError(f"{type(model).__name__}: no linear layer of the classification head has {n} outputs, "
                         "so its rows cannot be put in the run's label order")
    return found[-1]


@torch.no_grad()
def reorder_head(model: nn.Module, order: list[int]) -> str:
    """Put the classifier's output rows in ``order`` (new row i = old row ``order[i]``), in place, and check
    on one input that the logits are the old ones in that order. Returns the layer's name."""
    name, out = classifier_output_layer(model)
    n = int(model.config.num_labels)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    ids = (torch.arange(8) % vocab if vocab else torch.zeros(8, dtype=torch.long)).unsqueeze(0)
    ids = ids.to(out.weight.device)
    was_training = model.training
    model.eval()
    try:
        before = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        index = torch.tensor(order, device=out.weight.device)
        out.weight.copy_(out.weight[index].clone())
        if out.bias is not None:
            out.bias.copy_(out.bias[index].clone())
        after = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        model.train(was_training)
    if after.shape[-1] != n or not torch.allclose(after, before[:, index], atol=1e-5, rtol=1e-4):
        raise StageError(f"{type(model).__name__}: reordering the rows of {name} did not reorder the logits: "
                         "its classification head is not the linear layer edgekd found")
    return name


def align_head(model: nn.Module, match: HeadMatch, run_labels: list[str]) -> str | None:
    """Make a usable head (``match``) the run's: rows in the run's label order, id2label/label2id the run's
    names. Returns what was done when the outputs were not already the run's labels in order, else None."""
    note = None
    if match.kind == "reordered":
        layer = reorder_head(model, list(match.order))
        note = (f"its classification head lists the run's labels in another order {list(match.head_labels)}; "
                f"the output rows of {layer} are put in the run's order {list(run_labels)}")
    elif match.kind == "numbered":
        note = (f"its classification head's labels {list(match.head_labels)} and the run's {list(run_labels)} "
                "are told apart by position only (one side only numbers them): output i is read as the run's "
                "label i. If that is wrong, set id2label in its config.json to the data's names in the order of "
                "its outputs")
    elif match.kind != "same":
        raise StageError(f"align_head: a head of kind {match.kind!r} is not this run's")
    id2label = dict(enumerate(run_labels))
    model.config.id2label = id2label
    model.config.label2id = {v: k for k, v in id2label.items()}
    return note


# ---------------------------------------------------------------------------------------------
# What a model's config and tokenizer allow, read without a download

# Position ids that start after the padding id (RoBERTa's numbering): padding_idx + 1 positions go unused.
_PADDED_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "roberta-prelayernorm",
                     "ibert", "xmod", "lilt", "markuplm", "luke", "longformer", "mpnet"}
_MPNET_PADDING_IDX = 1  # MPNet's embeddings fix padding_idx at 1, whatever pad_token_id says


def max_tokens(config: Any) -> tuple[int, str] | None:
    """The most tokens one text may have for a model of ``config``, and why; None when nothing bounds it here
    (no ``max_position_embeddings``, rotary positions (ModernBERT), DeBERTa's relative positions only)."""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    model_type = getattr(config, "model_type", "")
    if model_type == "modernbert" or getattr(config, "position_embedding_type", None) == "rotary":
        return None
    if model_type in ("deberta", "deberta-v2") and not getattr(config, "position_biased_input", True):
        return None
    if model_type in _PADDED_POSITIONS:
        pad = _MPNET_PADDING_IDX if model_type == "mpnet" else getattr(config, "pad_token_id", None)
        pad = 1 if pad is None else int(pad)
        return n - pad - 1, (f"max_position_embeddings {n}, of which the first {pad + 1} are never used: "
                             f"{model_type} numbers positions from its padding id {pad} + 1")
    return n, f"max_position_embeddings {n}"


def max_length_problem(config: Any, max_length: int, where: str | None, source: str) -> str | None:
    """``data.max_length`` against the positions of ``source`` (named by the recipe key ``where``), or None
    when it fits."""
    limit = max_tokens(config)
    if limit is None or max_length <= limit[0]:
        return None
    who = f"{where} ({source})" if where else f"the model {source}"
    return (f"data.max_length: {max_length} tokens per text, and {who} has positions for "
            f"{limit[0]} ({limit[1]}): set data.max_length to {limit[0]} or less")


def local_source(source: str) -> str | None:
    """Where ``source`` can be read from without a download (a local folder, a named asset's cached copy, a
    hub id as loaded with ``local_files_only``), or None when only a download would give it."""
    from edgekd import assets

    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    if assets.is_named_asset(source):
        asset = assets.get_asset(source)
        if asset.kind != "model":
            return None
        m = asset.mirror
        final = assets.mirror_dir(asset)
        if (final / m.key_file).is_file():
            return str(final / m.member.rstrip("/"))
        return asset.hub_id or None
    return source


def _from_local(source: str, auto_class: str) -> Any | None:
    """``transformers.<auto_class>.from_pretrained`` of ``source`` when it is on this machine (see
    :func:`local_source`), else None: never a download."""
    where = local_source(source)
    if where is None:
        return None
    try:
        import transformers

        return getattr(transformers, auto_class).from_pretrained(where, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or no such file: the stage that loads it downloads and checks
        return None


def local_config(source: str) -> Any | None:
    """The config of ``source`` when it is on this machine (see :func:`local_source`), else None."""
    return _from_local(source, "AutoConfig")


def local_tokenizer(source: str) -> Any | None:
    """The tokenizer of ``source`` when it is on this machine (see :func:`local_source`), else None."""
    return _from_local(source, "AutoTokenizer")


def head_reordered(source: str | None, run_labels: Callable[[], list[str]]) -> bool:
    """Whether the model ``source`` (read without a download) has a head for the run's labels (``run_labels()``,
    asked only for a classifier) in another order, which :meth:`TextClassificationTask.load_model` puts in the
    run's order: the stage fingerprints mark it, since such a model was used as it was before 2026-12-07."""
    config = local_config(source) if source else None
    if config is None or not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return False
    return match_head(config, run_labels()).kind == "reordered"


# Texts whose ids show the usual ways two tokenizers part: case, accents, punctuation, digits, scripts, emoji,
# a long rare word, whitespace, and one text longer than any max_length (truncation).
PROBE_TEXTS = (
    "The movie was GREAT, but the ending... not so much!",
    "Café naïve résumé über Straße — déjà vu",
    "It's 3:45pm on 2024-01-02; costs $1,234.56 (approx. 10%).",
    "東京タワー 서울 Москва عربى ελληνικά",
    "emoji 😀👍🏽 and symbols © ™ ∑ ≠",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "  multiple   spaces\tand\nnewlines  ",
    "[CLS] [SEP] <s> </s> [MASK] <mask>",
    " ".join(["word"] * 5000),
)


def tokenizer_difference(teacher_tok: Any, student_tok: Any, max_length: int, texts: list[str] | tuple = ()) -> str | None:
    """How the student's tokenizer gives other ids than the teacher's (vocabulary, padding id, the ids of
    ``PROBE_TEXTS`` and ``texts`` as the task tokenizes them), or None when they agree."""
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    if a != b:
        moved = sum(1 for t, i in a.items() if b.get(t) != i)
        return (f"their vocabularies differ ({len(a)} and {len(b)} tokens; {moved} of the teacher's tokens have "
                "another id or none in the student's)")
    if (teacher_tok.pad_token_id or 0) != (student_tok.pad_token_id or 0):
        return f"their padding ids differ ({teacher_tok.pad_token_id} and {student_tok.pad_token_id})"
    task = TextClassificationTask([], max_length)
    probes = [*PROBE_TEXTS, *texts]
    for text, ids_a, ids_b in zip(probes, task.tokenize(teacher_tok, probes), task.tokenize(student_tok, probes),
                                  strict=True):
        if list(ids_a) != list(ids_b):
            shown = text if len(text) <= 60 else text[:57] + "..."
            return (f"they tokenize {shown!r} differently (ids {list(ids_a)[:12]} and {list(ids_b)[:12]}): the "
                    "same vocabulary, normalised or split otherwise")
    return None


def student_tokenizer_problem(student: str, teacher: str, why: str) -> str:
    """The refusal of a student.model whose tokenizer gives other ids than the teacher's (``why``)."""
    return (f"student.model: the tokenizer of {student} gives other token ids than the teacher's ({teacher}): {why}. "
            "The distill stage trains the student on its own tokenizer's ids, but eval, prune, export parity, "
            "quantization calibration, the out-of-domain set and the bench feed it the teacher's: use a student "
            "that shares the teacher's tokenizer (the same vocabulary and normalisation, e.g. leave student.model "
            "out to copy teacher layers, or set student.layers), or a teacher with the student's tokenizer")


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

    def head_match(self, source: str | Path) -> HeadMatch:
        """How the classification head saved with ``source`` (config.json only) lines up with the run's labels."""
        from transformers import AutoConfig

        return match_head(AutoConfig.from_pretrained(self.resolve(source)), self.label_names)

    def has_task_head(self, source: str | Path) -> bool:
        """``source`` is a classifier for the run's labels (by name, in any order, or numbered only):
        it is loaded as it is (rows reordered) and not fine-tuned. A head for other labels is refused
        by ``load_model``."""
        return self.head_match(source).usable

    def _label_maps(self) -> dict:
        id2label = dict(enumerate(self.label_names))
        return {"num_labels": len(self.label_names), "id2label": id2label,
                "label2id": {v: k for k, v in id2label.items()}}

    def load_model(self, source: str | Path, where: str | None = None) -> nn.Module:
        """Load a sequence classifier; a model without a head gets a fresh one for our labels. A head for
        the run's labels in another order gets its output rows put in the run's order; one whose labels
        are only numbered (LABEL_0, ...) is read by position; one for other labels is refused (``where``:
        the recipe key that names ``source``, for the message)."""
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        path = self.resolve(source)
        match = self.head_match(path)
        self.check_positions(match.config, source, where)
        if match.kind == "none":
            # A fresh head is expected here: silence transformers' "newly initialized" notice for this call.
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                return AutoModelForSequenceClassification.from_pretrained(path, **self._label_maps())
            finally:
                hf_logging.set_verbosity(verbosity)
        if not match.usable:
            raise RecipeError([match.refusal(f"{where} ({source})" if where else f"the model {source}",
                                             self.label_names)])
        model = AutoModelForSequenceClassification.from_pretrained(path)
        note = align_head(model, match, self.label_names)
        if note:
            log.warning("%s: %s", f"{where} ({source})" if where else str(source), note)
        return model

    def check_positions(self, config: Any, source: str | Path, where: str | None = None) -> None:
        """Refuse ``max_length`` tokens where the model has fewer positions (before anything trains)."""
        problem = max_length_problem(config, self.max_length, where, str(source)) if config is not None else None
        if problem:
            raise RecipeError([problem])

    def load_tokenizer(self, source: str | Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.resolve(source))

    def build_student(self, teacher: nn.Module, layers: list[int]) -> nn.Module:
        """DistilBERT-style student: same width, the teacher's ``layers`` only, every weight copied, then
        checked block by block against the teacher (edgekd.encoders: where each family keeps its blocks)."""
        from edgekd.students import build_student

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
