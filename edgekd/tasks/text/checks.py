"""What a text-classification recipe names outside itself, checked before any stage runs (see
``edgekd.recipe_check``): local data files exist, hold the named text and label columns and
readable labels; unlabelled texts exist; a local teacher export exists. And the texts a caller hands
the Python API (``require_texts``)."""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekd.errors import DataError, EdgeKDError
from edgekd.recipe import DataConfig, Recipe
from edgekd.sections import changed_keys, it_or_them


def require_texts(texts: Sequence[Any], empty_why: str) -> None:
    """Every item a string with something visible in it; else which one is not, and why it must be."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"text {i} is {type(t).__name__}: give strings.")
        if not t.strip():
            raise DataError(f"text {i} is empty: {empty_why}.")
        if invisible(t):
            raise DataError(f"text {i} has no visible characters, only control or format ones such as "
                            f"{', '.join(sorted({f'U+{ord(c):04X}' for c in t if not c.isspace()})[:3])} (zero-width "
                            f"space, byte-order mark, soft hyphen...), which tokenizers drop: {empty_why}.")


def invisible(text: str) -> bool:
    """Whether every character of ``text`` is whitespace, a control (Cc) or a format (Cf) character:
    nothing a tokenizer keeps (BERT's normalizer drops Cc and Cf, and splits on whitespace)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def _columns(path: Path) -> list[str]:
    """Column names of a local table (header row or object keys), read the way the loader reads them."""
    from edgekd.data import FILE_FORMATS, read_json, read_table

    fmt = FILE_FORMATS[path.suffix.lower()]
    if fmt in ("csv", "tsv"):
        return read_table(path, "," if fmt == "csv" else "\t")[0]
    return read_json(path, jsonl=fmt == "jsonl")[0]


# The splits a named dataset's hub copy brings beside train (cornell-movie-review-data/rotten_tomatoes: train,
# validation, test); its pinned mirror brings none. Only data.source: hub is sure to read the hub copy (auto
# falls back to the mirror), so edgekd.splits.split_examples refuses the same keys when it meets the splits.
HUB_SPLITS = {"rotten-tomatoes": ("validation", "test")}


def _check_text_data(recipe: Recipe) -> list[str]:
    from edgekd import assets

    d = recipe.data
    if assets.is_named_asset(d.dataset):
        unread = changed_keys(d, prefix="data.", keys=("hub_config", "text_column", "label_column",
                                                      "normalize_labels", "drop_duplicates"))
        return ([f"{', '.join(unread)}: only a local file or a Hugging Face id is read with it, and '{d.dataset}' is "
                 "a named dataset, read as pinned (its own columns and labels, repeated texts dropped): remove "
                 f"{it_or_them(unread)}"] if unread else []) + _check_hub_splits(recipe)
    path = Path(d.dataset).expanduser()
    problems = []
    if changed_keys(d, keys=("source",)):
        named = sorted(n for n, a in assets.ASSETS.items() if a.kind == "dataset")
        problems.append(f"data.source: chooses where a named dataset comes from, and '{d.dataset}' is not one "
                        f"(named: {', '.join(named)}): remove it")
    if path.is_file() and d.hub_config is not None:
        problems.append(f"data.hub_config: names a Hugging Face dataset's configuration, and {path} is a local "
                        "file: remove it")
    return problems + _check_local_data(d, path)


def _check_hub_splits(recipe: Recipe) -> list[str]:
    """data.split keys that the hub copy of a named dataset (data.source: hub) leaves unread: the fractions of
    the splits it brings, and the seed where it brings both and nothing else draws with it (a cut of
    data.max_train_examples, the quantize stage's calibration sample)."""
    d = recipe.data
    own = HUB_SPLITS.get(d.dataset, ()) if d.source == "hub" else ()
    if not own:
        return []
    keys = own
    if set(own) == {"validation", "test"} and d.max_train_examples is None and not calibrates(recipe):
        keys += ("seed",)
    unread = changed_keys(d.split, keys=keys, prefix="data.split.")
    if not unread:
        return []
    return [f"{', '.join(unread)}: cut(s) splits out of the training rows, and '{d.dataset}' from the hub (data.source: "
            f"hub) brings its own {' and '.join(own)} split(s), kept as they are"
            + (" (and no data.max_train_examples or calibration sample draws with the seed)"
               if "data.split.seed" in unread else "")
            + f": remove {it_or_them(unread)}, or set data.source: mirror (the pinned copy, which has no splits)"]


def calibrates(recipe: Recipe) -> bool:
    """Whether the quantize stage draws a calibration sample (seeded by data.split.seed): a static or smoothed
    setup of the ONNX export (of the recipe's own targets too, where one command exports others for once)."""
    q = recipe.quantize
    setups = [q, *(q.with_candidate(c) for c in q.candidates)]
    return q.enabled and "onnx" in recipe.exported_targets() and any(
        s.method == "static" or s.smooth_alpha is not None for s in setups)


def _check_local_data(d: DataConfig, path: Path) -> list[str]:
    from edgekd.data import FILE_FORMATS, looks_like_path

    if path.is_dir():
        return [f"data.dataset: {path} is a folder; give a {', '.join(FILE_FORMATS)} file, a named dataset or a hub id"]
    if not path.is_file():
        # A name that does not look like a path is a Hugging Face id: checked when it is downloaded.
        return [f"data.dataset: the file {path} does not exist"] if looks_like_path(d.dataset) else []
    if path.suffix.lower() not in FILE_FORMATS:
        return [f"data.dataset: {path} has an unsupported type '{path.suffix}' (supported: {', '.join(FILE_FORMATS)})"]
    try:
        columns = _columns(path)
    except (EdgeKDError, UnicodeDecodeError, ValueError) as e:
        return [f"data.dataset: {path} cannot be read: {e}"]
    problems = [
        f"{key}: {path} has no column '{col}' (columns: {', '.join(map(str, columns)) or 'none'})"
        for key, col in (("data.text_column", d.text_column), ("data.label_column", d.label_column))
        if col not in columns
    ]
    if problems:
        return problems
    try:  # the loader's own validation: empty texts, unreadable or missing labels, too few classes
        _load_local(d, path)
    except EdgeKDError as e:
        return [f"data.dataset / data.label_column: {e}"]
    return []


def _load_local(d: DataConfig, path: Path):
    """The local file read as the run reads it (``edgekd.data.load_examples``: the same columns, label
    spellings and repeated texts), once per check of an unchanged file."""
    stat = path.stat()
    found = _load_local_cached(path, (str(path.resolve()), stat.st_mtime_ns, stat.st_size), d.text_column,
                               d.label_column, d.normalize_labels, d.drop_duplicates)
    if isinstance(found, EdgeKDError):
        raise found
    return found


@functools.lru_cache(maxsize=1)
def _load_local_cached(path: Path, file_state: tuple, text_column: str, label_column: str, normalize_labels: bool,
                       drop_duplicates: bool):
    """The examples, or the error loading them gave (kept too, so a bad file is read and warned about once)."""
    from edgekd.data import load_file

    try:
        return load_file(path, text_column, label_column, normalize_labels=normalize_labels,
                         drop_duplicates=drop_duplicates)
    except EdgeKDError as e:
        return e


def _check_unlabelled(recipe: Recipe) -> list[str]:
    """Each unlabelled file is of a type the teacher stage reads and read as it reads it (so a bad file stops the
    run before the teacher is fine-tuned); text_column is set only where a file with columns is named."""
    from edgekd import assets
    from edgekd.teachers.unlabelled import COLUMN_FORMATS, FORMATS, read_rows

    u = recipe.teacher.unlabelled
    problems = []
    with_columns = False
    for name in u.sources():
        if assets.is_named_asset(name):
            continue
        path = Path(name).expanduser()
        suffix = path.suffix.lower()
        with_columns |= suffix in COLUMN_FORMATS
        if suffix not in FORMATS and (path.is_file() or suffix):
            problems.append(f"teacher.unlabelled.dataset: {path} has an unsupported type '{path.suffix}' "
                            f"(supported: {', '.join(FORMATS)})")
        elif not path.is_file():
            problems.append(f"teacher.unlabelled.dataset: the file {path} does not exist")
        elif suffix in COLUMN_FORMATS:
            try:
                columns = read_rows(path)[0]
            except (EdgeKDError, UnicodeDecodeError, ValueError) as e:
                problems.append(f"teacher.unlabelled.dataset: {path} cannot be read: {e}")
                continue
            if u.text_column not in columns:
                problems.append(f"teacher.unlabelled.text_column: {path} has no column '{u.text_column}' "
                                f"(columns: {', '.join(map(str, columns)) or 'none'})")
    if u.dataset is not None and not with_columns and changed_keys(u, keys=("text_column",)):
        problems.append(f"teacher.unlabelled.text_column: names the text column of a {'/'.join(COLUMN_FORMATS)} "
                        "file, and teacher.unlabelled.dataset names none (a .txt file is one text per line, a named "
                        "dataset is read with its own columns), so nothing reads it: remove it")
    return problems


def _check_ood(recipe: Recipe) -> list[str]:
    """eval.ood_dataset names a set load_ood reads, which is neither the run's own dataset nor a source of its
    unlabelled texts, and the training data's labels (a named set's or a local file's) are the set's two."""
    from edgekd import assets
    from edgekd.ood import OOD_LABELS, OOD_SETS, label_map

    name = recipe.eval.ood_dataset
    if not name:
        return []
    if name not in OOD_SETS:
        return [f"eval.ood_dataset: '{name}' is not an out-of-domain set (the sets: {', '.join(OOD_SETS)}): name one, "
                "or null for none"]
    problems = []
    if name == recipe.data.dataset:
        problems.append(f"eval.ood_dataset: '{name}' is this run's own dataset (data.dataset): its texts are trained, "
                        "validated and tested on, so they are not out of domain; name another set, or null for none")
    if name == "movie-snippets" and recipe.data.dataset == "rotten-tomatoes":
        problems.append("eval.ood_dataset: 'movie-snippets' is movie-review text, and 9,778 of its 10,072 sentences "
                        "(at eval.ood_min_abs_score 0.5) are rotten-tomatoes reviews, the run's own dataset: it is not "
                        "out of domain for it; name amazon-snippets, tweet-snippets or nyt-snippets, or null for none")
    if name in recipe.teacher.unlabelled.sources():
        problems.append(f"eval.ood_dataset: '{name}' is also read by teacher.unlabelled.dataset: the teacher labels its "
                        "texts and the student trains on them, so they are not out of domain; name another set, or "
                        "null for none")
    data = assets.ASSETS.get(recipe.data.dataset)
    if data is not None:
        labels, whose = (list(data.label_names) if data.label_names else None), data.name
    else:
        labels, whose = _local_label_names(recipe.data), recipe.data.dataset
    # A Hugging Face id's labels are known only once it is downloaded (the eval stage checks them then).
    if labels is not None and label_map(labels) is None:
        problems.append(f"eval.ood_dataset: '{name}' is binary sentiment ({'/'.join(OOD_LABELS)}), and {whose}'s "
                        f"labels are {labels}: set it to null")
    return problems


def _local_label_names(d: DataConfig) -> list[str] | None:
    """The label names of a readable local data file, as the run reads them; None for anything else (a file
    that cannot be read is reported by the data check)."""
    from edgekd.data import FILE_FORMATS

    path = Path(d.dataset).expanduser()
    if not path.is_file() or path.suffix.lower() not in FILE_FORMATS:
        return None
    try:
        return list(_load_local(d, path).label_names)
    except (EdgeKDError, UnicodeDecodeError, ValueError, OSError):
        return None


# The distill stage raises the same when it meets a black-box teacher (tasks.text.distill.DistillLoss).
BLACK_BOX_MATCHING = ("distill.hidden_weight / distill.attention_weight: a black-box teacher has no hidden states or "
                      "attention maps to match; set them to 0, or use a local teacher (teacher.kind: model)")


def _check_black_box_matching(recipe: Recipe) -> list[str]:
    """Matching a black box's hidden states would fail in the distill stage, after it was asked about every text."""
    d = recipe.distill
    return [BLACK_BOX_MATCHING] if recipe.teacher.is_black_box() and (d.hidden_weight or d.attention_weight) else []


def _check_teacher_paths(recipe: Recipe) -> list[str]:
    named = [("teacher.path", recipe.teacher)]
    named += [(f"teacher.ensemble[{i}].path", m) for i, m in enumerate(recipe.teacher.ensemble)]
    return [f"{key}: {m.path} does not exist" for key, m in named
            if m.kind == "onnx" and m.path and not Path(m.path).expanduser().exists()]


def _check_hidden_size(recipe: Recipe) -> list[str]:
    """prune.hidden_size against the student's config, when that config can be read here without a
    download (the student's own model, else the teacher's with the layers the student copies), and the heads
    per layer the target's step leaves in it (edgekd.pruning.heads_ffn.config_problem); the stage checks it again."""
    p = recipe.prune
    if not (p.enabled and p.hidden_size is not None):
        return []
    source = recipe.student.model or recipe.teacher.model  # a black-box teacher's model still gives the layers
    try:
        from transformers import AutoConfig

        from edgekd.assets import resolve_model

        config = AutoConfig.from_pretrained(resolve_model(source), local_files_only=True)
    except Exception:  # a hub id not in the local cache, or no config: the prune stage checks the model itself
        return []
    from edgekd.pruning.heads_ffn import config_problem

    if not recipe.student.model:
        config = _student_config(config, recipe.student.layers)
        if config is None:  # the student cannot be built this way: the distill stage says why
            return []
    problem = config_problem(config, p)
    return [problem if problem.startswith("prune.hidden_size") else f"prune.hidden_size: {problem}"] if problem else []


def _student_config(teacher_config: Any, layers: list[int] | None) -> Any:
    """The config of the student the distill stage builds from the teacher's ``layers`` (default: every other
    layer), each layer with its teacher layer's heads and FFN width; None when the layers do not fit."""
    from edgekd.encoders import family_of
    from edgekd.students import student_config
    from edgekd.tasks.text.task import TextClassificationTask

    try:
        fam = family_of(teacher_config)
        n = int(getattr(teacher_config, fam.layers_key))
    except Exception:  # not an encoder family edgekd knows: config_problem names the family
        return teacher_config
    layers = list(layers) if layers else TextClassificationTask.default_layers(n)
    if not layers or any(not 0 <= i < n for i in layers):
        return None
    return student_config(teacher_config, fam, layers)


def _check_fresh_copies(recipe: Recipe) -> list[str]:
    """prune.recover_fresh_copies: the prune stage labels its copies with the one local teacher, and they
    are trained on only by a recovery."""
    p, t = recipe.prune, recipe.teacher
    if not (p.enabled and p.recover_fresh_copies):
        return []
    problems = []
    if t.kind != "model" or t.ensemble or t.targets == "labels":
        what = ("a black-box teacher" if t.kind != "model" else "an ensemble of teachers" if t.ensemble
                else "a teacher giving labels only")
        problems.append(f"prune.recover_fresh_copies: the prune stage labels its copies with one local teacher's "
                        f"soft targets, and this recipe has {what}: set it to 0, or teach with one local model")
    if p.recover_epochs == 0 and p.final_recover_epochs == 0:
        problems.append("prune.recover_fresh_copies: no recovery trains on the copies (prune.recover_epochs and "
                        "final_recover_epochs are 0): set it to 0, or give the recovery epochs")
    return problems


def _check_prune_method(recipe: Recipe) -> list[str]:
    """Method 'channels' traces a CNN; a text encoder's prune stage would fail on it after training."""
    p = recipe.prune
    if p.enabled and p.method == "channels":
        return ["prune.method: 'channels' removes a CNN's conv channels; a text encoder is pruned with "
                "'heads-ffn' (attention heads and FFN neurons) or 'unstructured' (the smallest weights)"]
    return []


def _check_bench_inputs(recipe: Recipe) -> list[str]:
    """bench.synthetic_vocab_size: a run's bench always has the test texts, so with bench.inputs: real it
    times them and never draws a synthetic id."""
    b = recipe.bench
    if b.inputs == "real" and changed_keys(b, keys=("synthetic_vocab_size",)):
        return ["bench.synthetic_vocab_size: synthetic ids are drawn only with bench.inputs: synthetic, and this "
                "run's bench times its real test texts: remove it, or set bench.inputs: synthetic"]
    return []


def check_inputs(recipe: Recipe) -> list[str]:
    """Every problem with the data files, unlabelled texts and local teacher exports ``recipe``
    names, and with settings a text encoder cannot take, each starting with its recipe key; [] when none."""
    return (_check_text_data(recipe) + _check_unlabelled(recipe) + _check_ood(recipe) + _check_teacher_paths(recipe)
            + _check_black_box_matching(recipe)
            + _check_local_models(recipe)
            + _check_prune_method(recipe) + _check_hidden_size(recipe) + _check_fresh_copies(recipe)
            + _check_bench_inputs(recipe) + _check_export_sequence(recipe))


def _check_local_models(recipe: Recipe) -> list[str]:
    """What the models' own files allow, read where they are on this machine (a local folder, a named asset
    already fetched, a hub id in the local cache; never a download: the stage that loads the model checks it
    again): data.max_length against the positions of every model that reads the texts (RoBERTa-style ids
    start after the padding id; rotary or relative-only positions have no such bound), and a student.model
    whose tokenizer gives other ids than the teacher's."""
    from edgekd.tasks.text.task import (
        local_config,
        local_tokenizer,
        max_length_problem,
        student_tokenizer_problem,
        tokenizer_difference,
    )

    t, s = recipe.teacher, recipe.student
    named = [("teacher.model", t.model)]
    named += [(f"teacher.ensemble[{i}].model", m.model) for i, m in enumerate(t.ensemble) if m.kind == "model"]
    named += [("student.model", s.model)]
    problems, seen = [], set()
    for key, source in named:
        if not source or source in seen:
            continue
        seen.add(source)
        config = local_config(source)
        problem = max_length_problem(config, recipe.data.max_length, key, source) if config is not None else None
        if problem:
            problems.append(problem)
    if s.model and t.model and s.model != t.model:
        teacher_tok, student_tok = local_tokenizer(t.model), local_tokenizer(s.model)
        if teacher_tok is not None and student_tok is not None:
            why = tokenizer_difference(teacher_tok, student_tok, recipe.data.max_length)
            if why:
                problems.append(student_tokenizer_problem(s.model, t.model, why))
    return problems


def _check_export_sequence(recipe: Recipe) -> list[str]:
    """A target's max_sequence below data.max_length: its artifact.json would still say max_length (what the
    server and bench tokenize to), and the target refuses every longer text at request time."""
    n = recipe.data.max_length
    return [f"export.options.{target}.max_sequence: {opts['max_sequence']} tokens, shorter than data.max_length "
            f"{n}, which the server and the bench tokenize texts to: set it to {n} or more, or leave it out (it "
            "defaults to data.max_length)"
            for target, opts in recipe.export.options.items()
            if isinstance(opts, dict) and isinstance(opts.get("max_sequence"), int) and opts["max_sequence"] < n]
