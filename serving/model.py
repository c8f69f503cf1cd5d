"""Find, verify and load the served artifact: export folder -> runner + codec + facts for /metadata.

The task family is picked once, here, from artifact.json's ``task`` (``edgekd.serving.family``); everything
after the load (routes, batcher, metrics) works through its codec and handlers and asks no more what
the task is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from edgekd.errors import ChecksumError, StageError, UnsupportedTargetError
from edgekd.export import get_exporter
from edgekd.export.base import (
    ARTIFACT_META,
    EXTRA_DIGESTS,
    HF_CONFIG,
    META_DIGEST,
    Runner,
    made_from_an_earlier_export,
    meta_digest,
    read_artifact_meta,
)
from edgekd.export.stage import artifact_digest, load_artifact
from edgekd.registry import DEFAULT_TASK
from edgekd.runfolder import MANIFEST, sha256_file
from edgekd.serving.codec import Codec
from edgekd.serving.family import ServeFamily, serve_family
from edgekd.serving.settings import ServeSettings, refuse_unread
from edgekd.shipping import export_folders, read_manifest, shipped_export

log = logging.getLogger("edgekd.serving")

Loader = Callable[..., tuple[Runner, dict[str, Any]]]

# Platform names of the Open Inference Protocol ("<project>_<format>"), by export target family.
PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "tensorrt": "tensorrt_plan",
    "executorch": "executorch_pte",
    "torchscript": "pytorch_torchscript",
    "coreml": "coreml_mlpackage",
}

VERSIONED_PACKAGES = ("edgekd", "onnxruntime", "tensorrt", "executorch", "coremltools", "tokenizers", "numpy",
                      "fastapi", "uvicorn")


def choose_export(path: str | Path, target: str | None = None, *,
                  choose: str = "choose one with --target") -> tuple[Path, str | None]:
    """The export folder to serve and, when edgekd chose it rather than the caller, why.

    ``path`` is an export folder, or a run folder: then ``RUN_DIR/export/<target>/``; without a target,
    what the run ships by the rule the summary follows too (``edgekd.shipping.shipped_export``: the quantize
    stage's recommendation, else the only current export), or an error saying why nothing is chosen, which
    ends with ``choose`` (how the caller names an export: the CLI's ``--target``, the API's ``target=``)."""
    path = Path(path)
    if (path / ARTIFACT_META).is_file():
        if target is not None and target != path.name:
            raise StageError(f"{path} is an export folder itself, so target '{target}' (which picks an export of a run "
                             f"folder) would choose nothing: drop it, or give the run folder")
        return _named(path), None
    if not path.is_dir():
        raise StageError(f"{path} does not exist: give a run folder (runs/<name>) or an export folder.")
    export_root = path / "export"
    targets = export_folders(path)
    if not targets:
        raise StageError(
            f"{path} holds no exported artifact (no {export_root}/<target>/{ARTIFACT_META}): "
            "run `edgekd export RUN_DIR --to TARGET` first, or give an export folder."
        )
    if target is not None:
        if target not in targets:
            raise StageError(f"{path} has no export '{target}'; exports there: {', '.join(targets)}.")
        return _named(export_root / target), None
    name, why = shipped_export(path, choose=choose)
    if name is None:
        raise StageError(f"{path}: {why}.")
    return export_root / name, f"{name}, {why}"


def _named(folder: Path) -> Path:
    """An export the caller named is served as asked; one quantized from an export redone since is said to be."""
    why = made_from_an_earlier_export(folder)
    if why:
        log.warning("serving %s as asked, though it is out of date: %s", folder, why)
    return folder


def resolve_export_dir(path: str | Path, target: str | None = None) -> Path:
    """``RUN_DIR/export/<target>/``, or ``path`` itself when it already is an export folder (see ``choose_export``)."""
    folder, why = choose_export(path, target)
    if why:
        log.info("serving %s: %s", folder, why)
    return folder


def run_root(folder: Path) -> Path | None:
    """The run folder an export folder lives in (``<run>/export/<target>``), if it has a manifest."""
    folder = Path(folder).resolve()
    root = folder.parent.parent
    if folder.parent.name == "export" and (root / MANIFEST).is_file():
        return root
    return None


# Files beside the artifact that the server (or a fallback tokenizer) may read: when present, each must be
# covered by a sha256 (artifact.json's or the run manifest's), or the folder is refused.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
                   "vocab.json", "added_tokens.json", "sentencepiece.bpe.model", "spiece.model", HF_CONFIG)
REEXPORT = "re-export this target (`edgekd export RUN_DIR`), or restore the file"


def _recorded(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file the manifest records (each stage records its outputs file by file), by run-relative path."""
    recorded: dict[str, str] = {}
    for rec in (manifest.get("stages") or {}).values():
        if isinstance(rec, dict) and isinstance(rec.get("artifacts"), dict):
            recorded.update(rec["artifacts"])
    return recorded


def verify_artifact(folder: Path, meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Check every file serving the artifact reads before anything loads it: the artifact (and every file it
    consists of, such as external ONNX weights), the tokenizer and its vocabulary and config files, and
    artifact.json itself (labels, io), against the sha256 recorded in artifact.json and, inside a run folder,
    in the run's manifest. A changed byte anywhere is a ChecksumError naming the file. Returns the artifact
    path and the manifest ({} outside a run)."""
    folder = Path(folder)
    name = meta.get("file")
    if not name:
        raise StageError(f"{folder / ARTIFACT_META} names no artifact 'file': {REEXPORT}.")
    artifact = folder / name
    if meta.get("built") is False:
        how = (f"run {folder / 'trtexec.sh'} on the device (it builds {name} and records it in {ARTIFACT_META})"
               if (folder / "trtexec.sh").is_file() else "export it where its runtime is installed")
        raise StageError(f"{folder} holds an export that was not built ({meta.get('reason') or 'no reason recorded'}): "
                         f"{how}, then serve it.")
    if not artifact.exists():
        raise StageError(f"{artifact} is missing (named by {folder / ARTIFACT_META}): {REEXPORT}.")
    if not meta.get("sha256"):
        raise ChecksumError(f"{folder / ARTIFACT_META} records no sha256 for {name}, so the artifact cannot be "
                            f"verified: {REEXPORT}.")
    extra = meta.get(EXTRA_DIGESTS) or {}
    if not isinstance(extra, dict):
        raise ChecksumError(f"{folder / ARTIFACT_META}: '{EXTRA_DIGESTS}' is not a mapping of file -> sha256: {REEXPORT}.")
    expected = {name: meta["sha256"], **{k: v for k, v in (meta.get("files") or {}).items() if v}, **extra}
    for fname, want in expected.items():
        path = folder / fname
        actual = artifact_digest(path) if path.exists() else "missing"
        if actual != want:
            raise ChecksumError(
                f"refusing to serve {path}: its sha256 is {actual} but {ARTIFACT_META} records {want}. "
                f"The file was changed or corrupted after export: {REEXPORT}."
            )
    sealed = META_DIGEST in meta
    if sealed and meta[META_DIGEST] != meta_digest(meta):
        raise ChecksumError(
            f"refusing to serve {folder}: {folder / ARTIFACT_META} was edited after export (its content no longer "
            f"matches its {META_DIGEST}; labels, io or digests changed): {REEXPORT}."
        )

    root = run_root(folder)
    manifest = read_manifest(root) if root is not None else {}
    recorded = _recorded(manifest)
    covered = set(expected)
    in_manifest = False
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(f.resolve().relative_to(root)) if root is not None else None
        if rel is None or rel not in recorded or (sealed and f.name == ARTIFACT_META and f.parent == folder):
            continue  # a sealed artifact.json was checked above; rewriting it (with its seal) is allowed
        in_manifest = True
        if sha256_file(f) != recorded[rel]:
            unfinished = _unrecorded_export(folder, meta, root, recorded)
            if unfinished:
                raise ChecksumError(unfinished)
            raise ChecksumError(
                f"refusing to serve {folder}: {f} does not match the sha256 that {root / MANIFEST} records. "
                f"The file was changed after the run wrote it, or does not belong to this run: {REEXPORT}."
            )
        covered.add(str(f.relative_to(folder)))
    if not sealed and ARTIFACT_META not in covered:
        raise ChecksumError(f"{folder / ARTIFACT_META} records no {META_DIGEST} (it predates per-file checksums), "
                            f"so its labels and io cannot be verified: {REEXPORT}.")
    needed = [str(n) for n in (meta.get("extra_files") or [])] + [n for n in COMPANION_FILES if (folder / n).exists()]
    unchecked = sorted({n for n in needed if n not in covered and (folder / n).exists()})
    if unchecked:
        raise ChecksumError(
            f"refusing to serve {folder}: no sha256 covers {', '.join(unchecked)} (read when serving; "
            f"{ARTIFACT_META} predates per-file checksums): {REEXPORT}."
        )
    missing = sorted(n for n in needed if not (folder / n).exists())
    if missing:
        raise StageError(f"{folder} lacks {', '.join(missing)} (listed in {ARTIFACT_META}): {REEXPORT}.")
    if root is not None and not in_manifest:
        log.warning("%s is not recorded in %s; verified against %s only", artifact, root / MANIFEST, ARTIFACT_META)
    return artifact, manifest


def _unrecorded_export(folder: Path, meta: dict[str, Any], root: Path, recorded: dict[str, str]) -> str | None:
    """Why a folder that disagrees with the run's manifest was most likely written by an export the manifest
    never recorded, or None. Such a folder is whole (its sealed artifact.json matches every file it names, as
    ``verify_artifact`` checked before) but its artifact.json is not the one the manifest records, and no file
    the export wrote was recorded for it: the export stage stopped after writing it and before recording it
    (a stage killed while publishing its folders, or an earlier version that published each target as it
    went), or the folder was copied in from another run."""
    meta_file = folder / ARTIFACT_META
    rel = str(meta_file.resolve().relative_to(root))
    if META_DIGEST not in meta or rel not in recorded or sha256_file(meta_file) == recorded[rel]:
        return None
    # The files this artifact.json names all match it; the manifest records others for them.
    named = {meta.get("file"), *(meta.get("files") or {}), *(meta.get(EXTRA_DIGESTS) or {})} - {None}
    differs = [n for n in sorted(named) if (folder / n).is_file() and
               recorded.get(str((folder / n).resolve().relative_to(root))) not in (None, sha256_file(folder / n))]
    if not differs:
        return None
    return (f"refusing to serve {folder}: it holds an export that {root / MANIFEST} does not record (its "
            f"{ARTIFACT_META}, created {meta.get('created') or 'at an unknown time'}, and {', '.join(differs[:3])} "
            f"are not the ones the manifest records). The export stage did not finish: it wrote this folder and "
            f"stopped before recording it (or the folder was copied in from another run). Run the export stage "
            f"again (`edgekd export {root}`) and serve what it records.")


def _manifest_figures(manifest: dict[str, Any], target: str) -> dict[str, Any]:
    """Accuracy and parity figures the run recorded for this model, stage by stage."""
    figures: dict[str, Any] = {}
    for stage, rec in manifest.get("stages", {}).items():
        metrics = rec.get("metrics") if isinstance(rec, dict) else None
        if not metrics:
            continue
        if stage == "export" and isinstance(metrics.get(target), dict):
            metrics = metrics[target]
        figures[stage] = metrics
    return figures


def _versions() -> dict[str, str]:
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class ServedModel:
    """Everything the routes need about the one model this server serves."""

    name: str
    target: str
    folder: Path
    artifact: Path
    meta: dict[str, Any]
    runner: Runner
    codec: Any  # the family's codec (edgekd.serving.codec.Codec)
    family: ServeFamily
    manifest_figures: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> str:
        target = str(self.meta.get("exporter") or self.target)
        for family, platform in PLATFORMS.items():
            if target.startswith(family):
                return platform
        return f"edgekd_{target}"

    @property
    def runtime(self) -> dict[str, Any]:
        info: dict[str, Any] = {"runner": type(self.runner).__name__}
        for attr in ("providers", "device", "threads"):
            value = getattr(self.runner, attr, None)
            if value is not None and not callable(value):
                info[attr] = value
        return info


def default_loader(folder: Path, **runtime_opts: Any) -> tuple[Runner, dict[str, Any]]:
    return load_artifact(folder, **runtime_opts)


def family_of(folder: Path, meta: dict[str, Any]) -> ServeFamily:
    """The task family that serves artifact.json's ``task``; refused before the (possibly slow) runner load."""
    task = meta.get("task") or DEFAULT_TASK
    try:
        return serve_family(task)
    except StageError as e:
        raise StageError(f"{folder / ARTIFACT_META} records task '{task}': {e}") from None


def applies_threads(meta: dict[str, Any]) -> bool:
    """Whether the runner of the export ``meta`` describes applies intra-op threads (``Exporter.applies_threads``:
    Core ML, TensorRT and the TorchScript lite interpreter choose their own, and refuse the option at load)."""
    try:
        return get_exporter(str(meta.get("exporter") or meta.get("target") or "")).applies_threads
    except UnsupportedTargetError:
        return True  # load_artifact says what is wrong with the folder


def load_served_model(settings: ServeSettings, loader: Loader | None = None) -> ServedModel:
    """Verify and load ``settings.export_dir``; run one input through it so the first request is warm."""
    if settings.export_dir is None:
        raise StageError("no export folder to serve: set export_dir (e.g. runs/<name>/export/onnx).")
    folder = resolve_export_dir(settings.export_dir)
    meta = read_artifact_meta(folder)
    family = family_of(folder, meta)
    artifact, manifest = verify_artifact(folder, meta)

    opts = dict(settings.runtime_options)
    if settings.threads is not None and applies_threads(meta):  # else refused below, naming the setting's source
        opts["threads"] = settings.threads
    runner, loaded_meta = (loader or default_loader)(folder, **opts)
    meta = {**meta, **(loaded_meta or {})}

    codec: Codec = family.codec(folder, meta, runner, settings)

    resolved = folder.resolve()
    in_run = resolved.parent.name == "export"
    # Inside a run the folder's name is the target's (onnx-int8); a folder served alone says it in artifact.json.
    target = folder.resolve().name if run_root(folder) is not None else str(meta.get("target") or folder.name)
    name = settings.model_name or (resolved.parent.parent.name if in_run else resolved.name)
    if settings.threads is not None and getattr(runner, "threads", None) != settings.threads:
        # A runner reports the intra-op threads it applied; Core ML, TensorRT and the TorchScript lite
        # interpreter (torch's process-wide pool) choose their own, so the setting would do nothing.
        refuse_unread(settings, ("threads",), f"the '{target}' export's {type(runner).__name__} does not apply "
                                              "intra-op threads (its runtime chooses them)")
    return ServedModel(
        name=name, target=target, folder=folder, artifact=artifact, meta=meta, runner=runner, codec=codec, family=family,
        manifest_figures=_manifest_figures(manifest, target), versions=_versions(),
    )

