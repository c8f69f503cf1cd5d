"""The export stage: every requested target into ``out_root/<target>/``, each checked for parity.

Policy (``ExportConfig.strict``):
- A target that cannot run here (a dependency missing) or whose conversion fails (an operator it
  cannot convert) becomes a record with ``built: false`` and the reason, and the other targets go
  on; with ``strict: true`` it raises instead. Wrong option names or values always raise.
- A target that writes what must be built elsewhere (TensorRT without TensorRT) is recorded with
  ``built: false`` and its reason; its folder holds everything needed to build it there. Where the
  graph it is built from runs here (TensorRT's ONNX graph under ONNX Runtime), that graph's parity is
  checked and recorded (``parity.graph``) as what it is: not the engine.
- Parity runs through ``load_artifact`` (the server's and the benchmark's path) where the artifact
  can run here; otherwise the record says why. Each report is held to a ``ParityGate``: the recipe's
  thresholds, or the default difference gate of the artifact's precision where it sets no
  ``max_abs_diff``; the record says which (``parity.tolerance``). A miss raises ``ParityError`` after
  every target has been exported and its figures written, with the records on the error (``.records``).

All or nothing: each target is written into a hidden staging folder beside its final place, checked for
parity there and its record written into its artifact.json; only when every target is done are the
folders published together (each replaces the earlier one by a rename; a target that failed removes its
earlier folder). A stage that stops part-way (an error raised, the process killed) publishes nothing:
the earlier export stays whole, the one the run's manifest records.

Each folder is self-contained: the artifact, its ``artifact.json`` and the tokenizer files, ready to serve
or to copy to a device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.errors import (
    ChecksumError,
    EdgeKDError,
    MissingBackendError,
    ParityError,
    RecipeError,
    UnsupportedTargetError,
)
from edgekd.export import get_exporter
from edgekd.export._common import publish_modes
from edgekd.export.base import (
    EXTRA_DIGESTS,
    HF_CONFIG,
    RUNTIME_OPTIONS,
    Exporter,
    ExportResult,
    ModelIO,
    hf_model_config,
    read_artifact_meta,
    write_artifact_meta,
)
from edgekd.export.parity import ParityGate, SourceOnce, check_parity, check_real_lengths
from edgekd.owners import clear_leftovers, set_aside_name, staged_name
from edgekd.progress import track
from edgekd.runfolder import sha256_file, sha256_tree
from edgekd.warnings_log import library_output

if TYPE_CHECKING:
    from edgekd.export.base import Runner
    from edgekd.recipe import ExportConfig

log = logging.getLogger("edgekd.export")

# Keys artifact.json sets itself; the caller's ``meta`` may not override them.
RESERVED = ("target", "exporter", "file", "files", EXTRA_DIGESTS, "sha256", "size_bytes", "precision", "io", "built",
            "reason", "notes", "created", "versions", "parity")
_VERSIONED = ("edgekd", "torch", "onnx", "onnxruntime", "onnxscript", "coremltools", "executorch", "tensorrt",
              "transformers")


def artifact_digest(path: Path) -> str:
    """sha256 of a file; for a folder artifact (a Core ML package) the sha256 of its files' hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return hashlib.sha256(json.dumps(sha256_tree(path), sort_keys=True).encode()).hexdigest()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _versions() -> dict[str, str]:
    out = {}
    for pkg in _VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _slice(inputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[:n] for k, v in inputs.items()}


def _copy_extra(files: list[Path], folder: Path, taken: set[str]) -> list[str]:
    copied = []
    for src in files:
        src = Path(src)
        if not src.exists():
            raise EdgeKDError(f"extra file {src} does not exist (tokenizer files are copied beside each artifact).")
        if src.name in taken:
            raise EdgeKDError(f"extra file {src.name} would overwrite the exported artifact's own file.")
        dest = folder / src.name
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        copied.append(src.name)
    return copied


def _write_hf_config(folder: Path, meta: dict[str, Any], taken: set[str]) -> list[str]:
    """``config.json`` of the source model with the served labels, so Hugging Face tools (Optimum's
    ORTModelFor*) load the folder as is; none when the source is not a transformers model."""
    source = meta.get("source_model")
    config = hf_model_config(Path(source) if source else None, meta.get("labels"))
    if config is None or HF_CONFIG in taken:
        return []
    (folder / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [HF_CONFIG]


def _artifact_meta(name: str, result: ExportResult, io: ModelIO, meta: dict[str, Any],
                   extra: list[str]) -> dict[str, Any]:
    model = result.path
    # Weights kept beside the graph (model.onnx.data) belong to the artifact's size.
    sidecars = [f for f in result.files if f.name.startswith(f"{model.name}.") and f.exists()]
    own = {
        "target": name,
        "exporter": name,
        "file": model.name,
        "sha256": artifact_digest(model) if model.exists() else None,
        "size_bytes": (_size(model) + sum(_size(f) for f in sidecars)) if model.exists() else None,
        "files": {f.name: artifact_digest(f) for f in result.files if f.exists()},
        "extra_files": extra,
        "precision": result.precision,
        "io": (result.io or io).to_dict(),
        "built": result.built,
        "reason": result.reason,
        "notes": result.notes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    return {**meta, **own}


def drop_stale(folder: Path, why: str = "it holds an earlier export that this run did not reproduce") -> None:
    """An earlier run's export of a target this run could not export must not be served as if current,
    nor a folder whose parity check could not run."""
    if folder.exists():
        log.warning("removing %s: %s", folder, why)
        shutil.rmtree(folder)


STAGED_SUFFIX = ".staged"


class Staging:
    """Export folders written under hidden names inside ``root`` (``.<name>.<pid>@<machine>-<random>.staged``) and
    published together by ``publish``: each staged folder replaces ``root/<name>`` by a rename, and each name
    marked ``remove`` (a target that failed) loses its earlier folder. ``discard`` drops every staged folder
    and leaves ``root`` as it was. Staged folders left by a process that was killed are removed when the next
    ``Staging`` of the same ``root`` opens.

    ``renamed({"onnx": "onnx-nms"})`` is a view of the same staging that publishes a target under another
    folder name (an extra export of a task, made by the same code as export.targets)."""

    def __init__(self, root: Path, names: dict[str, str] | None = None,
                 _items: dict[str, Path | None] | None = None):
        self.root = Path(root)
        self.names = dict(names or {})
        self._items: dict[str, Path | None] = {} if _items is None else _items  # folder name -> staged (None: remove)
        if _items is None:
            _remove_orphans(self.root)

    def renamed(self, names: dict[str, str]) -> Staging:
        return Staging(self.root, {**self.names, **names}, self._items)

    def final(self, name: str) -> Path:
        """Where target ``name`` is published."""
        return self.root / self.names.get(name, name)

    def new(self, name: str) -> Path:
        folder = self.names.get(name, name)
        self._drop_staged(folder)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=staged_name(folder), suffix=STAGED_SUFFIX))
        self._items[folder] = tmp
        return tmp

    def remove(self, name: str) -> None:
        """On publish, remove ``root/<name>`` (an earlier export of a target this run did not export)."""
        folder = self.names.get(name, name)
        self._drop_staged(folder)
        self._items[folder] = None

    def _drop_staged(self, folder: str) -> None:
        old = self._items.pop(folder, None)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def publish(self) -> None:
        """Put every staged folder in place. Each replaces its earlier folder in two renames (the earlier one
        aside as ``.<name>.old-<pid>@<machine>``, then the staged one in); a process killed between them leaves the
        earlier one aside, which the next ``Staging`` of this root puts back (``_remove_orphans``). A publish
        that raises drops the folders it had not yet put in place."""
        try:
            for folder, staged in list(self._items.items()):
                final = self.root / folder
                if staged is None:
                    drop_stale(final)
                else:
                    publish_modes(staged)
                    if final.exists():
                        old = final.with_name(set_aside_name(folder))
                        shutil.rmtree(old, ignore_errors=True)
                        os.replace(final, old)
                        os.replace(staged, final)
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        os.replace(staged, final)
                del self._items[folder]
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        for staged in self._items.values():
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        self._items.clear()


def _remove_orphans(root: Path) -> None:
    """Staged folders of a process that has ended (killed mid-export, ``owners.owner_gone``): nothing ever
    published them; and an earlier folder a killed publish set aside, put back where nothing took its place.
    (The run folder's command lock keeps two commands from exporting into one root at once, so an ended
    process's folders are nobody's.) Another machine's (a run folder on a shared disk) are left to it, and said."""
    for path in clear_leftovers(root, STAGED_SUFFIX):
        log.warning("leaving %s: it was written by a process on another machine (this run folder is on a shared "
                    "disk); remove it by hand once no export runs there", path)


def _record(name: str, status: str, reason: str | None = None, **fields: Any) -> dict[str, Any]:
    """One target's manifest record. status: ok, not_built (written, to be built elsewhere),
    unavailable (a dependency is missing here) or failed (the conversion failed)."""
    rec = {"target": name, "status": status, "built": status == "ok", "reason": reason, "folder": None,
           "path": None, "size_bytes": None, "sha256": None, "parity": None}
    rec.update(fields)
    return rec


def _gate(cfg: ExportConfig, precision: str | None, unordered: tuple[str, ...]) -> ParityGate:
    return ParityGate(cfg.min_top1_agreement, cfg.max_abs_diff, precision, tuple(unordered))


def _parity(runner: Runner, want: Any, examples: dict[str, np.ndarray], labels: np.ndarray | None,
            metric_fn: Callable | None, cfg: ExportConfig, name: str, agreement_fn: Callable | None,
            gate: ParityGate) -> tuple[dict[str, Any], list[str], str]:
    """Parity of ``runner`` against ``want``: batched, then as a server calls it (each text alone at its own
    length; the batched check pads them all). The record, the gate's misses and the batched check's summary."""
    report = check_parity(runner, want, examples, labels, metric_fn, cfg.parity_batch_size, target=name,
                          agreement_fn=agreement_fn)
    real = check_real_lengths(runner, want, examples, target=name)
    misses = gate.apply(report)
    record: dict[str, Any] = {"ran": True, **report.to_dict()}
    if real is not None:
        misses += [f"at batch 1 and real lengths, {m}" for m in gate.apply(real)]
        record["real_lengths"] = real.to_dict()
    record["passed"] = not misses
    return record, misses, report.summary()


def _graph_parity(exporter: Exporter, result: ExportResult, staged: Path, want: Any, examples: dict[str, np.ndarray],
                  labels: np.ndarray | None, metric_fn: Callable | None, cfg: ExportConfig, name: str,
                  agreement_fn: Callable | None,
                  unordered: tuple[str, ...]) -> tuple[dict[str, Any], list[str], str]:
    """Parity of the graph a target that was not built here is built from, where that graph runs here
    (``Exporter.stand_in``: TensorRT's ONNX graph under ONNX Runtime). ({}, [], "") where it has none."""
    stand_in = exporter.stand_in(result, staged)
    if stand_in is None:
        return {}, [], ""
    runner, what = stand_in
    if isinstance(runner, str):  # why it cannot run here
        return {"ran": False, "reason": runner, "checks": what}, [], ""
    record, misses, summary = _parity(runner, want, examples, labels, metric_fn, cfg, name, agreement_fn,
                                      _gate(cfg, result.precision, unordered))
    return {"checks": what, **record}, misses, summary


def _export_one(exporter: Exporter, module: Any, io: ModelIO, staging: Staging, cfg: ExportConfig,
                examples: dict[str, np.ndarray], labels: np.ndarray | None, metric_fn: Callable | None,
                meta: dict[str, Any], extra_files: list[Path],
                agreement_fn: Callable | None = None, defaults: dict[str, Any] | None = None,
                reference: Any = None, timing_rows: list[dict[str, np.ndarray]] | None = None,
                unordered: tuple[str, ...] = ()) -> dict[str, Any]:
    """Export one target into a staged folder of ``staging``, check its parity there and write its record into
    its artifact.json; ``staging.publish`` puts it in place. A target that fails marks its earlier folder
    for removal."""
    name = exporter.name
    given = cfg.options.get(name, {})
    applied = {k: v for k, v in (defaults or {}).items() if k not in given}
    opts = {**applied, **given}
    exporter.check_options(opts)
    if "max_sequence" in exporter.options and meta.get("max_length"):
        if "max_sequence" not in opts:
            opts["max_sequence"] = int(meta["max_length"])  # the longest input the task will send
        elif int(opts["max_sequence"]) < int(meta["max_length"]):  # the recipe check refuses it up front too
            raise RecipeError([f"export.options.{name}.max_sequence: {opts['max_sequence']} tokens, shorter than the "
                               f"max_length {meta['max_length']} the artifact is served at: set it to at least that"])
    folder = staging.final(name)
    ok, why = exporter.available()
    if not ok:
        if cfg.strict:
            exporter.require()
        log.warning("export target '%s' skipped: %s", name, why)
        staging.remove(name)
        return _record(name, "unavailable", why)

    t0 = time.perf_counter()
    tmp = staging.new(name)
    try:
        result = exporter.export(module, examples, io, tmp, **opts)
        own = {f.name for f in result.files}
        extra = _copy_extra(extra_files, tmp, own)
        extra += _write_hf_config(tmp, meta, own | set(extra))
        tuned = None
        if timing_rows and name == "onnx" and result.built and result.path.exists():
            from edgekd.export.timing import TUNING_RUNS, tune_session, unfuse_in_file

            # Measured before parity, so parity checks the session the folder will be opened with;
            # the choice is also written into the graph, for clients that never read artifact.json.
            tuned = tune_session(result.path, timing_rows, TUNING_RUNS, None)
            if tuned["runtime_options"]:
                tuned["tuning"]["residual_adds_as_sum"] = unfuse_in_file(result.path, timing_rows,
                                                                         tuned["runtime_options"])
        art = _artifact_meta(name, result, io, meta, extra)
        if tuned is not None:
            art[RUNTIME_OPTIONS], art["session_tuning"] = tuned["runtime_options"], tuned["tuning"]
        # Serving reads these too (the tokenizer, its vocabulary): each is checked like the model file.
        art[EXTRA_DIGESTS] = {n: artifact_digest(tmp / n) for n in extra}
        write_artifact_meta(tmp, art)
    except RecipeError:
        raise
    except (UnsupportedTargetError, MissingBackendError, ParityError) as e:
        if cfg.strict:
            raise
        log.warning("export target '%s' failed: %s", name, e)
        staging.remove(name)
        return _record(name, "failed", str(e), seconds=round(time.perf_counter() - t0, 2))
    export_s = time.perf_counter() - t0

    rec = _record(
        name, "ok" if result.built else "not_built", result.reason,
        folder=str(folder), path=str(folder / art["file"]), size_bytes=art["size_bytes"], sha256=art["sha256"],
        precision=art["precision"], export_seconds=round(export_s, 2),
    )
    if applied:
        rec["task_defaults"] = applied  # the task's own option defaults, the recipe left them unset
    t1 = time.perf_counter()
    want = module if reference is None else reference  # parity's source: the model's own forward
    misses: list[str] = []
    summary = ""
    # Parity runs on the staged folder, which nothing serves yet: a check that cannot finish (outputs of
    # another shape, an input longer than a fixed-shape program takes) drops it and publishes nothing.
    try:
        try:
            runner, _ = load_artifact(tmp)
        except (UnsupportedTargetError, MissingBackendError) as e:
            rec["parity"] = {"ran": False, "reason": str(e).replace(str(tmp), str(folder))}
            graph, misses, summary = _graph_parity(exporter, result, tmp, want, examples, labels, metric_fn, cfg,
                                                   name, agreement_fn, unordered)
            if graph:
                rec["parity"]["graph"] = graph
                if misses:
                    rec["parity"]["passed"] = False
                    misses = [f"(its {graph['checks']}) {m}" for m in misses]
        else:
            rec["parity"], misses, summary = _parity(runner, want, examples, labels, metric_fn, cfg, name,
                                                     agreement_fn, _gate(cfg, art["precision"], unordered))
            del runner  # the staged folder is renamed on publish
    except (UnsupportedTargetError, MissingBackendError, ParityError) as e:
        staging.remove(name)
        if cfg.strict:
            raise
        log.warning("export target '%s' failed its parity check: %s", name, e)
        return _record(name, "failed", f"parity check: {e}", seconds=round(time.perf_counter() - t0, 2))
    if misses:
        rec["parity_misses"] = f"'{name}': {'; '.join(misses)} ({summary})"
    rec["parity_seconds"] = round(time.perf_counter() - t1, 2)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    art["parity"] = rec["parity"]
    write_artifact_meta(tmp, art)
    return rec


def export_all(
    module: Any,
    io: ModelIO,
    targets: list[str],
    out_root: Path,
    cfg: ExportConfig,
    parity_inputs: dict[str, np.ndarray],
    parity_labels: np.ndarray | None,
    metric_fn: Callable[[dict[str, np.ndarray], np.ndarray], dict[str, float]] | None,
    meta: dict[str, Any],
    extra_files: list[Path],
    agreement_fn: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], float] | None = None,
    defaults: dict[str, dict[str, Any]] | None = None,
    reference: Any = None,
    timing_inputs: dict[str, np.ndarray] | None = None,
    *,
    staging: Staging | None = None,
    unordered_outputs: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Export ``module`` to every target in ``targets``; return one manifest record per target.

    ``parity_inputs`` are real preprocessed examples (the first ``cfg.parity_examples`` are used for
    parity, and as example/calibration inputs); ``meta`` (labels, max_length, source model, task)
    goes into every artifact.json; ``extra_files`` (the tokenizer files) are copied beside each
    artifact; ``agreement_fn(got, want)`` replaces top-1 agreement in parity (detection: boxes).
    ``defaults`` (target -> options) are the task's own option defaults; ``export.options`` of the
    recipe overrides them, and each record says which were applied (``task_defaults``). ``reference``:
    the module parity compares with when ``module`` is a rewritten form of it (default: ``module``).
    ``timing_inputs`` (validation examples, padded to one shape): the ONNX target times its model on
    them one by one at their real lengths with and without ONNX Runtime's SkipLayerNormFusion and
    records the faster session in artifact.json (``runtime_options``, ``session_tuning``).

    Every target is staged first and the folders are published together once all are done (see the module
    docstring), also when a parity threshold is missed (the ParityError comes after). ``staging``: a
    ``Staging`` of ``out_root`` the caller publishes (or discards) itself, with exports of its own beside
    these. ``unordered_outputs``: outputs whose rows are a set (NMS detections), left out of the default
    element-wise difference gate."""
    clash = sorted(set(meta) & set(RESERVED))
    if clash:
        raise EdgeKDError(f"artifact meta keys {clash} are reserved for artifact.json's own fields.")
    if len(set(targets)) != len(targets):
        raise RecipeError([f"export.targets lists a target twice: {targets}"])
    exporters = [get_exporter(t) for t in targets]  # unknown names fail before anything is written
    problems = []
    defaults = defaults or {}
    for ex in exporters:
        try:
            ex.check_options({**defaults.get(ex.name, {}), **cfg.options.get(ex.name, {})})
        except UnsupportedTargetError as e:
            problems.append(str(e))
        except RecipeError as e:
            problems.extend(e.problems)
    if problems:
        raise RecipeError(problems)
    missing = [n for n in io.input_names if n not in parity_inputs]
    if missing:
        raise EdgeKDError(f"parity inputs lack {missing}; the task's parity_data() must give {io.input_names}.")
    if staging is not None and staging.root != Path(out_root):
        raise EdgeKDError(f"export_all: the staging given is of {staging.root}, not of out_root {out_root}.")
    available = len(np.asarray(parity_inputs[io.input_names[0]]))
    n = min(cfg.parity_examples, available)
    if n < cfg.parity_examples:
        log.info("export.parity_examples %d: the test split has %d, so parity runs on all %d", cfg.parity_examples,
                 available, n)
    examples = _slice(parity_inputs, n)
    labels = None if parity_labels is None else np.asarray(parity_labels)[:n]

    timing_rows = None
    if timing_inputs is not None:
        from edgekd.export.timing import TUNING_RUNS
        from edgekd.quantization.calibration import real_length_rows

        timing_rows = real_length_rows(timing_inputs, TUNING_RUNS)
    own = staging is None
    stage = Staging(Path(out_root)) if staging is None else staging
    records: dict[str, dict[str, Any]] = {}
    misses = []
    source = SourceOnce(module if reference is None else reference)  # every target's parity: one run of it
    try:
        for ex in track(exporters, "export", label=lambda e: e.name):
            # A converter's progress bars and a runtime's C++ notices on stderr go to the run's warnings log
            with library_output(f"export {ex.name}"):
                rec = _export_one(ex, module, io, stage, cfg, examples, labels, metric_fn, meta, extra_files,
                                  agreement_fn, defaults.get(ex.name), source, timing_rows,
                                  tuple(unordered_outputs))
            if "parity_misses" in rec:
                misses.append(rec.pop("parity_misses"))
            records[ex.name] = rec
    except BaseException:
        if own:
            stage.discard()  # nothing of this run is published: the earlier export stays whole
        raise
    if own:
        stage.publish()
    if misses:
        err = ParityError("Exported artifacts fail parity: " + " | ".join(misses)
                          + ". Check the export options (precision, opset) or relax export.min_top1_agreement"
                          " / export.max_abs_diff.")
        err.records = records  # type: ignore[attr-defined]
        raise err
    return records


def load_artifact(folder: Path, *, verify: bool = True, allow_failed_parity: bool = False,
                  **runtime_opts: Any) -> tuple[Runner, dict[str, Any]]:
    """The Runner for the export folder ``folder`` (its artifact.json names target and file, and
    ``runtime_options`` the session options it was measured with) and the folder's metadata. With
    ``verify``, the artifact's sha256 must match artifact.json.

    A folder whose parity check failed when it was exported (``parity.passed: false``) is refused:
    the export stage stops on the miss, but the folder stays for inspection, and serve, bench and
    ``edgekd.load`` must not answer with it. ``allow_failed_parity`` opens it anyway (inspection).

    Imports only what the artifact's runtime needs (an ONNX artifact loads without torch)."""
    folder = Path(folder)
    meta = read_artifact_meta(folder)
    parity = meta.get("parity") or {}
    if parity.get("passed") is False and not allow_failed_parity:
        real = parity.get("real_lengths") or {}
        figures = ", ".join([*(f"{k} {parity[k]:.4g}" for k in ("top1_agreement", "max_abs_diff")
                               if isinstance(parity.get(k), (int, float))),
                             *(f"{k} {real[k]:.4g} at batch 1 and real lengths" for k in ("top1_agreement", "max_abs_diff")
                               if isinstance(real.get(k), (int, float)))])
        raise ParityError(
            f"{folder} failed its parity check against the source model when it was exported "
            f"({figures or 'see parity in its artifact.json'}): it does not answer as the model it was exported "
            "from. Re-export it (edgekd export) after fixing what failed; load_artifact(..., "
            "allow_failed_parity=True) opens it for inspection only."
        )
    name = meta.get("exporter") or meta.get("target")
    if not name or not meta.get("file"):
        raise UnsupportedTargetError(f"{folder}/artifact.json names no exporter or file: re-export this target.")
    exporter = get_exporter(str(name))
    path = folder / meta["file"]
    if verify and path.exists() and meta.get("sha256") and artifact_digest(path) != meta["sha256"]:
        raise ChecksumError(
            f"{path} does not match the sha256 in {folder}/artifact.json: it changed after export. Re-export it."
        )
    # Session options the folder records for itself (an ONNX folder's tuned optimisers) come first;
    # the caller's own options override them.
    return exporter.load(path, **{**meta.get(RUNTIME_OPTIONS, {}), **runtime_opts}), meta
