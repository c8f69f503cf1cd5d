"""Activation smoothing before int8 (SmoothQuant, Xiao et al. 2023), as an ONNX graph rewrite.

Dynamic int8 rounds each MatMul's input on one range per call. A transformer's hidden states carry a
few channels far larger than the rest (in the default student the FFN input has one channel near 27
where the median channel's largest value is 2), so that one range leaves the other channels a few
dozen steps. Smoothing divides input channel ``j`` by ``s_j`` and multiplies the weight's row ``j``
by it, which leaves the product unchanged in float::

    x @ W == (x / s) @ (s[:, None] * W),    s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)

so part of the range moves from the activations into the weights. ``max|x_j|`` is calibrated on real
inputs, each at its own length. Every MatMul (and packed ``Attention``) whose weight is a 2-D float
initializer gets it; those reading one input share one ``s`` (from the largest of their weights'
rows) and one ``Mul`` in front of them. A post-LayerNorm encoder's normalised states also feed the
residual, so ``1 / s`` cannot be folded into the LayerNorm: it stays a ``Mul`` per smoothed input.

ONNX Runtime applies SmoothQuant inside ``quantize_static`` only, through Intel Neural Compressor 2.x
(whose ONNX smoother, like ``onnx-neural-compressor``'s, requires numpy < 2); this rewrite serves the
dynamic method as well and has no dependency beyond onnx and onnxruntime.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SMOOTHED_OPS = {("", "MatMul"), ("com.microsoft", "Attention")}


def _targets(model: Any) -> dict[str, list[Any]]:
    """Nodes to smooth, grouped by the activation they read: MatMul and Attention over a 2-D float
    weight initializer used by no other node (scaling its rows must not change another consumer)."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if (node.domain or "", node.op_type) not in SMOOTHED_OPS or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT or uses[w.name] != 1:
            continue
        if node.input[0] in inits:
            continue
        groups.setdefault(node.input[0], []).append(node)
    return groups


def channel_absmax(source: Any, names: Sequence[str], rows: Sequence[dict[str, np.ndarray]],
                   threads: int | None = None) -> dict[str, np.ndarray]:
    """The largest |value| of each channel (last axis) of the tensors ``names`` of the ONNX model
    ``source`` (left as it is), over the inputs ``rows`` (one call each)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(source)
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory(prefix="edgekd-smooth-") as tmp:
        probe = Path(tmp) / "probe.onnx"  # a file, so models over 2 GB and external weights load too
        onnx.save(model, str(probe))
        sess = ort.InferenceSession(str(probe), so, providers=["CPUExecutionProvider"])
        feeds = {i.name for i in sess.get_inputs()}
        out: dict[str, np.ndarray] = {}
        for row in rows:
            got = sess.run(list(names), {k: v for k, v in row.items() if k in feeds})
            for name, value in zip(names, got, strict=True):
                m = np.abs(np.asarray(value, np.float32)).reshape(-1, value.shape[-1]).max(axis=0)
                out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def smooth_file(src: Path, dst: Path, rows: Sequence[dict[str, np.ndarray]], alpha: float,
                threads: int | None = None, external_data: bool = False) -> dict[str, Any]:
    """Write ``src`` smoothed (module docstring) at ``dst``; ``rows`` calibrate the channel ranges.
    Returns what was done: the inputs smoothed, the nodes behind them, and the spread of ``s``."""
    import onnx
    from onnx import helper, numpy_helper

    if not 0 < alpha <= 1:
        raise ValueError(f"smoothing alpha {alpha}: give a migration strength in (0, 1]")
    if not rows:
        raise ValueError("smoothing needs calibration inputs: pass at least one example")
    model = onnx.load(str(src))
    groups = _targets(model)
    if not groups:
        raise ValueError(f"{Path(src).name} has no MatMul or Attention over a float weight to smooth")
    amax = channel_absmax(model, list(groups), rows, threads)
    inits = {t.name: t for t in model.graph.initializer}
    order = {n.output[0]: i for i, n in enumerate(model.graph.node) if n.output}  # a node's place, by its output
    inserts: list[tuple[int, Any]] = []
    report = []
    for k, (x, nodes) in enumerate(groups.items()):
        weights = {n.input[1]: numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes}
        if any(w.shape[0] != amax[x].shape[0] for w in weights.values()):
            continue  # the weight's rows are not the input's channels (e.g. a batched right operand)
        wmax = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        xmax = amax[x]
        live = (xmax > 0) & (wmax > 0)
        s = np.ones_like(xmax)
        s[live] = xmax[live] ** alpha / wmax[live] ** (1 - alpha)
        s = s.astype(np.float32)
        for name, w in weights.items():
            inits[name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), name))
        tag = f"{k}_" + "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in x)  # unique, and a plain name
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"edgekd_smooth_{tag}_inv")
        model.graph.initializer.append(inv)
        out = f"edgekd_smooth_{tag}_out"
        inserts.append((min(order[n.output[0]] for n in nodes),
                        helper.make_node("Mul", [x, inv.name], [out], name=f"edgekd_smooth_{tag}")))
        for n in nodes:
            n.input[0] = out
        report.append({"input": x, "nodes": [n.name for n in nodes],
                       "input_range": round(float(xmax.max()), 4),
                       "scale_max": round(float(s.max()), 4), "scale_min": round(float(s.min()), 4)})
    if not report:
        raise ValueError(f"{Path(src).name}: no MatMul or Attention weight has one row per channel of its input; "
                         "nothing to smooth")
    for index, node in sorted(inserts, key=lambda t: -t[0]):  # back to front: earlier indices stay valid
        model.graph.node.insert(index, node)
    tmp = Path(dst).with_name(Path(dst).stem + ".smooth" + Path(dst).suffix)
    onnx.save(model, str(tmp), save_as_external_data=external_data,
              location=(Path(dst).name + ".data") if external_data else None)
    tmp.replace(dst)
    return {"alpha": alpha, "calibration_examples": len(rows), "inputs": report}
