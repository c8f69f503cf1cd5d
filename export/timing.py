"""Timing ONNX models side by side, and the session options an ONNX export folder keeps.

``time_side_by_side`` times several models (or one model under several session options) on the
same inputs in rotating blocks; the quantize stage's speed guard and ``tune_session`` use it.
``tune_session`` decides an export folder's ``runtime_options`` (artifact.json): today whether its
sessions leave out ONNX Runtime's SkipLayerNormFusion, which is measured, never assumed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import DataError


def _runner(path: Path, threads: int | None, options: dict[str, Any]) -> Any:
    from edgekd.export.onnx import OnnxRunner

    return OnnxRunner(Path(path), threads=threads, **options)


TIMING_BLOCK = 10  # consecutive runs of one model before the next model's turn


def time_side_by_side(paths: Mapping[str, Path | tuple[Path, dict[str, Any]]],
                      inputs: Mapping[str, np.ndarray] | list[Mapping[str, np.ndarray]],
                      runs: int, threads: int | None, warmup: int = 5,
                      block: int = TIMING_BLOCK) -> dict[str, dict[str, float]]:
    """Median latency of each model on the same inputs, in rotating blocks of ``block`` runs.

    ``paths`` maps a name to a model file, or to ``(file, runner options)`` (e.g. one file with and
    without an optimiser). ``inputs`` is one feed or a list of feeds (e.g. single examples at their
    real lengths); run ``i`` of every model uses feed ``i mod len``, so all models see exactly the
    same inputs. Each session is the one the artifact's own runner opens (``OnnxRunner``: ONNX
    Runtime's thread spinning left on, as serve and bench run it), so what is timed is how it will
    run; blocks keep one session's spinning threads from competing with the next session's run
    except at a block's first call.
    """
    # Imported here: importing edgekd.quantization imports this module (through its guard).
    from edgekd.quantization.calibration import cast_to

    feeds_in = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not feeds_in:
        raise DataError("no inputs to time the models on")

    sessions = {}
    for name, spec in paths.items():
        path, options = spec if isinstance(spec, tuple) else (spec, {})
        sess = _runner(path, threads, options).session
        declared = {i.name: _np_type(i.type) for i in sess.get_inputs()}
        dtypes = {k: v for k, v in declared.items() if v is not None}
        feeds = [cast_to({k: f[k] for k in declared}, dtypes) for f in feeds_in]
        sessions[name] = (sess, feeds)
    for sess, feeds in sessions.values():
        for i in range(warmup):
            sess.run(None, feeds[i % len(feeds)])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    block = max(1, int(block))
    for start in range(0, runs, block):
        for name, (sess, feeds) in sessions.items():
            for i in range(start, min(start + block, runs)):
                feed = feeds[i % len(feeds)]
                c0, t0 = time.process_time(), time.perf_counter()
                sess.run(None, feed)
                times[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    # cpu_p50_ms (CPU time of the whole process per run) is the steadier figure on a shared
    # machine, where wall time includes waiting for a core; decisions use wall time.
    return {
        name: {"p50_ms": round(statistics.median(t), 4), "p90_ms": round(float(np.percentile(t, 90)), 4),
               "cpu_p50_ms": round(statistics.median(cpu[name]), 4), "runs": len(t)}
        for name, t in times.items()
    }


# ONNX Runtime fuses each Add -> LayerNormalization pair into SkipLayerNormalization when a session
# opens. On some CPUs its kernel is slower than the two operators it replaces, enough to show in the
# whole model (README, Export: 1.48x on the base run's int8 file on a 2-core Xeon with AVX-512 and AMX),
# so an export folder measures its model with and without that fusion and keeps the faster.
SESSION_TUNING_MARGIN = 0.03  # the unfused session must be this much faster: a smaller gap is timing noise
TUNING_RUNS = 200  # timed runs of each session (batch 1, cycling through the rows)


def has_skip_layernorm_pattern(path: Path) -> bool:
    """Whether the graph in ``path`` has an Add feeding a LayerNormalization (what SkipLayerNormFusion fuses)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    adds = {o for n in graph.node if n.op_type == "Add" for o in n.output}
    return any(n.op_type == "LayerNormalization" and n.input and n.input[0] in adds for n in graph.node)


def tune_session(path: Path, rows: list[Mapping[str, np.ndarray]], runs: int,
                 threads: int | None) -> dict[str, Any]:
    """Time ``path`` at batch 1 on ``rows`` with ONNX Runtime's default optimisers and without
    SkipLayerNormFusion, side by side; return the runner options to keep (``runtime_options``) and
    the measurement (``tuning``). A graph without an Add -> LayerNormalization pair is not timed."""
    if not has_skip_layernorm_pattern(path):
        return {"runtime_options": {}, "tuning": {"timed": False,
                                                  "reason": "no Add -> LayerNormalization pair to fuse"}}
    off = {"disabled_optimizers": ["SkipLayerNormFusion"]}
    speed = time_side_by_side({"default": path, "SkipLayerNormFusion off": (path, off)}, rows, runs, threads)
    default, unfused = speed["default"]["p50_ms"], speed["SkipLayerNormFusion off"]["p50_ms"]
    keep = unfused < default * (1 - SESSION_TUNING_MARGIN)
    return {"runtime_options": off if keep else {},
            "tuning": {"timed": True, "batch": 1, "threads": threads, "rows": len(rows), "runs": runs,
                       "p50_ms": {"default": default, "SkipLayerNormFusion off": unfused},
                       "speedup": round(default / unfused, 3), "margin": SESSION_TUNING_MARGIN,
                       "chosen": "SkipLayerNormFusion off" if keep else "default"}}


class ExternalDataError(ValueError):
    """A graph rewrite refused: the model keeps its weights in external data files."""


def write_residual_adds_as_sum(path: Path, dst: Path | None = None) -> int:
    """Rewrite each Add that feeds a LayerNormalization in the ONNX file ``path`` (in place, or into
    ``dst``; nothing is written when there is none) as the
    two-input ``Sum``: the same sums to the bit, but no pair ONNX Runtime's SkipLayerNormFusion
    matches (it looks for Add), so every session runs the two operators unfused, a client that
    never reads artifact.json (Triton, plain onnxruntime) included. Written after ``tune_session``
    found the unfused session faster. Returns how many were rewritten. A model whose weights are in
    external data files is refused (the export and quantize stages leave those as they are)."""
    return _residual_op(path, dst, "Add", "Sum")


def write_residual_sums_as_adds(path: Path, dst: Path) -> int:
    """The inverse of ``write_residual_adds_as_sum``, into ``dst``: each two-input Sum that feeds a
    LayerNormalization becomes an Add again, so a later step (the quantize stage's fusions and its own
    session timing) sees the graph as exported. Returns how many; nothing is written when none."""
    return _residual_op(path, dst, "Sum", "Add")


def _residual_op(path: Path, dst: Path | None, old: str, new: str) -> int:
    import onnx

    from edgekd.runfolder import atomic_write_bytes

    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExternalDataError(f"{path.name} keeps its weights in external data files: not rewritten")
    made_by = {o: n for n in model.graph.node for o in n.output}
    done = 0
    for node in model.graph.node:
        src = made_by.get(node.input[0]) if node.op_type == "LayerNormalization" and node.input else None
        if src is not None and src.op_type == old and src.domain in ("", "ai.onnx") and len(src.input) == 2:
            src.op_type = new
            done += 1
    if done:
        atomic_write_bytes(dst or path, model.SerializeToString())
    return done


def unfuse_in_file(path: Path, rows: list[Mapping[str, np.ndarray]], options: dict[str, Any]) -> int | str:
    """When ``options`` (``tune_session``'s choice) leave out SkipLayerNormFusion, write the file's
    residual Adds as Sum (``write_residual_adds_as_sum``), kept only when ONNX Runtime's default session
    on the rewritten file answers every row of ``rows`` exactly as the tuned session on the original:
    then any client runs the graph the folder was timed with. Returns how many were rewritten, or why
    the file was left as it was."""
    if "SkipLayerNormFusion" not in options.get("disabled_optimizers", ()):
        return "not rewritten: the folder keeps ONNX Runtime's default session"
    path = Path(path)
    summed = path.with_name(path.stem + ".sum" + path.suffix)
    try:
        n = write_residual_adds_as_sum(path, summed)
    except ExternalDataError:
        return "not rewritten: the model keeps its weights in an external data file"
    if not n:
        return 0
    try:
        tuned, plain = _runner(path, None, options), _runner(summed, None, {})
        for row in rows:
            want, got = tuned.run(dict(row)), plain.run(dict(row))
            if want.keys() != got.keys() or not all(np.array_equal(want[k], got[k]) for k in want):
                return "not rewritten: ONNX Runtime's default session did not answer as the tuned one"
        del tuned, plain
        summed.replace(path)
        return n
    finally:  # a rewrite not kept (or a run that failed) leaves nothing beside the model
        summed.unlink(missing_ok=True)


def _np_type(ort_type: str) -> Any:
    return {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
            "tensor(float16)": np.float16, "tensor(bool)": np.bool_}.get(ort_type)
