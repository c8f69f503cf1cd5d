"""The export stage: every requested target into ``out_root/<target>/``, each checked for parity.

Policy (``ExportConfig.strict``):
- A target that cannot run here (a dependency missing) or whose conversion fails (an operator it
  cannot convert) becomes a record with ``built: false`` and the reason, and the other targets go
  on; with ``strict: true`` it raises instead. Wrong option names or values always raise.
- A target that writes what must be built elsewhere (TensorRT without TensorRT) is recorded with
  ``built: false`` and its reason; its folder holds everything needed to build it there.
- Parity runs through ``load_artifact`` (the server's and the benchmark's path) where the artifact
  can run here; otherwise the record says why. A threshold miss raises ``ParityError`` after every
  target has been exported and its figures written, with the records on the error (``.records``).

Each folder is written atomically and is self-contained: the artifact, its ``artifact.json`` and the
tokenizer files, ready to serve or to copy to a device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
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
from edgekd.export.parity import check_parity, check_real_lengths
from edgekd.progress import track
from edgekd.runfolder import atomic_dir, sha256_file, sha256_tree

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


def _record(name: str, status: str, reason: str | None = None, **fields: Any) -> dict[str, Any]:
    """One target's manifest record. status: ok, not_built (written, to be built elsewhere),
    unavailable (a dependency is missing here) or failed (the conversion failed)."""
    rec = {"target": name, "status": status, "built": status == "ok", "reason": reason, "folder": None,
           "path": None, "size_bytes": None, "sha256": None, "parity": None}
    rec.update(fields)
    return rec


def _export_one(exporter: Exporter, module: Any, io: ModelIO, out_root: Path, cfg: ExportConfig,
                examples: dict[str, np.ndarray], labels: np.ndarray | None, metric_fn: Callable | None,
                meta: dict[str, Any], extra_files: list[Path],
                agreement_fn: Callable | None = None, defaults: dict[str, Any] | None = None,
                reference: Any = None, timing_rows: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
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
    folder = Path(out_root) / name
    ok, why = exporter.available()
    if not ok:
        if cfg.strict:
            exporter.require()
        log.warning("export target '%s' skipped: %s", name, why)
        drop_stale(folder)
        return _record(name, "unavailable", why)

    t0 = time.perf_counter()
    try:
        with atomic_dir(folder) as tmp:
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
            publish_modes(tmp)
    except RecipeError:
        raise
    except (UnsupportedTargetError, MissingBackendError, ParityError) as e:
        if cfg.strict:
            raise
        log.warning("export target '%s' failed: %s", name, e)
        drop_stale(folder)
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
    try:
        runner, _ = load_artifact(folder)
    except (UnsupportedTargetError, MissingBackendError) as e:
        rec["parity"] = {"ran": False, "reason": str(e)}
    else:
        want = module if reference is None else reference  # parity's source: the model's own forward
        # The folder is published already, with no parity figure yet: a check that cannot finish (outputs
        # of another shape, an input longer than a fixed-shape program takes) must not leave it loadable.
        try:
            report = check_parity(runner, want, examples, labels, metric_fn, cfg.parity_batch_size, target=name,
                                  agreement_fn=agreement_fn)
            # And as a server calls it: each text alone at its own length (the batched check pads them all).
            real = check_real_lengths(runner, want, examples, target=name)
        except (UnsupportedTargetError, MissingBackendError, ParityError) as e:
            drop_stale(folder, "its parity check could not run")
            if cfg.strict:
                raise
            log.warning("export target '%s' failed its parity check: %s", name, e)
            return _record(name, "failed", f"parity check: {e}", seconds=round(time.perf_counter() - t0, 2))
        except BaseException:
            drop_stale(folder, "its parity check could not run")
            raise
        misses = report.failures(cfg.min_top1_agreement, cfg.max_abs_diff)
        rec["parity"] = {"ran": True, **report.to_dict()}
        if real is not None:
            rec["parity"]["real_lengths"] = real.to_dict()
            misses += [f"at batch 1 and real lengths, {m}" for m in real.failures(cfg.min_top1_agreement,
                                                                                   cfg.max_abs_diff)]
        rec["parity"]["passed"] = not misses
        if misses:
            rec["parity_misses"] = f"'{name}': {'; '.join(misses)} ({report.summary()})"
    rec["parity_seconds"] = round(time.perf_counter() - t1, 2)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    art["parity"] = rec["parity"]
    write_artifact_meta(folder, art)
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
    records the faster session in artifact.json (``runtime_options``, ``session_tuning``)."""
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
    if problems:
        raise RecipeError(problems)
    missing = [n for n in io.input_names if n not in parity_inputs]
    if missing:
        raise EdgeKDError(f"parity inputs lack {missing}; the task's parity_data() must give {io.input_names}.")
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
    records: dict[str, dict[str, Any]] = {}
    misses = []
    for ex in track(exporters, "export", label=lambda e: e.name):
        rec = _export_one(ex, module, io, Path(out_root), cfg, examples, labels, metric_fn, meta, extra_files,
                          agreement_fn, defaults.get(ex.name), reference, timing_rows)
        if "parity_misses" in rec:
            misses.append(rec.pop("parity_misses"))
        records[ex.name] = rec
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
