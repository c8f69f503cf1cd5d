"""Extra unlabelled texts for the teacher to label: a named dataset's texts or a local file.

Texts already in the labelled data (any split) are dropped, so no test text reaches training
through the back door; so are duplicates. What was dropped is counted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd.errors import DataError
from edgekd.recipe import DataConfig, UnlabelledConfig
from edgekd.runfolder import sha256_file

FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".txt")


@dataclass
class Unlabelled:
    texts: list[str]
    source: str
    sha256: str | None
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "texts": len(self.texts), **self.counts}


def normal_text(text: str) -> str:
    """Case, spacing and punctuation do not make a text new: the same review quoted ''so'' and "so"
    (two corpora built from the same reviews) is one text."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def _read_file(path: Path, column: str) -> list[str]:
    where = "teacher.unlabelled"
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{where}.dataset: {path} has an unsupported type '{suffix}'; use one of {', '.join(FORMATS)}.")
    if not path.is_file():
        raise DataError(f"{where}.dataset: the file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}.dataset: {path} is not UTF-8 text ({e}).") from e
    if suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="," if suffix == ".csv" else "\t")
        rows: list[Any] = list(reader)
        columns = list(reader.fieldnames or [])
    else:
        try:
            rows = json.loads(text) if suffix == ".json" and text.lstrip().startswith("[") else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{where}.dataset: {path} is not valid JSON ({e}).") from e
        columns = sorted({k for r in rows if isinstance(r, dict) for k in r})
    if column not in columns:
        raise DataError(f"{where}.dataset: {path} has no column '{column}' (columns: {', '.join(columns) or 'none'}); "
                        f"set {where}.text_column.")
    return [str(r[column]) for r in rows if isinstance(r, dict) and isinstance(r.get(column), str)]


def _read_source(name: str, cfg: UnlabelledConfig, data_source: str) -> tuple[list[str], str, str | None]:
    """(texts, source, sha256) of one named dataset or file."""
    from edgekd import assets

    if assets.is_named_asset(name):
        from edgekd.data import UNLABELLED_READERS, load_examples

        if name in UNLABELLED_READERS:  # read whole, every text of the pinned file
            resolved = assets.fetch(name, data_source)  # data.source, as for every named dataset
            return (UNLABELLED_READERS[name](resolved.path),
                    f"{name} ({resolved.source} {resolved.origin}: {assets.get_asset(name).mirror.member})", resolved.key_sha256)
        ex = load_examples(DataConfig(dataset=name, source=data_source))
        return list(ex.texts), ex.source, ex.sha256
    path = Path(name).expanduser()
    return _read_file(path, cfg.text_column), f"file:{path.resolve()}", sha256_file(path)


def load_unlabelled(cfg: UnlabelledConfig, labelled_texts: list[str], data_source: str = "auto") -> Unlabelled:
    """The texts of ``cfg.dataset`` (each source in order) minus any in ``labelled_texts`` and minus
    repeats, in file order."""
    parts = [_read_source(name, cfg, data_source) for name in cfg.sources()]
    raw = [t for texts, _, _ in parts for t in texts]
    source = " + ".join(src for _, src, _ in parts)
    digests = [d for _, _, d in parts]
    if len(parts) == 1:
        digest = digests[0]
    else:  # one digest for the whole list: each source's, in order
        digest = None if None in digests else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    labelled = {normal_text(t) for t in labelled_texts}
    kept: set[str] = set()
    counts = {"read": len(raw), "dropped_in_labelled_data": 0, "dropped_duplicates": 0, "dropped_empty": 0}
    texts: list[str] = []
    for t in raw:
        key = normal_text(t)
        if not key:
            counts["dropped_empty"] += 1
        elif key in labelled:
            counts["dropped_in_labelled_data"] += 1
        elif key in kept:
            counts["dropped_duplicates"] += 1
        else:
            kept.add(key)
            texts.append(t.strip())
    if cfg.max_examples is not None and len(texts) > cfg.max_examples:
        counts["dropped_over_max_examples"] = len(texts) - cfg.max_examples
        texts = texts[: cfg.max_examples]
    if not texts:
        raise DataError(f"teacher.unlabelled.dataset {cfg.dataset!r}: no texts left after removing those already "
                        f"in the labelled data ({counts}).")
    return Unlabelled(texts, source, digest, counts)
