"""The run folder: the only state shared between stages.

``runs/<name>/manifest.json`` records, per stage, its settings fingerprint, metrics, timings, the
sha256 of every artifact it wrote, an id of its own, and the ids of the records of the stages it read
(``inputs``). A stage is current when its settings, its files and the records it read are all
unchanged: a stage run again (``--force``) makes every stage that read its old result out of date,
however equal the settings. Every write is atomic (temporary path, then rename), so an
interrupted run never leaves a half-written file behind. One command runs stages on a folder at a
time (:meth:`RunFolder.exclusive`), and every manifest write holds the folder's write lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgekd.errors import StageError

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
INVOCATIONS = "invocations.jsonl"
COMMAND_LOCK = ".edgekd.lock"  # held by the one command that runs stages on the folder (flock: freed if it dies)
COMMAND_OWNER = ".edgekd.lock.json"  # who holds it, for the message a second command gets
WRITE_LOCK = ".manifest.lock"  # held for each read-modify-write of manifest.json and invocations.jsonl
WRITE_LOCK_SECONDS = 120.0


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_FOLDER_DIGESTS: dict[tuple, str] = {}


def folder_digest(path: str | Path) -> str:
    """One sha256 over every file under the folder ``path``: each file's name relative to it and its
    contents. Names starting with "." at any depth are left out (a .git or .cache beside a model's
    files). Cached in the process on each file's size and modification time, so a fingerprint that is
    computed many times per command reads a large model folder once."""
    root = Path(path).expanduser().resolve()
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    stats = tuple((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(root), stats)
    if key not in _FOLDER_DIGESTS:
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
        _FOLDER_DIGESTS[key] = h.hexdigest()
    return _FOLDER_DIGESTS[key]


def local_model_digest(name_or_path: str | None) -> str | None:
    """:func:`folder_digest` of a model given as a local folder (what ``from_pretrained`` and the task
    families load when the folder exists); None for a named asset or a hub id, whose name pins it."""
    if not name_or_path or not Path(name_or_path).expanduser().is_dir():
        return None
    return folder_digest(name_or_path)


def sha256_tree(path: Path) -> dict[str, str]:
    """sha256 of each file under ``path`` (a file or a folder), keyed by path relative to ``path``'s parent."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {
        str(p.relative_to(path.parent)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()
    }


def fingerprint(obj: Any) -> str:
    """A stable hash of JSON-able settings, used to decide whether a stage must run again."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, renamed over it. What a writer killed
    before its rename left for ``path`` is removed first (``owners.clear_leftovers``)."""
    from edgekd.owners import clear_leftovers, staged_name

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path.parent, ".tmp", path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=staged_name(path.name), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file is published as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` (the earlier one set aside,
    the new one renamed in, the earlier one removed). What a process killed meanwhile left for ``final`` is
    cleared first (``owners.clear_leftovers``): its temporary folder removed, an earlier ``final`` it had set
    aside put back where nothing took its place."""
    from edgekd.owners import clear_leftovers, set_aside_name, staged_name

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(final.parent, ".tmp", final.name)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=staged_name(final.name), suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; others (a container's user) may read it
        yield tmp
        if final.exists():
            old = final.with_name(set_aside_name(final.name))
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every run, so figures can be reproduced or questioned."""
    from importlib import metadata

    versions = {}
    for pkg in (
        "edgekd", "torch", "transformers", "accelerate", "numpy", "onnx", "onnxruntime",
        "optimum", "executorch", "coremltools", "torch-pruning", "torchao", "fastapi",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "packages": versions,
    }


class RunFolder:
    """``runs/<name>/``: paths of each stage's outputs and the manifest that records them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._reading: dict[str, dict[str, str | None]] = {}  # stage about to run -> the records it reads

    # --- paths -----------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def recipe_path(self) -> Path:
        return self.root / RECIPE

    # --- manifest --------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if self.manifest_path.is_file():
            return json.loads(self.manifest_path.read_text())
        return {"stages": {}}

    def _write_manifest(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.manifest_path, json.dumps(data, indent=2, sort_keys=False, default=str))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the folder's write lock for one read-modify-write of the manifest or the invocations file,
        so that two processes writing at once (a command and `edgekd` in another shell, the processes
        of `accelerate launch`) never lose each other's lines."""
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(self.root / WRITE_LOCK, timeout=WRITE_LOCK_SECONDS):
                yield
        except Timeout:
            raise StageError(f"could not write {self.manifest_path}: another process held its write lock "
                             f"({self.root / WRITE_LOCK}) for over {WRITE_LOCK_SECONDS:.0f} s; if no edgekd "
                             "command is running on this folder, the file system may not support locks "
                             "(a network share): use a run folder on a local disk") from None

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """Run one command's stages with the folder to itself: a second command on the same run folder
        while this one runs is refused at once, naming the one that runs (two would write the same stage
        folders and time their latencies against each other). The lock is the operating system's, so a
        command that dies frees it; ``what`` is the message's name for this command."""
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.root / COMMAND_LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise StageError(f"another edgekd command is running on the run folder {self.root} "
                             f"({self._lock_owner()}): wait for it to finish, or run this one on another "
                             "run folder (--set name=<another name>)") from None
        owner = self.root / COMMAND_OWNER
        try:
            atomic_write_text(owner, json.dumps({
                "pid": os.getpid(), "command": what, "argv": sys.argv,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
            yield
        finally:
            with contextlib.suppress(OSError):
                owner.unlink()
            lock.release()

    def _lock_owner(self) -> str:
        try:
            owner = json.loads((self.root / COMMAND_OWNER).read_text())
        except (OSError, ValueError):
            return "its details were not written yet"
        return f"pid {owner.get('pid')}, {owner.get('command')}, since {owner.get('since')} UTC"

    def recipe_turns_off(self, stage: str) -> bool:
        """Whether the run's saved recipe.yaml turns ``stage`` off (``<stage>.enabled: false``): what such a
        stage recorded earlier is no longer part of the run (its recommendation is not what ships). False
        without a readable recipe.yaml."""
        import yaml

        try:
            data = yaml.safe_load(self.recipe_path.read_text())
        except (OSError, yaml.YAMLError):
            return False
        section = data.get(stage) if isinstance(data, dict) else None
        return isinstance(section, dict) and section.get("enabled") is False

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.manifest().get("stages", {}).get(stage)

    def is_done(self, stage: str, fp: str) -> bool:
        """True when ``stage`` finished with the same settings fingerprint, its artifacts are intact and
        every stage it read still holds the record it read (see :meth:`stale_reason`)."""
        return self.stale_reason(stage, fp) is None

    def stale_reason(self, stage: str, fp: str | None) -> str | None:
        """Why the recorded ``stage`` cannot be reused with settings fingerprint ``fp``; None when it can.
        ``fp`` None leaves the settings out: whether the record is still whole (its files, and the records
        it was made from)."""
        rec = self.stage_record(stage)
        if not rec or rec.get("status") != "done":
            return "it has not finished in this run folder"
        if fp is not None and rec.get("fingerprint") != fp:
            return "the recipe's settings for it changed"
        for rel, digest in rec.get("artifacts", {}).items():
            p = self.root / rel
            if not p.is_file() or sha256_file(p) != digest:
                return f"its file {rel} is missing or changed"
        return self._inputs_changed(stage, rec, set())

    def superseded(self, stage: str) -> str | None:
        """Why the recorded ``stage`` no longer follows from the records it was made from (one of them run
        again or removed since, down the chain), without hashing its files; None when it still does."""
        rec = self.stage_record(stage)
        return self._inputs_changed(stage, rec, set()) if rec and rec.get("status") == "done" else None

    def _inputs_changed(self, stage: str, rec: dict[str, Any], seen: set[str]) -> str | None:
        """Which stage ``stage``'s record read has been run again or removed since, down the whole chain
        (export read prune, prune read distill: distill run again makes export stale too)."""
        seen.add(stage)
        for name, read in rec.get("inputs", {}).items():
            now = self.stage_record(name)
            if read is None:  # not finished when this record was made: it is out of date once it is
                if now and now.get("status") == "done":
                    return f"the {name} stage, which it reads, had not finished when it was made and has since"
                continue
            if not now or now.get("status") != "done" or self.record_id(name, now) != read:
                return f"the {name} stage it was made from was run again or removed since"
            if name not in seen:
                why = self._inputs_changed(name, now, seen)
                if why:
                    return why
        return None

    @staticmethod
    def record_id(stage: str, rec: dict[str, Any]) -> str:
        """The id of a stage's record (records written before ids existed: their fingerprint and time)."""
        return rec.get("id") or f"{rec.get('fingerprint')}@{rec.get('finished')}"

    def will_read(self, stage: str, inputs: list[str] | tuple[str, ...]) -> None:
        """Note the records of ``inputs`` that ``stage`` is about to read; its :meth:`record` keeps their
        ids. A stage not finished here is kept as None (a bench run before the quantize stage it reads): the
        record is out of date once that stage finishes (a stage's own checks refuse an input it needs)."""
        ids: dict[str, str | None] = {}
        for name in inputs:
            rec = self.stage_record(name)
            ids[name] = self.record_id(name, rec) if rec and rec.get("status") == "done" else None
        self._reading[stage] = ids

    def record(
        self,
        stage: str,
        fp: str,
        metrics: dict[str, Any],
        artifacts: list[Path] | None = None,
        seconds: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a finished stage: fingerprint, metrics, timing, sha256 of every artifact file, a new id,
        and the ids of the records it read (:meth:`will_read`)."""
        hashes: dict[str, str] = {}
        for a in artifacts or []:
            a = Path(a)
            files = [a] if a.is_file() else sorted(p for p in a.rglob("*") if p.is_file())
            for f in files:
                hashes[str(f.relative_to(self.root))] = sha256_file(f)
        rec = {
            "status": "done",
            "id": uuid.uuid4().hex,
            "fingerprint": fp,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 2) if seconds is not None else None,
            "metrics": metrics,
            "artifacts": hashes,
        }
        if self._reading.get(stage):
            rec["inputs"] = self._reading[stage]
        if extra:
            rec.update(extra)
        with self._writing():
            data = self.manifest()
            data.setdefault("stages", {})[stage] = rec
            data["updated"] = rec["finished"]
            self._write_manifest(data)
        return rec

    @property
    def invocations_path(self) -> Path:
        return self.root / INVOCATIONS

    def append_invocation(self, record: dict[str, Any]) -> None:
        """One JSON line per command run on this folder (rewritten whole, atomically: a crash never
        leaves a torn line; under the write lock, so two commands never lose each other's line)."""
        with self._writing():
            old = self.invocations_path.read_text() if self.invocations_path.is_file() else ""
            atomic_write_text(self.invocations_path, old + json.dumps(record, default=str) + "\n")

    def invocations(self) -> list[dict[str, Any]]:
        if not self.invocations_path.is_file():
            return []
        return [json.loads(line) for line in self.invocations_path.read_text().splitlines() if line.strip()]

    def update_top(self, **fields: Any) -> None:
        with self._writing():
            data = self.manifest()
            data.update(fields)
            self._write_manifest(data)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
