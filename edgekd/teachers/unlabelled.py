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
COLUMN_FORMATS = (".csv", ".tsv", ".jsonl", ".json")  # read with text_column; a .txt file is one text per line
TABLES = {".csv": ",", ".tsv": "\t"}


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


def read_rows(path: Path) -> tuple[list[str], list[Any]]:
    """Columns and rows of a .csv/.tsv/.jsonl/.json file as the unlabelled texts are read: a table by the
    labelled data's reader (``edgekd.data.read_table``: quoted line breaks kept, rows with extra fields and
    unbalanced quotes refused), JSON as a list of objects or one object per line. A file that cannot be
    read so is a DataError naming it."""
    suffix = path.suffix.lower()
    try:
        if suffix in TABLES:
            return _read_table_file(path)
        text = path.read_text(encoding="utf-8-sig")  # universal newlines: every line break is \n
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}).") from e
    try:  # lines end at \n only: U+2028 or U+0085 inside a text do not end it
        rows = json.loads(text) if suffix == ".json" and text.lstrip().startswith("[") else [
            json.loads(line) for line in text.split("\n") if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}).") from e
    return sorted({k for r in rows if isinstance(r, dict) for k in r}), rows


def _read_table_file(path: Path) -> tuple[list[str], list[Any]]:
    from edgekd.data import read_table

    try:
        columns, numbered = read_table(path, TABLES[path.suffix.lower()])
    except csv.Error as e:
        raise DataError(f"{path}: malformed {path.suffix.lower()[1:].upper()} ({e}).") from e
    rows = [row for _, row in numbered]
    # A quote opened in the last column and never closed runs to the end of the file as one text, with no
    # column left without a value for read_table to notice: such a text holds a line break (only a quoted
    # field can) and the file does not end with the quote that would close it.
    last = [v for v in rows[-1].values() if isinstance(v, str)] if rows else []
    if last and ("\n" in last[-1] or "\r" in last[-1]) and not path.read_bytes().rstrip().endswith(b'"'):
        start = " ".join(last[-1].split())[:40]
        raise DataError(f"{path}: row {len(rows)} (starting {start!r}) runs on to the end of the file inside a "
                        "quoted text: most likely an unbalanced quote (\") at its start made every line after it one "
                        "text. Close the quote, or quote the whole text and double each quote inside it (\"\"); a "
                        "quote that only appears inside a text can also be removed.")
    return columns, rows


def _read_file(path: Path, column: str) -> list[str]:
    where = "teacher.unlabelled"
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{where}.dataset: {path} has an unsupported type '{suffix}'; use one of {', '.join(FORMATS)}.")
    if not path.is_file():
        raise DataError(f"{where}.dataset: the file {path} does not exist.")
    try:
        if suffix == ".txt":  # universal newlines; lines end at \n only: U+2028 or U+0085 do not split a text
            return [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]
        columns, rows = read_rows(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{where}.dataset: {path} is not UTF-8 text ({e}).") from e
    except DataError as e:
        raise DataError(f"{where}.dataset: {e}") from e
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
