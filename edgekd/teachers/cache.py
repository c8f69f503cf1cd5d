"""The on-disk answer cache of a black-box teacher: an interrupted run never asks twice.

One JSON line per answered text, keyed by sha256 of (teacher identity, text). Lines are appended
with a single ``write`` on an ``O_APPEND`` descriptor and synced after each batch, so a crash can
at worst leave one partial last line; that line is cut off when the cache is opened again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def identity_digest(identity: dict[str, Any]) -> str:
    """sha256 of a teacher's identity (what its answers depend on), as canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def answer_key(identity_sha: str, text: str) -> str:
    return hashlib.sha256(f"{identity_sha}\n{text}".encode()).hexdigest()


class AnswerCache:
    """Answers of one teacher (``identity``), stored in ``folder/<identity sha256>.jsonl``."""

    def __init__(self, folder: str | Path, identity: dict[str, Any]):
        self.identity = identity
        self.identity_sha = identity_digest(identity)
        self.path = Path(folder) / f"{self.identity_sha[:32]}.jsonl"
        self._answers: dict[str, Any] = {}
        self.dropped_partial_line = False
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A write cut short by a crash: drop it, so the next append starts on a fresh line.
            os.truncate(self.path, end)
            self.dropped_partial_line = True
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            self._answers[rec["k"]] = rec["v"]

    def key(self, text: str) -> str:
        return answer_key(self.identity_sha, text)

    def __len__(self) -> int:
        return len(self._answers)

    def __contains__(self, text: str) -> bool:
        return self.key(text) in self._answers

    def get(self, text: str) -> Any:
        return self._answers[self.key(text)]

    def add(self, texts: list[str], answers: list[Any]) -> None:
        """Record the answers of one batch (one write, then fsync)."""
        if len(texts) != len(answers):
            raise ValueError(f"{len(texts)} texts but {len(answers)} answers")
        if not texts:
            return
        lines = []
        for text, answer in zip(texts, answers, strict=True):
            k = self.key(text)
            self._answers[k] = answer
            lines.append(json.dumps({"k": k, "v": answer}, separators=(",", ":")))
        blob = ("\n".join(lines) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            written = os.write(fd, blob)
            while written < len(blob):  # a short write (rare on local disks) continues where it stopped
                written += os.write(fd, blob[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
