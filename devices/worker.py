"""The child process that measures one model: ``python -m edgekd.devices.worker JOB.json RESULT.json``.

A fresh process per model keeps memory figures clean and lets thread counts be pinned through
the environment before any runtime is imported, without touching the parent process.
Artifacts load through ``edgekd.export.stage.load_artifact`` (the runner the server uses);
eager PyTorch modules through :class:`TorchRunner`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edgekd.devices import remote_runner


def runtime_options(job: dict, meta: dict) -> dict:
    """Keyword options for ``load_artifact``: threads for every runner that applies them (``Exporter.
    applies_threads``; the others refuse the option, and this process's environment pins what threads their
    runtime may use), execution providers for ONNX."""
    from edgekd.errors import UnsupportedTargetError
    from edgekd.export import get_exporter

    opts = dict(job.get("runtime_opts") or {})
    try:
        applies = get_exporter(str(meta.get("exporter") or meta.get("target"))).applies_threads
    except UnsupportedTargetError:
        applies = True  # load_artifact refuses the folder itself
    if job.get("threads") and applies:
        opts.setdefault("threads", job["threads"])
    if job.get("providers") and (meta.get("exporter") or meta.get("target")) == "onnx":
        opts.setdefault("providers", job["providers"])
    return opts


def load_factory(job: dict, base: Path):
    """(load, meta) for the job's model; ``load()`` is what the load time measures."""
    if job.get("kind", "artifact") == "torch":
        import torch

        from edgekd.devices.torch_runner import TorchRunner
        from edgekd.export.base import ModelIO

        if job.get("threads"):
            torch.set_num_threads(job["threads"])  # this process exists only for this model
        path = base / job["module_file"]
        meta = {"io": job["io"], "file": job["module_file"], "max_length": None,
                "preload": remote_runner.preload(job.get("preload", []))}

        def load():
            module = torch.load(path, weights_only=False)  # a module this harness saved a moment ago
            return TorchRunner(module, ModelIO.from_dict(job["io"]), job.get("device", "cpu"))

        return load, meta

    from edgekd.errors import ChecksumError
    from edgekd.export.base import read_artifact_meta
    from edgekd.export.stage import artifact_digest, load_artifact

    folder = Path(job["folder"])
    folder = folder if folder.is_absolute() else base / folder
    meta = read_artifact_meta(folder)
    # Verified here, before the clock starts: hashing is not part of loading a model on a device.
    path = folder / meta["file"]
    if meta.get("sha256") and path.exists() and artifact_digest(path) != meta["sha256"]:
        raise ChecksumError(f"{path} does not match the sha256 in its artifact.json: it changed after export.")
    opts = runtime_options(job, meta)
    meta["preload"] = remote_runner.preload(remote_runner.RUNTIME_MODULES.get(path.suffix, ()))
    return (lambda: load_artifact(folder, verify=False, **opts)[0]), meta


def ready_on(fd: int):
    """``run_job``'s ``ready`` for a process started ahead (``edgekd.devices.measure.Prestarted``): say so on
    the pipe ``fd``, then wait for a line on stdin ("go"); an empty read (the caller closed it) is a no."""

    def ready() -> bool:
        os.write(fd, b"ready\n")
        os.close(fd)
        return sys.stdin.readline().strip() == "go"

    return ready


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ready = None
    if len(argv) == 4 and argv[2] == "--ready-fd" and argv[3].isdigit():
        ready, argv = ready_on(int(argv[3])), argv[:2]
    if len(argv) != 2:
        print("usage: python -m edgekd.devices.worker JOB.json RESULT.json [--ready-fd FD]", file=sys.stderr)
        return 2
    return remote_runner.run_job(Path(argv[0]), Path(argv[1]), load_factory=load_factory, ready=ready)


if __name__ == "__main__":
    sys.exit(main())
