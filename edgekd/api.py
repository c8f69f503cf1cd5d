"""The Python API: ``edgekd.run``, ``edgekd.distill`` and ``edgekd.load`` (re-exported by ``edgekd``).

``run`` is ``edgekd run`` from Python (same recipe loading, same run folder, same invocation record;
the command line calls :func:`run_recipe` too). ``distill`` teaches a student without a run folder.
``load`` opens an export folder (or a run folder) with the server's own loader and codec, so that
``predict`` gives exactly what ``POST /predict`` would.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import reprlib
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from edgekd import warnings_log
from edgekd.errors import ArgumentError, DataError, EdgeKDError, RecipeError, StageError

if TYPE_CHECKING:
    from torch import nn

    from edgekd.recipe import Recipe
    from edgekd.runfolder import RunFolder
    from edgekd.serving.model import ServedModel
    from edgekd.tasks.text.task import HeadMatch


# --- running a recipe ------------------------------------------------------------------------------


def load_recipe_or_run(source: str | Path | None, overrides: list[str] | None,
                       one_off: list[str] | None = None) -> Recipe:
    """A recipe file, a built-in name, or a run folder (its saved recipe.yaml, pointed at that folder);
    ``one_off`` settings apply after ``overrides``, for one command only (``load_recipe``)."""
    from edgekd.recipe import load_recipe

    if source and Path(source).is_dir():
        run_dir = Path(source)
        if not (run_dir / "recipe.yaml").is_file():
            raise EdgeKDError(f"{run_dir} is a folder without recipe.yaml: give a recipe file or a run folder (runs/<name>).")
        extra = [f"output_dir={run_dir.resolve().parent}", f"name={run_dir.name}"]
        return load_recipe(run_dir / "recipe.yaml", extra + list(overrides or []), one_off)
    return load_recipe(source, overrides, one_off)


def _recipe_named(source: str | Path | None) -> str:
    """How an error names the recipe ``source`` (a run folder by its recipe.yaml)."""
    from edgekd.recipe import BUILTIN_RECIPES

    if source is None:
        return "built-in recipe 'default'"
    if Path(source).is_dir():
        return str(Path(source) / "recipe.yaml")
    return f"built-in recipe '{source}'" if str(source) in BUILTIN_RECIPES and not Path(source).exists() else str(source)


def _one_off_at_fault(err: RecipeError, source: str | Path | None, overrides: list[str], one_off: list[str],
                      flags: Mapping[str, str], checked: bool) -> RecipeError:
    """``err``, raised by the recipe with this command's ``one_off`` settings, split between the recipe and
    them: a problem the recipe with its ``overrides`` alone has too (when it loads, or, ``checked``, in what
    ``check_up_front`` finds) is the recipe's, the others are the one-off settings' (naming the flag each came
    from, ``flags``); ``err`` as it is where all are the recipe's, or where the recipe alone cannot be checked."""
    if not one_off:
        return err
    try:
        alone = load_recipe_or_run(source, overrides)
        own: set[str] = set()
        if checked:
            from edgekd.recipe_check import check_inputs

            own = set(check_inputs(alone))
    except RecipeError as e:
        if checked:
            return err  # the one-off settings mend what the recipe alone cannot load with: nothing to compare
        own = set(e.problems)
    except EdgeKDError:
        return err
    theirs = [p for p in err.problems if p not in own]
    if not theirs:
        return err
    given = ", ".join(s if not flags.get(s) else flags[s] if s in flags[s] else f"{flags[s]} ({s})" for s in one_off)
    mine = [p for p in err.problems if p in own]
    return RecipeError(mine, _recipe_named(source), one_off=given, one_off_problems=theirs) if mine else \
        RecipeError(theirs, _recipe_named(source), one_off=given)


def setup_runtime(recipe: Recipe) -> None:
    """Process-level runtime settings (threads, Accelerate's process state) for a pipeline command."""
    import importlib.util

    from edgekd.errors import MissingBackendError

    for module in ("torch", "transformers", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise MissingBackendError("The pipeline's stages", module, "train")
    import torch

    from edgekd.train import init_process_state

    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    init_process_state()  # before the first question to Accelerate (which process writes the run folder)


def check_up_front(recipe: Recipe) -> None:
    """What the recipe points at (data files, columns, labels, device profile), before any stage runs."""
    from edgekd.recipe_check import check_inputs

    problems = check_inputs(recipe)
    if problems:
        raise RecipeError(problems)


def _is_main_process() -> bool:
    from edgekd.train import init_process_state

    return init_process_state().is_main_process


def _say_warnings_kept() -> None:
    from edgekd.progress import console

    sink = warnings_log.sink
    sink.flush()
    if sink.count and sink.path is not None and sink.path.is_file():
        console.print(f"[dim]{sink.count} library warning(s) kept out of the console: {sink.path}[/]")


@contextlib.contextmanager
def _outcome(record: dict[str, Any]) -> Iterator[None]:
    """Fill an invocation ``record`` with how the block ended (it re-raises): ``ended``, ``seconds``,
    ``status`` (ok, error, interrupted), ``exit_code`` (0; 2 for edgekd's own errors, else 1; 130) and
    ``error``."""
    t0 = time.perf_counter()
    status, error, code = "error", None, 1
    try:
        yield
        status, code = "ok", 0
    except KeyboardInterrupt:
        status, code = "interrupted", 130
        raise
    except Exception as e:
        error, code = f"{type(e).__name__}: {e}", 2 if isinstance(e, EdgeKDError) else 1
        raise
    finally:
        record.update(ended=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      seconds=round(time.perf_counter() - t0, 2), status=status, exit_code=code, error=error)


@contextlib.contextmanager
def recorded_command(run_folder: RunFolder, what: str, argv: list[str] | None = None) -> Iterator[None]:
    """A command on a run folder that runs no stage (``edgekd export-teacher``), held and recorded as a
    stage command is: the libraries' warnings go to RUN/logs/warnings.log, the folder is its own while it
    runs (``RunFolder.exclusive``), and ``invocations.jsonl`` gets its line, whether it succeeds or not."""
    record: dict[str, Any] = {"argv": argv, "source": str(run_folder.root), "overrides": [], "one_off": [],
                              "stages": [], "command": what, "recipe_saved": False,
                              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    warnings_log.sink.attach(run_folder.root)
    warnings_log.route_library_logs()
    try:
        with _outcome(record), run_folder.exclusive(what):
            yield
    finally:
        run_folder.append_invocation(record)
        _say_warnings_kept()


def run_recipe(source: str | Path | None, overrides: list[str] | None = None, stages: list[str] | None = None,
               force: bool = False, one_off: list[str] | None = None, *, argv: list[str] | None = None,
               flags: Mapping[str, str] | None = None):
    """Run ``stages`` (all planned ones when None; an empty list is refused) and record the invocation in
    ``runs/<name>/invocations.jsonl``.

    ``overrides`` (``key.path=value``) on a recipe file define the run and are saved with it; on a run
    folder, like ``one_off`` (``--device``, ``--to``), they apply to this call only and never touch its
    recipe.yaml. ``flags`` names the command-line flag a one-off setting came from
    (``{"bench.profile=pi": "--device pi"}``): an error that only the one-off settings cause names them,
    not the recipe. ``argv`` is what the invocation record shows as the command. Returns the recipe used
    and the run context."""
    from edgekd.runfolder import RunFolder

    if stages is not None and not stages:
        raise RecipeError(["stages: an empty list runs nothing; name the stages to run (e.g. ['distill', 'eval']), "
                           "or leave stages out (None) to run the whole pipeline"])
    overrides, one_off = list(overrides or []), list(one_off or [])
    from_folder = bool(source) and Path(source).is_dir()
    # What defines the run (saved as its recipe.yaml), and what is for this command only
    defining, once = ([], overrides + one_off) if from_folder else (overrides, one_off)
    record = {"argv": argv, "source": None if source is None else str(source), "overrides": overrides,
              "one_off": once, "stages": stages, "force": bool(force),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    run_folder = RunFolder(Path(source)) if from_folder else None
    had_recipe = from_folder  # a run folder always has one (load_recipe_or_run insists)
    try:
        with _outcome(record):
            # Settings for this command only keep the recipe's own export targets in what the target-dependent
            # keys are checked against (``load_recipe``'s one_off) only where the command runs no stage that
            # reads those keys: ``edgekd export RUN --to X`` exports X without changing what the run ships, but
            # a command that prunes or quantizes does so for this command's targets.
            relaxed = stages is not None and set(stages) <= {"export", "bench"}
            try:
                recipe = (load_recipe_or_run(source, defining, once) if relaxed
                          else load_recipe_or_run(source, defining + once))
            except RecipeError as e:
                raise _one_off_at_fault(e, source, defining, once, flags or {}, checked=False) from None
            run_folder = RunFolder(recipe.run_dir())
            had_recipe = run_folder.recipe_path.is_file()
            warnings_log.sink.attach(run_folder.root)  # the libraries' warnings go to RUN/logs/warnings.log
            setup_runtime(recipe)
            warnings_log.route_library_logs()  # torch and transformers, imported just now, log on their own
            if not from_folder:
                saved = load_recipe_or_run(source, overrides) if one_off else recipe
            else:
                saved = None  # everything given on a run folder is one-off
            try:
                check_up_front(recipe)
            except RecipeError as e:
                raise _one_off_at_fault(e, source, defining, once, flags or {}, checked=True) from None
            from edgekd.pipeline import planned_stages, run_stages
            from edgekd.report import print_summary

            record["stages"] = stages or planned_stages(recipe)
            record["recipe_saved"] = saved is not None
            ctx = run_stages(recipe, stages, force=force, save_recipe=saved)
            if _is_main_process():  # once, not once per process under `accelerate launch`
                print_summary(ctx.run)
                _say_warnings_kept()
            return recipe, ctx
    finally:
        warnings_log.sink.flush()
        if run_folder is not None and run_folder.root.is_dir() and _is_main_process():
            if record["status"] != "ok":  # run_stages saves a first recipe once a stage has finished, even on failure
                record["recipe_saved"] = not had_recipe and run_folder.recipe_path.is_file()
            run_folder.append_invocation(record)


def override_strings(overrides: Mapping[str, Any]) -> list[str]:
    """Keyword overrides as ``key.path=value`` strings: nested mappings become dotted keys
    (``prune={"keep_params": 0.5}`` -> ``prune.keep_params=0.5``), a key may already be dotted, and
    each value is written in JSON's flow syntax, which the recipe loader's YAML reads back as the same
    value (``pathlib.Path`` values, in lists and mappings too, as their strings). An empty mapping sets
    a key to ``{}`` (``export={"options": {}}`` -> ``export.options={}``, as ``--set`` does); for a
    recipe section it would set nothing, and is refused."""
    from edgekd.recipe import model_at

    out: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            if value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}", v)
                return
            if model_at(tuple(prefix.split("."))) is not None:
                raise RecipeError([f"{prefix}: an empty mapping sets none of a recipe section's keys; give the "
                                   "keys to set"])
        out.append(f"{prefix}={_yaml_value(prefix, value)}")

    for key, value in overrides.items():
        walk(key, value)
    return out


# Characters the recipe loader's YAML reader refuses in its input (non-printable, lone surrogates) or reads
# as line breaks inside a quoted string (NEL, LINE/PARAGRAPH SEPARATOR): written as \uXXXX escapes instead.
_YAML_UNSAFE = re.compile("[^\t\n\r\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]|[\x85\u2028\u2029]")


def _yaml_value(key: str, value: Any) -> str:
    """``value`` in JSON's syntax (YAML's flow subset) such that ``yaml.safe_load`` gives it back: strings
    unescaped where YAML reads them as they are (JSON's \\ud83d\\ude00 pairs would come back as two lone
    surrogates), floats with the dot YAML needs (1.0e-05), NaN and infinities as YAML's ``.nan``/``.inf``,
    paths as strings."""

    def emit(v: Any) -> str:
        if v is None or isinstance(v, (bool, str)):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, PurePath):
            return emit(str(v))
        if isinstance(v, numbers.Integral):
            return str(int(v))
        if isinstance(v, numbers.Real):
            f = float(v)
            if math.isnan(f):
                return ".nan"
            if not math.isfinite(f):
                return ".inf" if f > 0 else "-.inf"
            mantissa, e, exponent = repr(f).partition("e")  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
            return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else repr(f)
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{emit(str(k))}: {emit(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(emit(x) for x in v) + "]"
        raise RecipeError([f"{key}: {type(v).__name__} is not a recipe value (give numbers, strings, paths, "
                           "booleans, None, lists or mappings)"])

    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", emit(value))


@dataclass
class Run:
    """A finished ``edgekd.run``: its folder, the recipe it ran, what its manifest records."""

    folder: Path
    recipe: Recipe

    @property
    def manifest(self) -> dict[str, Any]:
        """The run's manifest.json, read now (every stage's status, fingerprint, metrics)."""
        from edgekd.runfolder import RunFolder

        return RunFolder(self.folder).manifest()

    def metrics(self, stage: str) -> dict[str, Any]:
        """The metrics a stage recorded (e.g. ``run.metrics("eval")["student"]["accuracy"]``)."""
        stages = self.manifest.get("stages") or {}  # one read of manifest.json
        rec = stages.get(stage)
        if not rec:
            raise StageError(f"{self.folder} has no '{stage}' stage record; stages there: "
                             f"{', '.join(stages) or 'none'}.")
        return rec.get("metrics") or {}

    def load(self, target: str | None = None, **options: Any) -> Model:
        """An export of this run, ready to predict, as :func:`load` opens it: ``target`` (e.g. "onnx-int8"),
        else the recipe's ``serve.target``, else what the run ships (the quantize stage's recommendation, else
        the only current export); ``options`` are load's (threads, max_length, overflow)."""
        return load(self.folder, target, **options)


def run(recipe: str | Path = "default", *, stages: Sequence[str] | None = None, force: bool = False,
        **overrides: Any) -> Run:
    """Run a recipe's pipeline, as ``edgekd run RECIPE --set key=value ...`` does.

    ``recipe``: a built-in name, a YAML file or a run folder. ``overrides`` set recipe keys, nested
    (``prune={"keep_params": 0.5}``) or dotted (``**{"prune.keep_params": 0.5}``); on a recipe they
    are saved with the run, on a run folder they apply to this call only. ``stages`` runs only those
    (e.g. ``["export", "bench"]``; None, the default, runs the whole pipeline; an empty list is refused);
    ``force`` runs them even when unchanged (recorded, as ``--force`` is). Prints the same progress and summary as the command; returns
    the :class:`Run`."""
    if stages is not None:
        given = stages
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
            raise RecipeError([f"stages: give a list of stage names, e.g. ['distill', 'eval'], not {given!r}"])
        stages = list(stages)  # once: a generator is read here, not again when checked
        if not all(isinstance(s, str) for s in stages):
            raise RecipeError([f"stages: give a list of stage names, e.g. ['distill', 'eval'], not {given!r}"])
    sets = override_strings(overrides)
    used, ctx = run_recipe(recipe, sets, stages, force,
                           argv=["edgekd.run", str(recipe), *(f"--set={o}" for o in sets), *(["--force"] if force else [])])
    return Run(folder=ctx.run.root, recipe=used)


# --- distillation without a run folder ------------------------------------------------------------


def _label_ids(labels: Sequence[Any], label2id: Mapping[str, int], num_labels: int) -> list[int]:
    out = []
    for i, y in enumerate(labels):
        if isinstance(y, str):
            if y not in label2id:
                raise DataError(f"label {i} is '{y}', which the teacher does not know; its labels: "
                                f"{', '.join(label2id)}.")
            y = label2id[y]
        if isinstance(y, bool) or not isinstance(y, int) and not hasattr(y, "__index__"):
            raise DataError(f"label {i} is {y!r}: give label ids (0..{num_labels - 1}) or the teacher's label names.")
        y = int(y)
        if not 0 <= y < num_labels:
            raise DataError(f"label {i} is {y}, outside the teacher's {num_labels} labels (0..{num_labels - 1}).")
        out.append(y)
    return out


def texts_and_labels(data: Any, label2id: Mapping[str, int], num_labels: int) -> tuple[list[str], list[int]]:
    """``data`` as texts and label ids: (texts, labels), a list of (text, label) pairs, or a mapping /
    data frame / datasets.Dataset with ``text`` and ``label`` columns."""
    if data is None:
        raise DataError("no training data: give data=(texts, labels), [(text, label), ...] or a table with "
                        "'text' and 'label' columns.")
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], str):
        texts, labels = _columns_or_pairs(data, label2id, num_labels)
    elif (hasattr(data, "__getitem__") and hasattr(data, "keys")) or hasattr(data, "column_names"):
        cols = list(getattr(data, "column_names", None) or data.keys())
        missing = [c for c in ("text", "label") if c not in cols]
        if missing:
            raise DataError(f"the data has no {' or '.join(repr(c) for c in missing)} column; its columns: "
                            f"{', '.join(map(str, cols))}.")
        texts, labels = list(data["text"]), list(data["label"])
    else:
        rows = list(data)
        if not all(isinstance(r, (tuple, list)) and len(r) == 2 for r in rows):
            raise DataError("data: give (texts, labels), a list of (text, label) pairs, or a table with 'text' "
                            "and 'label' columns.")
        texts, labels = [r[0] for r in rows], [r[1] for r in rows]
    if len(texts) != len(labels):
        raise DataError(f"data: {len(texts)} texts but {len(labels)} labels; give one label per text.")
    if not texts:
        raise DataError("data: no examples; give at least one (text, label) pair.")
    from edgekd.tasks.text.checks import require_texts

    require_texts(texts, "every example needs text to learn from")
    return texts, _label_ids(labels, label2id, num_labels)


def _is_label(y: Any, label2id: Mapping[str, int], num_labels: int) -> bool:
    """Whether ``y`` is one of the teacher's labels: a name it knows, or an id (not a bool) in range."""
    if isinstance(y, str):
        return y in label2id
    return not isinstance(y, bool) and hasattr(y, "__index__") and 0 <= int(y) < num_labels


def _columns_or_pairs(data: tuple[Any, Any], label2id: Mapping[str, int], num_labels: int) -> tuple[list, list]:
    """A tuple of two: (texts, labels), or two (text, label) pairs, whichever it can be (texts are strings,
    labels the teacher's); what can be both is an error saying how to give it unambiguously."""
    as_pairs = all(isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                   and _is_label(item[1], label2id, num_labels) for item in data)
    first = data[0]
    if isinstance(first, Iterable) and not isinstance(first, (str, bytes, Mapping)):
        first = list(first)  # once: a generator is read here
    second = data[1]
    if isinstance(second, Iterable) and not isinstance(second, (str, bytes, Mapping)):
        second = list(second)
    as_columns = isinstance(first, list) and all(isinstance(t, str) for t in first) and isinstance(second, list) \
        and all(_is_label(y, label2id, num_labels) for y in second)
    if as_columns and as_pairs:
        raise DataError(f"data={reprlib.repr(data)} reads two ways: as (texts, labels) and as two (text, label) pairs. "
                        "Give pairs as a list, [(text, label), ...], or texts and labels as a table, "
                        "{'text': [...], 'label': [...]}.")
    if as_pairs:
        return [data[0][0], data[1][0]], [data[0][1], data[1][1]]
    if not isinstance(first, list) or not isinstance(second, list):
        raise DataError(f"data={reprlib.repr(data)}: give (texts, labels), a list of (text, label) pairs, or a table "
                        "with 'text' and 'label' columns.")
    return first, second  # checked item by item below, each problem said


def _classifier(source: str | Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from edgekd.assets import resolve_model

    path = resolve_model(str(source))
    archs = AutoConfig.from_pretrained(path).architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise StageError(f"{source} has no sequence-classification head (architectures: {archs or 'none'}): "
                         "distil from a fine-tuned classifier, e.g. a run's teacher/model, or fine-tune it "
                         "first (`edgekd run` does, with teacher.finetune).")
    return AutoModelForSequenceClassification.from_pretrained(path)


def distill(teacher: nn.Module | str | Path, student: nn.Module | str | Path | None = None, data: Any = None, *,
            tokenizer: Any = None, layers: Sequence[int] | None = None, max_length: int = 128, seed: int = 42,
            precision: str = "fp32", batch_size: int = 64, out_dir: str | Path | None = None,
            **settings: Any) -> nn.Module:
    """Distil ``teacher`` (a fine-tuned sequence classifier, or its folder / asset name) into
    ``student`` on ``data``, with no run folder; returns the trained student.

    ``student``: a model (or folder) sharing the teacher's tokenizer and labels; None builds the
    DistilBERT-style student from the teacher's ``layers`` (default: every other layer), checked block
    by block. A student whose own tokenizer (its folder's, or its ``name_or_path``'s when on this machine)
    gives other token ids than the teacher's is refused, as the pipeline refuses such a ``student.model``.
    A student's head is matched to the teacher's labels by ``id2label`` name, as the pipeline
    matches a saved head: the same labels in another order get their output rows put in the teacher's
    order, numbered-only names (LABEL_0, ...) are read by position (both with a warning), other labels
    are refused; the student then carries the teacher's label names. ``precision``: a
    ``runtime.precision`` value (auto, fp32, bf16, fp16); calls at different precisions may follow each
    other in one process (under a distributed launch, every call trains at the launch's). ``data``: (texts, labels),
    [(text, label), ...] or a table with ``text`` and ``label`` columns; labels are ids or the
    teacher's label names. ``max_length``: tokens kept per text, as ``data.max_length`` takes them (8 to
    4096, and no more than the teacher's and the student's positions). ``settings`` are the recipe's ``distill``
    keys (alpha, temperature, kl, hidden_weight, hidden_loss, attention_weight, train={...}),
    validated the same way. The teacher's soft targets are computed once; the loss is the distill
    stage's; a teacher given as a model is handed back in the train/eval mode it came in. ``out_dir`` also saves the
    student with the tokenizer, written whole or not at all: a new or empty folder, or a model folder saved
    before (one with config.json and weights), which is replaced whole; a folder holding anything else is
    refused before training.
    """
    import torch
    from pydantic import ValidationError

    from edgekd.recipe import DistillConfig, _describe, hidden_loss_unread
    from edgekd.students import build_student
    from edgekd.tasks.text.distill import DistillLoss, layer_map
    from edgekd.tasks.text.task import TextClassificationTask, TokenizedSplit, align_head
    from edgekd.train import init_process_state, predict, train

    _check_precision(precision)
    max_length, seed, batch_size = _check_distill_args(max_length=max_length, seed=seed, batch_size=batch_size)
    try:
        cfg = DistillConfig.model_validate(settings)
    except ValidationError as e:
        raise RecipeError([_describe({**err, "loc": ("distill", *err["loc"])}) for err in e.errors()]) from None
    if cfg.rounds != 1:
        raise RecipeError(["distill.rounds: edgekd.distill trains one round; call it again with the student as "
                           "teacher, or run the pipeline (edgekd.run) for born-again rounds"])
    unread = hidden_loss_unread(cfg, 0.0)
    if unread:
        raise RecipeError(unread)
    if layers is not None and student is not None:
        raise ArgumentError(["layers: picks the teacher layers of a student built from the teacher; "
                             "leave it out when you give a student"])
    save_to = _check_out_dir(out_dir, teacher=teacher, student=student)
    if isinstance(teacher, (str, PurePath)):
        _check_model_source(teacher, "teacher")
        tokenizer = tokenizer or _tokenizer_of(teacher)
        teacher = _classifier(teacher)
    elif tokenizer is None:
        tokenizer = _tokenizer_of(getattr(teacher, "name_or_path", None) or "")
    if getattr(teacher.config, "problem_type", None) not in (None, "single_label_classification"):
        raise StageError(f"the teacher's problem_type is {teacher.config.problem_type}: edgekd.distill teaches "
                         "single-label classifiers.")
    n_labels = int(teacher.config.num_labels)
    id2label = {int(k): str(v) for k, v in (getattr(teacher.config, "id2label", None) or {}).items()}
    teacher_labels = [id2label.get(i, f"LABEL_{i}") for i in range(n_labels)]
    label2id = dict(getattr(teacher.config, "label2id", None) or {})
    texts, labels = texts_and_labels(data, label2id, n_labels)
    _check_positions(teacher, "teacher", max_length)

    copied: list[int] | None = None
    student_source: str | None = None  # where the student's own tokenizer may be read
    if student is None:
        copied = list(layers) if layers is not None else TextClassificationTask.default_layers(
            teacher.config.num_hidden_layers)
        student = build_student(teacher, copied)
    else:
        if isinstance(student, (str, PurePath)):
            _check_model_source(student, "student")
            student_source = str(student)
            student = _classifier(student)
        else:
            student_source = getattr(student, "name_or_path", None) or None
        _check_positions(student, "student", max_length)
    head = _student_head(student, teacher_labels)
    if student.get_input_embeddings().num_embeddings < len(tokenizer):
        raise StageError(f"the student's vocabulary ({student.get_input_embeddings().num_embeddings} ids) is "
                         f"smaller than the teacher's tokenizer ({len(tokenizer)}): edgekd.distill feeds both "
                         "the same tokens, so the student must share the teacher's tokenizer.")
    _check_student_tokenizer(student_source, tokenizer, max_length, texts, student)
    note = align_head(student, head, teacher_labels)  # the teacher's label order and names
    if note:
        warnings.warn(f"the student: {note}", UserWarning, stacklevel=2)

    init_process_state()
    task = TextClassificationTask(teacher_labels, max_length)
    split = TokenizedSplit(task.tokenize(tokenizer, texts), labels, tokenizer.pad_token_id or 0)
    modes = {m: m.training for m in teacher.modules()}  # handed back as they came (predict sets eval mode)
    try:
        soft = torch.from_numpy(predict(teacher, split, batch_size, "teacher outputs", precision=precision))
        mapping = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers, copied)
        loss_fn = DistillLoss(student, cfg, soft_logits=soft, teacher=teacher, mapping=mapping, seed=seed)
        with tempfile.TemporaryDirectory(prefix="edgekd-distill-") as ckpt, loss_fn.attention_maps(student):
            train(student, split, cfg.train, loss_fn, seed=seed, precision=precision, ckpt_root=Path(ckpt),
                  description="distill", extra_params=loss_fn.extra_params())
    finally:
        for m, training in modes.items():
            m.training = training
    student.eval()
    if save_to is not None:
        TextClassificationTask.save_model(student, tokenizer, save_to)
    return student


def _check_distill_args(**given: Any) -> tuple[int, int, int]:
    """``max_length``, ``seed`` and ``batch_size`` of ``edgekd.distill``, validated by pydantic: whole numbers
    (a numpy integer is one; a string, a bool or a float is not), ``max_length`` within ``data.max_length``'s
    bounds, ``seed`` one numpy and torch take, ``batch_size`` at least 1."""
    from typing import Annotated

    from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, create_model

    from edgekd.recipe import DataConfig

    def integral(v: Any) -> Any:
        return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v

    whole = Annotated[int, BeforeValidator(integral)]
    bounds = {k: getattr(m, k) for m in DataConfig.model_fields["max_length"].metadata for k in ("ge", "le")
              if hasattr(m, k)}  # data.max_length's
    Args = create_model("Args", __config__=ConfigDict(strict=True), max_length=(whole, Field(**bounds)),
                        seed=(whole, Field(ge=0, le=2**32 - 1)), batch_size=(whole, Field(ge=1)))
    try:
        args = Args(**given)
    except ValidationError as e:
        raise ArgumentError([f"{err['loc'][0]}: {err['msg']} (got {err['input']!r})" for err in e.errors()]) from None
    return args.max_length, args.seed, args.batch_size


def _check_out_dir(out_dir: Any, **sources: Any) -> Path | None:
    """Where ``edgekd.distill`` may save the student, checked before anything trains: a folder of its own name
    (not '.', '..' or a root), new or empty, or a model folder saved before (replaced whole, as the student is
    written whole); never a folder of other files, which the replacement would delete, nor the teacher's folder
    or one holding it (``sources``: the teacher and student as given; a model's ``name_or_path`` when it is a
    folder here), nor a folder holding the student's (its own folder is a model folder saved before)."""
    if out_dir is None:
        return None
    if not isinstance(out_dir, (str, PurePath)) or not str(out_dir).strip():
        raise ArgumentError([f"out_dir: {out_dir!r} is not a folder path: give the folder to save the student to, "
                             "e.g. out_dir='my-student'"])
    path = Path(out_dir).expanduser()
    if path.name in ("", ".", "..") or path.resolve() == Path.cwd() or path.resolve() == Path.home():
        raise ArgumentError([f"out_dir: '{out_dir}' is not a folder of its own (the student is saved as a whole "
                             "folder, replacing what is there): name a new folder, e.g. out_dir='my-student'"])
    if path.exists() and not path.is_dir():
        raise ArgumentError([f"out_dir: {path} is a file: give a folder to save the student to"])
    for role, source in sources.items():
        where = source if isinstance(source, (str, PurePath)) else getattr(source, "name_or_path", None)
        if not where or not Path(where).expanduser().is_dir():
            continue  # an asset or hub name, or a model from nowhere on disk
        held = Path(where).expanduser().resolve()
        if held == path.resolve() and role == "teacher" or path.resolve() in held.parents:
            what = "is" if held == path.resolve() else "holds"
            raise ArgumentError([f"out_dir: {path} {what} the {role}'s folder ({where}); saving the student there "
                                 f"would replace it: name another folder"])
    if path.is_dir() and any(path.iterdir()) and not _saved_model_folder(path):
        raise ArgumentError([f"out_dir: {path} holds files and is not a saved model folder (no config.json with "
                             "its weights beside it); saving would replace the whole folder and delete them. Give "
                             "a new or empty folder, or a model folder saved before"])
    above = path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ArgumentError([f"out_dir: {above} is a file, so {path} cannot be made: give another folder"])
    if not os.access(above, os.W_OK | os.X_OK):
        raise ArgumentError([f"out_dir: {above} is not writable, so {path} cannot be saved: give a folder you can "
                             "write to"])
    return path


def _saved_model_folder(path: Path) -> bool:
    """A folder ``save_pretrained`` wrote: config.json and the weights."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return (path / "config.json").is_file() and any((path / w).is_file() for w in weights)


def _check_model_source(source: str | PurePath, what: str) -> None:
    """A ``teacher`` or ``student`` given as a folder that is not there is said to be missing (not that no
    tokenizer or config was found in it); a name that is not a path (an asset, a hub id) is left to the loader."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise StageError(f"{what}: {path} is a file, not a model folder: give the folder a model was saved to "
                         "(save_pretrained), a model asset name or a hub id.")
    if isinstance(source, PurePath) or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        raise StageError(f"{what}: the folder {path} does not exist: give the folder a model was saved to "
                         "(save_pretrained), a model asset name or a hub id.")


def _check_positions(model: nn.Module, what: str, max_length: int) -> None:
    """``max_length`` against the model's positions, as the pipeline checks ``data.max_length`` up front."""
    from edgekd.tasks.text.task import max_tokens

    limit = max_tokens(model.config)
    if limit is not None and max_length > limit[0]:
        raise ArgumentError([f"max_length: {max_length} tokens per text, and the {what} has positions for "
                             f"{limit[0]} ({limit[1]}): give max_length={limit[0]} or less"])


def _check_student_tokenizer(source: str | None, tokenizer: Any, max_length: int, texts: list[str],
                             student: nn.Module) -> None:
    """A student whose own tokenizer (read from ``source`` without a download) gives other ids than the
    teacher's is refused, by the check the pipeline makes of ``student.model`` (``tokenizer_difference``).
    Without a tokenizer of its own here (a model built in code), what its config says of its tokenizer is
    compared: a padding id other than the teacher tokenizer's is refused (besides the vocabulary size)."""
    from edgekd.tasks.text.task import local_tokenizer, tokenizer_difference

    own = local_tokenizer(source) if source is not None else None
    if own is None:
        pad, theirs = getattr(student.config, "pad_token_id", None), tokenizer.pad_token_id
        if pad is not None and theirs is not None and int(pad) != int(theirs):
            raise StageError(f"student: its config's pad_token_id is {pad}, and the teacher's tokenizer pads with id "
                             f"{theirs}: a sign that the student was made for another tokenizer (none of its own is "
                             "on this machine to compare ids with). edgekd.distill feeds it the teacher's token ids: "
                             "give a student that shares the teacher's tokenizer (or its folder), or, if it does, set "
                             f"student.config.pad_token_id = {theirs}.")
        return
    why = tokenizer_difference(tokenizer, own, max_length, texts[:512])
    if why:
        raise StageError(f"student: the tokenizer of {source} gives other token ids than the teacher's: {why}. "
                         "edgekd.distill feeds the student the teacher's token ids, which its embeddings would read "
                         "as other tokens: give a student that shares the teacher's tokenizer, or none (to build "
                         "one from the teacher's layers).")


def _check_precision(precision: Any) -> None:
    """``precision`` is one of the recipe's ``runtime.precision`` values (anything else would train as auto)."""
    import typing

    from edgekd.recipe import RuntimeConfig

    allowed = typing.get_args(RuntimeConfig.model_fields["precision"].annotation)
    if precision in allowed:
        return
    aliases = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
    guess = str(precision).strip().lower() if isinstance(precision, str) else None
    guess = aliases.get(guess, guess)
    hint = f" (did you mean '{guess}'?)" if guess in allowed else ""
    raise ArgumentError([f"precision: {precision!r} is not a training precision{hint}; give one of "
                         f"{', '.join(map(repr, allowed))}, as runtime.precision takes"])


def _student_head(student: nn.Module, teacher_labels: list[str]) -> HeadMatch:
    """How the student's classification head lines up with the teacher's labels, by name as the pipeline
    matches a saved head (``match_head``): the same labels in another order are reordered, numbered-only
    names are read by position, other labels are refused."""
    from types import SimpleNamespace

    from edgekd.tasks.text.task import match_head

    config = student.config
    # The model's class says whether it has the head (a model built in memory has no architectures in its
    # config, and a base model taken out of a classifier keeps the classifier's); one of another library, its
    # config's architectures too.
    archs = [type(student).__name__]
    if not type(student).__module__.startswith("transformers."):
        archs += list(getattr(config, "architectures", None) or [])
    head = match_head(SimpleNamespace(architectures=archs, num_labels=config.num_labels,
                                      id2label=getattr(config, "id2label", None)), teacher_labels)
    if head.kind == "none":
        raise StageError(f"the student is a {type(student).__name__}, not a sequence classifier: give a "
                         "...ForSequenceClassification model sharing the teacher's tokenizer (or none, to build "
                         "one from the teacher).")
    if head.kind == "other_count":
        raise StageError(f"the student has {len(head.head_labels)} labels {list(head.head_labels)}, the teacher "
                         f"{len(teacher_labels)} {teacher_labels}: give a student with the teacher's labels (or "
                         "none, to build one from the teacher).")
    if head.kind == "other_names":
        raise StageError(f"the student's labels {list(head.head_labels)} are not the teacher's {teacher_labels}: "
                         "no name matches up, so which output is which label is unknown. Give a student for the "
                         "teacher's labels; or, if its outputs are these labels under other names, set its "
                         "config.id2label to the teacher's names in the order of its outputs; or give none, to "
                         "build one from the teacher.")
    return head


def _tokenizer_of(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    from edgekd.assets import resolve_model

    try:
        return AutoTokenizer.from_pretrained(resolve_model(str(source)))
    except (OSError, ValueError) as e:
        raise StageError(f"no tokenizer found for the teacher ({source or 'a model object without a folder'}): "
                         f"pass tokenizer=... ({type(e).__name__}: {str(e).splitlines()[0]})") from None


# --- predicting with an export ---------------------------------------------------------------------


@dataclass
class ServeSetup:
    """What ``edgekd serve PATH`` and ``edgekd.load(PATH)`` serve, with which settings (:func:`serve_setup`)."""

    folder: Path  # the export folder
    settings: Any  # edgekd.serving.ServeSettings, its export_dir unset (the caller sets or passes the folder)
    why: str | None  # how edgekd chose the folder by the shipping rule, when it did
    differs: str | None  # a named export that is not the one the run ships: both named, to be said


def serve_setup(path: str | Path, target: str | None = None, *, environment: bool, given: str = "flag",
                **settings: Any) -> ServeSetup:
    """One rule for ``edgekd serve PATH`` (``environment=True``, ``given="flag"``) and ``edgekd.load(PATH)``
    (``environment=False``, ``given="argument"``).

    Settings, highest first: ``settings`` given (flags, or load's arguments; None is not given), the
    ``EDGEKD_SERVE_*`` variables (the server only: ``environment``), the serve section of the run's recipe (a run
    folder's, or that of the run an export folder is in), the defaults. The export: ``target`` given, else the
    recipe's ``serve.target`` (for a run folder), else what the run ships (``edgekd.shipping``: the quantize stage's
    recommendation, else the only current export). A named export (by ``target``, ``serve.target`` or an export
    folder given) that is not the one the run ships is served, and ``differs`` names both."""
    from edgekd.export.base import ARTIFACT_META
    from edgekd.recipe import ServeConfig
    from edgekd.serving.model import choose_export, run_root
    from edgekd.serving.settings import ServeSettings
    from edgekd.shipping import shipped_export

    path = Path(path)
    export_given = (path / ARTIFACT_META).is_file()
    root = run_root(path) if export_given else path if path.is_dir() else None
    recipe_file = root / "recipe.yaml" if root is not None else None
    cfg = _serve_section(recipe_file) if recipe_file is not None and recipe_file.is_file() else ServeConfig()
    flag = "--target" if given == "flag" else "target="
    named = (f"{flag} {target}" if given == "flag" else f"target={target!r}") if target is not None else None
    if target is None and not export_given and cfg.target is not None:
        target, named = cfg.target, f"serve.target: {cfg.target} in {recipe_file}"
    try:
        folder, why = choose_export(path, target, choose=f"choose one with {flag}")
    except StageError as e:
        from edgekd.shipping import export_folders

        # (the recipe's serve.target is blamed only where the run has exports and that one is not among them)
        if named is None or named.startswith(flag) or not export_folders(path):
            raise
        raise StageError(f"{str(e).rstrip('.')} ({named}): set serve.target to one of them, or remove it to serve "
                         "what the run ships.") from None
    differs = None
    if why is None and root is not None and (root / "export").is_dir():
        try:
            ships, reason = shipped_export(root, choose=f"choose one with {flag}")
        except EdgeKDError:
            ships = None  # what ships cannot be said (an unreadable manifest): the export named is served
        if ships is not None and ships != folder.name:
            named = named or f"the export folder {folder} given"
            differs = f"serving {folder.name} ({named}), not what the run ships: {ships} ({reason})"
    return ServeSetup(folder, ServeSettings.from_config(cfg, environment=environment, given=given, **settings),
                      why, differs)


def _serve_section(recipe_file: Path) -> Any:
    """The ``serve`` section of a run's saved recipe, read alone: serving needs nothing else, and a run made
    before a later edgekd refused some other key of its recipe is still served (its other sections are not
    validated here). An invalid serve key is a ``RecipeError`` naming it."""
    import yaml
    from pydantic import ValidationError

    from edgekd.recipe import ServeConfig

    try:
        data = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError([f"cannot be read ({e})"], str(recipe_file)) from None
    section = data.get("serve") if isinstance(data, dict) else None
    try:
        return ServeConfig.model_validate(section or {})
    except ValidationError as e:
        raise RecipeError([f"serve.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()],
                          str(recipe_file)) from None


def _whole_number(name: str, value: Any, least: int = 1) -> int:
    """``value`` as an int of at least ``least`` (a numpy integer is one; a bool, a float or a string is not)."""
    from typing import Annotated

    from pydantic import Field, TypeAdapter, ValidationError

    try:
        return TypeAdapter(Annotated[int, Field(ge=least, strict=True)]).validate_python(
            int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value)
    except ValidationError as e:
        raise ArgumentError([f"{name}: {e.errors()[0]['msg']} (got {value!r})"]) from None


class Model:
    """An export loaded for prediction, by the server's loader: ``predict`` answers as ``POST /predict`` does."""

    def __init__(self, served: ServedModel, chose: str | None = None):
        from edgekd.serving.batching import InferenceEngine

        self.served = served
        self.why = chose  # how the export was chosen from a run folder, when it was
        self._engine = InferenceEngine(served.runner, served.codec, precision=served.meta.get("precision"))

    name = property(lambda self: self.served.name)
    target = property(lambda self: self.served.target)
    folder = property(lambda self: self.served.folder)
    task = property(lambda self: self.served.codec.task)
    labels = property(lambda self: list(self.served.codec.labels))

    def __repr__(self) -> str:
        return f"edgekd.Model({self.name!r}, target={self.target!r}, task={self.task!r}, folder='{self.folder}')"

    def predict(self, inputs: Any, *, batch_size: int = 32, **options: Any) -> list:
        """Text models: a text or a list of texts -> one :class:`Prediction` (label, score,
        probabilities, truncated) each. Detection models: an image or a list of images (file paths, bytes,
        PIL images or HxWx3 RGB uint8 arrays) -> one :class:`Detections` each: the list of its
        :class:`Detection` objects, with the image's ``width`` and ``height`` (``conf_threshold``,
        ``iou_threshold``, ``max_det`` as the server takes them). The answers are the task family's
        (``local_predict`` in its ``serve.py``), with the same names as ``POST /predict``'s."""
        batch_size = _whole_number("batch_size", batch_size)
        return self.served.family.local_predict(self.served.codec, self._engine, inputs, batch_size, options)


def load(path: str | Path, target: str | None = None, *, threads: int | None = None,
         max_length: int | None = None, overflow: str | None = None) -> Model:
    """Open an export folder (``runs/x/export/onnx-int8``), or a run folder, verified and loaded as
    ``edgekd serve`` does, with the settings ``edgekd serve`` would use (:func:`serve_setup`): these
    arguments, else the run's recipe ``serve`` section (``threads``, ``max_length``, ``overflow``,
    ``target``...), else the defaults. No ``EDGEKD_SERVE_*`` variable is read: they configure a server. From a
    run folder, ``target``, else ``serve.target``, else what the run ships; a named export that is not the one
    the run ships is loaded with a warning naming both."""
    from edgekd.serving.model import load_served_model

    threads = None if threads is None else _whole_number("threads", threads)
    max_length = None if max_length is None else _whole_number("max_length", max_length, least=2)
    setup = serve_setup(path, target, environment=False, given="argument", threads=threads, max_length=max_length,
                        overflow=overflow)
    if setup.differs:
        warnings.warn(setup.differs, UserWarning, stacklevel=2)
    settings = setup.settings.model_copy(update={"export_dir": setup.folder})
    return Model(load_served_model(settings), setup.why)
