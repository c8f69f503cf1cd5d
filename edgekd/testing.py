"""Tiny random models and data built in code, for tests and quick offline trials.

Nothing here touches the network: the vocabulary is written by the code and the weights are
random (seeded).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

WORDS = (
    "good great fine superb wonderful moving brilliant lovely fun warm "
    "bad awful dull boring weak poor messy tedious flat bland "
    "the a movie film plot story actor scene is was and but not very quite too it this"
).split()
POSITIVE = set(WORDS[:10])
NEGATIVE = set(WORDS[10:20])


def write_vocab(path: Path) -> Path:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path = Path(path)
    path.write_text("\n".join(special + WORDS) + "\n")
    return path


def tiny_bert(out_dir: str | Path, num_layers: int = 2, hidden: int = 32, heads: int = 4,
              intermediate: int = 64, num_labels: int | None = None, seed: int = 0) -> Path:
    """Save a tiny random BERT (and its tokenizer) to ``out_dir`` in Hugging Face format.

    With ``num_labels`` it is a ``BertForSequenceClassification`` (has a task head); without,
    a bare ``BertModel``, like the default teacher before fine-tuning.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(out / "vocab.txt")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    cfg = BertConfig(
        vocab_size=len(vocab.read_text().split()),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    if num_labels:
        cfg.num_labels = num_labels
        cfg.id2label = {0: "negative", 1: "positive"} if num_labels == 2 else {i: f"label_{i}" for i in range(num_labels)}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        model = BertForSequenceClassification(cfg)
    else:
        model = BertModel(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def classifier_probs(folder: str | Path, texts: list[str], max_length: int = 16):
    """Softmax outputs of the sequence classifier saved in ``folder`` on ``texts``, computed with plain
    transformers (its own tokenizer, padded together): what a test compares edgekd's cached targets with."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgekd.teachers.combine import softmax

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        enc = tok(texts, return_tensors="pt", truncation=True, max_length=max_length, padding=True)
        return softmax(model(**enc).logits.numpy())


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Short synthetic reviews whose label follows their sentiment words (learnable, not trivial)."""
    rng = random.Random(seed)
    pos, neg = sorted(POSITIVE), sorted(NEGATIVE)
    filler = WORDS[20:]
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(pos if label else neg))
        if rng.random() < 0.1:  # a little label noise keeps accuracy below 100%
            label = 1 - label
        rows.append((" ".join(words), label))
    return rows


def write_sentiment_csv(path: str | Path, n: int = 200, seed: int = 0, sep: str = ",") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["text", "label"])
        for text, label in sentiment_rows(n, seed):
            w.writerow([text, "positive" if label else "negative"])
    return path


def _has_classification_head(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    archs = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def tiny_recipe(tmp_path: str | Path, teacher_dir: str | Path, csv_path: str | Path, **sections: dict) -> dict:
    """A quick recipe over a tiny teacher and a small CSV (fp32, short epochs); ``sections`` update
    the recipe's sections key by key, e.g. ``distill={"temperature": 4}``. A teacher that is already a
    classifier gets no fine-tuning keys (nothing would read them)."""
    finetune = {"epochs": 6, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0}
    recipe = {
        "name": "tiny",
        "seed": 3,
        "output_dir": str(Path(tmp_path) / "runs"),
        "data": {"dataset": str(csv_path), "max_length": 16, "split": {"validation": 0.15, "test": 0.15, "seed": 1}},
        "teacher": {"model": str(teacher_dir), **({} if _has_classification_head(teacher_dir) else {"finetune": finetune})},
        "distill": {"alpha": 0.7, "temperature": 2.0, "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3}},
        "runtime": {"precision": "fp32"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def tiny_detector_config():
    """A detector config small enough for tests (a few thousand parameters, 64 px in milliseconds)."""
    from edgekd.tasks.detection.models import DetectorConfig

    return DetectorConfig(channels=(4, 8, 16, 16, 32), depths=(1, 1, 1, 1), box_channels=16, cls_channels=16,
                          reg_max=8)
