"""Find, verify and load the served artifact: export folder -> runner + codec + facts for /metadata.

The codec is picked once, here, from artifact.json's ``task`` (``CODECS``); everything after the
load (routes, batcher, metrics) works through the codec and asks no more what the task is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from edgekd.errors import ChecksumError, StageError
from edgekd.export.base import ARTIFACT_META, Runner, read_artifact_meta
from edgekd.export.stage import artifact_digest, load_artifact
from edgekd.runfolder import MANIFEST, sha256_file
from edgekd.serving.codec import TextCodec
from edgekd.serving.settings import ServeSettings
from edgekd.serving.vision import DetectionCodec

log = logging.getLogger("edgekd.serving")

Loader = Callable[..., tuple[Runner, dict[str, Any]]]
AnyCodec = TextCodec | DetectionCodec
CodecFactory = Callable[[Path, dict[str, Any], Runner, ServeSettings], AnyCodec]

# artifact.json's ``task`` -> the codec that serves it. Exports written before tasks were recorded
# are text classifiers.
DEFAULT_TASK = TextCodec.task
CODECS: dict[str, CodecFactory] = {
    TextCodec.task: TextCodec.for_artifact,
    DetectionCodec.task: DetectionCodec.for_artifact,
}

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


def resolve_export_dir(path: str | Path, target: str | None = None) -> Path:
    """``RUN_DIR/export/<target>/``, or ``path`` itself when it already is an export folder."""
    path = Path(path)
    if (path / ARTIFACT_META).is_file():
        return path
    if not path.is_dir():
        raise StageError(f"{path} does not exist: give a run folder (runs/<name>) or an export folder.")
    export_root = path / "export"
    targets = sorted(p.name for p in export_root.iterdir() if (p / ARTIFACT_META).is_file()) if export_root.is_dir() else []
    if not targets:
        raise StageError(
            f"{path} holds no exported artifact (no {export_root}/<target>/{ARTIFACT_META}): "
            "run `edgekd export RUN_DIR --to TARGET` first, or give an export folder."
        )
    if target is None:
        if len(targets) == 1:
            return export_root / targets[0]
        raise StageError(f"{path} has several exports ({', '.join(targets)}): choose one with --target.")
    if target not in targets:
        raise StageError(f"{path} has no export '{target}'; exports there: {', '.join(targets)}.")
    return export_root / target


def run_root(folder: Path) -> Path | None:
    """The run folder an export folder lives in (``<run>/export/<target>``), if it has a manifest."""
    folder = Path(folder).resolve()
    root = folder.parent.parent
    if folder.parent.name == "export" and (root / MANIFEST).is_file():
        return root
    return None


def verify_artifact(folder: Path, meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Check the artifact against the sha256 recorded in artifact.json (the artifact and, when listed
    under ``files``, every file it consists of, such as external ONNX weights) and, inside a run
    folder, in the run's manifest. Returns the artifact path and the manifest ({} outside a run)."""
    folder = Path(folder)
    name = meta.get("file")
    if not name:
        raise StageError(f"{folder / ARTIFACT_META} names no artifact 'file': re-export this target.")
    artifact = folder / name
    if not artifact.exists():
        raise StageError(f"{artifact} is missing (named by {folder / ARTIFACT_META}): re-export this target.")
    if not meta.get("sha256"):
        raise ChecksumError(f"{folder / ARTIFACT_META} records no sha256 for {name}, so the artifact cannot be "
                            "verified: re-export this target.")
    expected = {name: meta["sha256"], **{k: v for k, v in (meta.get("files") or {}).items() if v}}
    for fname, want in expected.items():
        path = folder / fname
        actual = artifact_digest(path) if path.exists() else "missing"
        if actual != want:
            raise ChecksumError(
                f"refusing to serve {path}: its sha256 is {actual} but {ARTIFACT_META} records {want}. "
                "The file was changed or corrupted after export: re-export this target."
            )

    root = run_root(folder)
    if root is None:
        return artifact, {}
    manifest = json.loads((root / MANIFEST).read_text())
    # The manifest records every file of a stage's outputs (a folder artifact file by file).
    recorded: dict[str, str] = {}
    for rec in manifest.get("stages", {}).values():
        if isinstance(rec, dict):
            recorded.update(rec.get("artifacts") or {})
    files = [artifact] if artifact.is_file() else sorted(p for p in artifact.rglob("*") if p.is_file())
    checked = 0
    for f in files:
        rel = str(f.resolve().relative_to(root))
        if rel in recorded:
            checked += 1
            if sha256_file(f) != recorded[rel]:
                raise ChecksumError(
                    f"refusing to serve {artifact}: {rel} does not match the sha256 that {root / MANIFEST} "
                    "records. The artifact does not belong to this run: re-export this target."
                )
    if not checked:
        log.warning("%s is not recorded in %s; verified against %s only", artifact, root / MANIFEST, ARTIFACT_META)
    return artifact, manifest


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
    codec: AnyCodec
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


def codec_factory(folder: Path, meta: dict[str, Any]) -> CodecFactory:
    """The codec for artifact.json's ``task``; refused before the (possibly slow) runner load."""
    task = meta.get("task") or DEFAULT_TASK
    if task not in CODECS:
        raise StageError(f"{folder / ARTIFACT_META} records task '{task}', which this server cannot serve; "
                         f"it serves {', '.join(CODECS)}.")
    return CODECS[task]


def load_served_model(settings: ServeSettings, loader: Loader | None = None) -> ServedModel:
    """Verify and load ``settings.export_dir``; run one input through it so the first request is warm."""
    if settings.export_dir is None:
        raise StageError("no export folder to serve: set export_dir (e.g. runs/<name>/export/onnx).")
    folder = resolve_export_dir(settings.export_dir)
    meta = read_artifact_meta(folder)
    make_codec = codec_factory(folder, meta)
    artifact, manifest = verify_artifact(folder, meta)

    opts = dict(settings.runtime_options)
    if settings.threads is not None:
        opts["threads"] = settings.threads
    runner, loaded_meta = (loader or default_loader)(folder, **opts)
    meta = {**meta, **(loaded_meta or {})}

    codec = make_codec(folder, meta, runner, settings)

    target = str(meta.get("target") or folder.name)
    resolved = folder.resolve()
    in_run = resolved.parent.name == "export"
    name = settings.model_name or (resolved.parent.parent.name if in_run else resolved.name)
    return ServedModel(
        name=name, target=target, folder=folder, artifact=artifact, meta=meta, runner=runner, codec=codec,
        manifest_figures=_manifest_figures(manifest, target), versions=_versions(),
    )

