"""The teacher stage beyond one local model: black boxes, ensembles, unlabelled texts and perturbed copies.

Every teacher answers for the training split, the extra unlabelled texts, the validation and the
test split; the answers become one soft target per text (``combine``), stored as log-probabilities
in the run folder beside what the distill and eval stages read:

- ``train_logits.npy``: the training split's rows, then one row per unlabelled text, then one per
  perturbed copy of a training text (``teacher.augment``);
- ``validation_logits.npy``, ``test_logits.npy``: the combined teacher on the held-out splits;
- ``targets.json``: whether the targets are hard (every teacher gave labels only), the row counts;
- ``unlabelled.json``: the unlabelled texts and the perturbed copies, in row order;
- ``requests/``: the answer cache of each black box (never asked twice for the same text).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.errors import RecipeError
from edgekd.recipe import TeacherConfig, TeacherEndpoint
from edgekd.runfolder import atomic_write_bytes, atomic_write_text, local_model_digest, sha256_file
from edgekd.teachers.combine import as_probabilities, combine, log_targets

if TYPE_CHECKING:
    from torch import nn

    from edgekd.context import RunContext
    from edgekd.tasks.text.task import TokenizedSplit

STAGE = "teacher"
SPLIT_FILES = {"train": "train_logits.npy", "validation": "validation_logits.npy", "test": "test_logits.npy"}
TARGETS = "targets.json"
UNLABELLED = "unlabelled.json"
CACHE_DIR = "requests"
PARTS = ("train", "unlabelled", "validation", "test")


def member_name(i: int) -> str:
    return "teacher" if i == 0 else f"teacher.ensemble[{i - 1}]"


def input_digests(cfg: TeacherConfig) -> dict[str, Any]:
    """sha256 of the local files the teacher stage reads beyond the recipe (so a changed file reruns it)."""
    out: dict[str, Any] = {}
    for i, m in enumerate(cfg.members()):
        if m.kind == "onnx":
            path = Path(str(m.path)).expanduser()
            meta = (path.parent if path.is_file() else path) / "artifact.json"
            out[member_name(i)] = sha256_file(meta) if meta.is_file() else None
            if out[member_name(i)] and _rows_depend_on_each_other(meta):
                # asked one text per call (whole batches before): a stage recorded earlier redoes its targets
                out[member_name(i)] = {"artifact.json": out[member_name(i)], "rows_per_call": 1}
        elif m.kind == "model" and i > 0 and local_model_digest(m.model):  # the teacher's own: teacher_fingerprint
            out[member_name(i)] = local_model_digest(m.model)
    files = [Path(src).expanduser() for src in cfg.unlabelled.sources()]
    files = [f for f in files if f.is_file()]
    if files:  # one file: its digest, as before lists existed; a list: each file's
        digests = [sha256_file(f) for f in files]
        out["unlabelled"] = digests[0] if isinstance(cfg.unlabelled.dataset, str) else digests
    return out


def _rows_depend_on_each_other(artifact_json: Path) -> bool:
    """Whether the export's precision makes a row's output depend on the rows beside it (dynamic int8)."""
    from edgekd.devices.remote_runner import ROW_DEPENDENT_PRECISIONS

    try:
        meta = json.loads(artifact_json.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("precision")) in ROW_DEPENDENT_PRECISIONS


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _local_outputs(model: nn.Module, tokenizer, texts: dict[str, list[str]], ctx: RunContext,
                   where: str) -> np.ndarray:
    """Logits of a local model for every part, in PARTS order."""
    from edgekd.tasks.text.task import TokenizedSplit
    from edgekd.train import predict

    r = ctx.recipe
    parts = []
    for part in PARTS:
        if not texts[part]:
            continue
        if part != "unlabelled" and tokenizer is ctx.tokenizer:
            data = ctx.tokenized(part)
        else:
            ids = ctx.task.tokenize(tokenizer, texts[part])
            data = TokenizedSplit(ids, np.zeros(len(ids), dtype=np.int64), tokenizer.pad_token_id or 0)
        parts.append(predict(model, data, r.eval.batch_size, f"{where} ({part})", precision=r.runtime.precision))
    return np.concatenate(parts)


def _load_member_model(m: TeacherEndpoint, ctx: RunContext, where: str):
    task = ctx.task
    source = str(getattr(m, "model", None))
    match = task.head_match(source)
    if match.kind == "none":
        raise RecipeError([f"{where}.model: {source} has no {task.name} head; an ensemble member must already be "
                           "fine-tuned (e.g. the teacher/model folder of another run)"])
    if not match.usable:  # a head for other labels: an ensemble member is never fine-tuned
        raise RecipeError([f"{where}.model: {source}: {match.mismatch(task.label_names)}. An ensemble member must "
                           "already be fine-tuned for this run's labels (e.g. the teacher/model folder of another "
                           "run on this data); if its outputs are these labels under other names, set id2label in "
                           "its config.json to the data's names in the order of its outputs"])
    # Rows of a head for the run's labels in another order are put in the run's order, as for the teacher.
    return task.load_model(source, where=f"{where}.model").eval(), task.load_tokenizer(source)


def label_with_teachers(ctx: RunContext, primary: nn.Module | None) -> tuple[dict[str, Any], list[Path]]:
    """Ask every teacher, combine, write the stage files; returns (metrics, files to record)."""
    from edgekd.progress import progress_bar
    from edgekd.teachers.cache import AnswerCache
    from edgekd.teachers.sources import ask_all, open_black_box
    from edgekd.teachers.unlabelled import load_unlabelled

    r, cfg = ctx.recipe, ctx.recipe.teacher
    out_dir = ctx.run.stage_dir(STAGE)
    labels = list(ctx.examples.label_names)
    texts = {part: ctx.splits.texts(part) for part in ("train", "validation", "test")}
    unlabelled = augmented = None
    if cfg.unlabelled.dataset:
        unlabelled = load_unlabelled(cfg.unlabelled, ctx.examples.texts, r.data.source)
        ctx.say(f"[bold]teacher[/]: {len(unlabelled.texts)} unlabelled texts from {unlabelled.source}")
    if cfg.augment.copies:
        from edgekd.teachers.augment import augment_texts

        augmented = augment_texts(texts["train"], cfg.augment,
                                  r.seed if cfg.augment.seed is None else cfg.augment.seed, ctx.examples.texts,
                                  unlabelled.texts if unlabelled else ())
        ctx.say(f"[bold]teacher[/]: {len(augmented.texts)} perturbed copies of the training texts "
                f"({', '.join(cfg.augment.ops)})")
    # The extra rows: the unlabelled texts first, then the perturbed copies.
    extra = [u for u in (unlabelled, augmented) if u]
    texts["unlabelled"] = [t for u in extra for t in u.texts]
    everything = [t for part in PARTS for t in texts[part]]
    bounds = np.cumsum([0] + [len(texts[p]) for p in PARTS])
    rows = {p: slice(int(bounds[i]), int(bounds[i + 1])) for i, p in enumerate(PARTS)}

    probs, members = [], []
    for i, m in enumerate(cfg.members()):
        where = member_name(i)
        t0 = time.perf_counter()
        info: dict[str, Any] = {"name": where, "kind": m.kind, "targets": m.targets, "weight": m.weight}
        if m.kind == "model":
            model, tok = (primary, ctx.tokenizer) if i == 0 else _load_member_model(m, ctx, where)
            assert model is not None
            out = _local_outputs(model, tok, texts, ctx, where)
            kind = "labels" if m.targets == "labels" else "logits"
            answers = out.argmax(axis=1) if kind == "labels" else out
        else:
            box = open_black_box(m, labels, where, cfg.client)
            cache = AnswerCache(out_dir / CACHE_DIR, box.identity)
            try:
                todo = len({t for t in everything if t not in cache})
                with progress_bar(f"{where}: asking {m.kind}", total=todo) as bar:
                    asked = ask_all(box, everything, cache, cfg.client.batch_size, bar.advance)
            finally:
                box.close()
            info.update(asked=asked.asked, from_cache=asked.from_cache, cache_file=str(cache.path.name),
                        **box.stats())
            kind, answers = m.targets, asked.outputs
        p = as_probabilities(answers, kind, len(labels), where)  # type: ignore[arg-type]
        info["validation"] = ctx.task.metrics({"logits": p[rows["validation"]]}, ctx.splits.labels("validation"))
        info["seconds"] = round(time.perf_counter() - t0, 2)
        probs.append(p)
        members.append(info)

    combined, chosen = combine(probs, [m.weight for m in cfg.members()], cfg.combine)
    hard = all(m.targets == "labels" for m in cfg.members())
    logits = log_targets(combined)
    files = []
    train_rows = np.r_[rows["train"], rows["unlabelled"]]
    for split, name in SPLIT_FILES.items():
        _save_npy(out_dir / name, logits[train_rows] if split == "train" else logits[rows[split]])
        files.append(out_dir / name)
    meta = {"hard": hard, "combine": cfg.combine, "train_rows": len(texts["train"]),
            "unlabelled_rows": len(texts["unlabelled"]), "label_names": labels}
    atomic_write_text(out_dir / TARGETS, json.dumps(meta, indent=2))
    files.append(out_dir / TARGETS)
    if extra:
        summary = {"unlabelled": unlabelled.summary() if unlabelled else None,
                   "augmented": augmented.summary() if augmented else None}
        atomic_write_text(out_dir / UNLABELLED, json.dumps({"summary": summary, "texts": texts["unlabelled"]},
                                                           ensure_ascii=False))
        files.append(out_dir / UNLABELLED)
    metrics: dict[str, Any] = {
        "teachers": members,
        "combine": cfg.combine,
        "hard_targets": hard,
        "validation": ctx.task.metrics({"logits": logits[rows["validation"]]}, ctx.splits.labels("validation")),
        "cached_examples": int(len(train_rows)),
    }
    if cfg.combine == "most_confident":
        share = np.bincount(chosen, minlength=len(probs)) / max(1, len(chosen))
        metrics["chosen_share"] = {member_name(i): float(s) for i, s in enumerate(share)}
    start = rows["unlabelled"].start
    for key, u in (("unlabelled", unlabelled), ("augmented", augmented)):
        if u:
            metrics[key] = u.summary()
            metrics[key]["teacher_label_counts"] = np.bincount(
                combined[start:start + len(u.texts)].argmax(axis=1), minlength=len(labels)).tolist()
            start += len(u.texts)
    return metrics, files


# --- what the later stages read --------------------------------------------------------------------------------
@dataclass
class TeacherTargets:
    """Soft targets for every training row: the training split, then the unlabelled texts."""

    logits: np.ndarray
    hard: bool
    train_rows: int
    unlabelled_texts: list[str]

    def teacher_labels(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


def load_targets(ctx: RunContext, logits: np.ndarray) -> TeacherTargets:
    """The teacher stage's targets (``logits`` from its train_logits.npy) with their row layout."""
    out_dir = ctx.run.stage_dir(STAGE)
    meta_path = out_dir / TARGETS
    n_train = len(ctx.splits.train)
    if ctx.recipe.teacher.is_plain() or not meta_path.is_file():
        return TeacherTargets(logits, False, n_train, [])
    meta = json.loads(meta_path.read_text())
    texts = json.loads((out_dir / UNLABELLED).read_text())["texts"] if meta["unlabelled_rows"] else []
    if meta["train_rows"] != n_train or len(logits) != n_train + len(texts):
        raise RecipeError([f"the teacher stage's targets ({meta['train_rows']} + {len(texts)} rows) do not fit this "
                           f"run's training split ({n_train} rows): run `edgekd teacher` again"])
    return TeacherTargets(logits, bool(meta["hard"]), n_train, texts)


def training_split(ctx: RunContext, tokenizer, targets: TeacherTargets) -> TokenizedSplit:
    """The training split plus the unlabelled texts (labelled with the teacher's top label)."""
    from edgekd.tasks.text.task import TokenizedSplit

    train = ctx.tokenized("train", tokenizer)
    if not targets.unlabelled_texts:
        return train
    ids = train.input_ids + ctx.task.tokenize(tokenizer, targets.unlabelled_texts)
    labels = np.concatenate([train.labels, targets.teacher_labels()[targets.train_rows:]])
    return TokenizedSplit(ids, labels, train.pad_id)


def cached_split_logits(ctx: RunContext, split: str) -> np.ndarray | None:
    """The combined teacher's logits on ``split`` when the teacher is not one local model, else None
    (one local model is scored itself, whatever extra texts it labelled: its size and out-of-domain
    accuracy are then measured too)."""
    t = ctx.recipe.teacher
    if t.kind == "model" and not t.ensemble:
        return None
    return np.load(ctx.run.stage_dir(STAGE) / SPLIT_FILES[split])
