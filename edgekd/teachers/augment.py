"""Perturbed copies of the training texts for the teacher to label (``teacher.augment``).

Task-specific data augmentation for distillation, as in TinyBERT (Jiao et al. 2020): a teacher that
was fine-tuned on the training split is surer on it than elsewhere, so its soft targets there say
little more than the labels; on perturbed texts it is less certain (the base run's teacher: mean top
probability 0.952 on its training texts, 0.917 on their copies), and that is what the student learns
from. TinyBERT replaces words with a masked language model's guesses; no such model is assumed here
(the run may be offline), so each copy is one of two word-level perturbations, chosen at random:

- ``crop``: a contiguous span of the text's words, a fraction of them drawn from ``crop`` (like
  the phrase-level examples of SST);
- ``delete``: the text with each word dropped with probability ``delete_prob``.

A copy's label is the teacher's, never the source text's (a crop of a mixed review may well change
its sentiment). Every copy keeps at least 3 words and drops at least one. Words are split on white
space, so a language written without spaces gets crops and deletions of whole space-free runs;
texts with fewer than ``min_words`` words (4 at least) are left alone.
Copies equal to a labelled text of any split, to another copy, or to a text already taken (the
``teacher.unlabelled`` texts) are dropped, and counted, so no held-out text reaches training.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from edgekd.errors import DataError
from edgekd.recipe import AugmentConfig
from edgekd.teachers.unlabelled import Unlabelled, normal_text


def perturb(words: list[str], op: str, cfg: AugmentConfig, rng: random.Random) -> list[str]:
    """One perturbed copy of ``words`` (4 or more): at least 3 words, and at least one word fewer."""
    floor, most = 3, len(words) - 1
    if op == "crop":
        lo, hi = cfg.crop
        n = min(most, max(floor, round(len(words) * rng.uniform(lo, hi))))
        start = rng.randint(0, len(words) - n)
        return words[start:start + n]
    if op == "delete":
        keep = [i for i in range(len(words)) if rng.random() >= cfg.delete_prob]
        if len(keep) < floor:  # too few survived: a random floor of them, in order
            keep = sorted(rng.sample(range(len(words)), floor))
        elif len(keep) > most:  # none was dropped: drop one
            keep.pop(rng.randrange(len(keep)))
        return [words[i] for i in keep]
    raise ValueError(f"unknown augmentation '{op}'")


def augment_texts(texts: list[str], cfg: AugmentConfig, seed: int, labelled: Iterable[str],
                  taken: Iterable[str] = ()) -> Unlabelled:
    """``cfg.copies`` perturbed copies of each text in ``texts`` (same seed: same copies), minus the
    copies equal to a ``labelled`` or ``taken`` text or to one another."""
    rng = random.Random(seed)
    known = {normal_text(t) for t in labelled} | {normal_text(t) for t in taken}
    made: set[str] = set()
    counts = {"source_texts": len(texts), "too_short": 0, "made": 0, "dropped_in_labelled_data": 0,
              "dropped_duplicates": 0}
    ops = {op: 0 for op in cfg.ops}
    out: list[str] = []
    for text in texts:
        words = text.split()
        if len(words) < cfg.min_words:
            counts["too_short"] += 1
            continue
        for _ in range(cfg.copies):
            op = rng.choice(cfg.ops)
            copy = " ".join(perturb(words, op, cfg, rng))
            counts["made"] += 1
            key = normal_text(copy)
            if key in known or key in made:
                counts["dropped_in_labelled_data" if key in known else "dropped_duplicates"] += 1
                continue
            made.add(key)
            ops[op] += 1
            out.append(copy)
    if not out:
        raise DataError(f"teacher.augment: no copies left ({counts}); the training texts may be shorter than "
                        f"teacher.augment.min_words ({cfg.min_words} words)")
    return Unlabelled(out, "augment:" + "+".join(cfg.ops), None, {**counts, **{f"kept_{k}": v for k, v in ops.items()}})
