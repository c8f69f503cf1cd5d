"""``quantize.fuse: packed``: BERT-style self-attention blocks of an exported ONNX graph rewritten as
ONNX Runtime's ``Attention`` operator (``com.microsoft``), Q, K and V packed into one weight and the
``attention_mask`` input passed as its 2-D ``mask_index``.

Written for the graphs ``torch.onnx.export(dynamo=True)`` gives for BERT-style encoders, where
ONNX Runtime's own transformer optimiser finds no attention. ONNX Script's fusion
(``quantize.fuse: attention``) finds it, but writes the mask as an additive attention bias, a form
ONNX Runtime's int8 quantizer leaves in float. This form is the one ``quantize_dynamic`` turns into
``QAttention``: one int8 MatMul for Q, K and V, the heads split inside the kernel, so a block runs
as two operators (``DynamicQuantizeLinear``, ``QAttention``) instead of about fifteen.

A block is rewritten only when every part matches (otherwise it is left as it is and the reason is
counted): ``Softmax(Mul(MatMul(Q, K^T), c) + mask)`` (or ``Div`` by c), Q, K and V each
``Transpose(Reshape(MatMul(x, W) + b))`` of the *same* input x, the mask
``(1 - Cast(Unsqueeze(attention_mask))) * m`` with m at most -10,000 (what transformers builds),
the context ``Reshape(Transpose(MatMul(P, V)))``. The scale c is kept as the operator's ``scale``.

A block whose queries come from other positions than its keys and values (the first-token last
layer, ``export.first_token_last_layer``: one query row, every key) keeps its three projections
(MatMul + bias, which int8 methods quantize) and the rest, heads, scores, mask, softmax and context,
becomes one ``MultiHeadAttention`` (query ``[batch, 1, hidden]``, keys and values ``[batch, length,
hidden]``, ``attention_mask`` as its key padding mask): about 15 fewer operators a call.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import UnsupportedTargetError

MS_DOMAIN = "com.microsoft"
MASK_INPUT = "attention_mask"


class _Graph:
    """Lookups over one ONNX graph: producers, consumers, constant values."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        self.graph = model.graph
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in self.graph.initializer}
        self._np = numpy_helper
        self.inputs = {i.name for i in self.graph.input}

    def node(self, name: str, *ops: str) -> Any:
        n = self.producer.get(name)
        return n if n is not None and n.op_type in ops else None

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            return next((self._np.to_array(a.t) for a in n.attribute if a.name == "value"), None)
        return None

    def only_consumer(self, name: str, op: str) -> Any:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def perm(self, node: Any) -> list[int]:
        return [int(v) for a in node.attribute if a.name == "perm" for v in a.ints]

    def shape_tail(self, name: str) -> tuple[int, int] | None:
        """The last two entries of a Reshape's target shape, where they are constants."""
        value = self.const(name)
        if value is not None:
            return (int(value[-2]), int(value[-1])) if value.size >= 2 else None
        cat = self.node(name, "Concat")
        if cat is None:
            return None
        tail: list[int] = []
        for piece in reversed(cat.input):
            v = self.const(piece)
            if v is None:
                return None
            tail = [int(x) for x in np.ravel(v)] + tail
            if len(tail) >= 2:
                return tail[-2], tail[-1]
        return None


def _projection(g: _Graph, name: str, perm: list[int]) -> dict[str, Any] | str:
    """``Transpose(perm)(Reshape(MatMul(x, W) + b))``: x, W, b, heads; or why it is not."""
    tr = g.node(name, "Transpose")
    if tr is None or g.perm(tr) != perm:
        return "a projection is not Transpose(Reshape(...)) with the expected axes"
    rs = g.node(tr.input[0], "Reshape")
    add = rs is not None and g.node(rs.input[0], "Add")
    if not add:
        return "a projection is not Reshape(MatMul + bias)"
    for mm_in, b_in in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        mm = g.node(mm_in, "MatMul")
        bias = g.const(b_in)
        if mm is not None and bias is not None:
            break
    else:
        return "a projection's bias is not a constant added to a MatMul"
    weight = g.const(mm.input[1])
    tail = g.shape_tail(rs.input[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or bias.shape != (weight.shape[1],):
        return "a projection's weight is not a float32 matrix with a matching bias"
    if tail is None or tail[0] <= 0 or tail[1] <= 0 or tail[0] * tail[1] != weight.shape[1]:
        return "the heads cannot be read from the projection's Reshape"
    return {"x": mm.input[0], "w": weight, "b": bias, "heads": tail[0], "y": add.output[0]}


def _mask_is_attention_mask(g: _Graph, name: str) -> bool:
    """``(1 - Cast(Unsqueeze(attention_mask))) * m`` (either operand order), m <= -1e4."""
    mul = g.node(name, "Mul")
    if mul is None:
        return False
    for a, b in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        m, sub = g.const(b), g.node(a, "Sub")
        if m is None or m.size != 1 or float(m) > -1e4 or sub is None:
            continue
        one, cast = g.const(sub.input[0]), g.node(sub.input[1], "Cast")
        if one is None or one.size != 1 or float(one) != 1.0 or cast is None:
            continue
        unsq = g.node(cast.input[0], "Unsqueeze")
        if unsq is not None and unsq.input[0] == MASK_INPUT and MASK_INPUT in g.inputs:
            axes = g.const(unsq.input[1]) if len(unsq.input) > 1 else None
            return axes is not None and sorted(int(v) for v in np.ravel(axes)) == [1, 2]
    return False


def _match(g: _Graph, softmax: Any) -> dict[str, Any] | str:
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3):
        return "the Softmax is not over the last axis"
    add = g.node(softmax.input[0], "Add")
    if add is None:
        return "no mask is added before the Softmax"
    for s_in, m_in in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        scaled = g.node(s_in, "Mul", "Div")
        if scaled is not None and _mask_is_attention_mask(g, m_in):
            break
    else:
        return "the mask is not built from the attention_mask input as transformers builds it"
    c = g.const(scaled.input[1])
    qk = g.node(scaled.input[0], "MatMul")
    if c is None or c.size != 1 or qk is None or float(c) == 0:
        return "the scores are not a MatMul scaled by a constant"
    scale = float(c) if scaled.op_type == "Mul" else 1.0 / float(c)
    q = _projection(g, qk.input[0], [0, 2, 1, 3])
    k = _projection(g, qk.input[1], [0, 2, 3, 1])
    av = g.only_consumer(softmax.output[0], "MatMul")
    if av is None or av.input[0] != softmax.output[0]:
        return "the probabilities do not feed one MatMul with the values"
    v = _projection(g, av.input[1], [0, 2, 1, 3])
    for part in (q, k, v):
        if isinstance(part, str):
            return part
    if k["x"] != v["x"]:
        return "keys and values come from different inputs"
    if not (q["w"].shape == k["w"].shape == v["w"].shape and q["heads"] == k["heads"] == v["heads"]):
        return "Q, K and V differ in shape or heads"
    tr = g.only_consumer(av.output[0], "Transpose")
    out = tr is not None and g.perm(tr) == [0, 2, 1, 3] and g.only_consumer(tr.output[0], "Reshape")
    if not out:
        return "the context is not Reshape(Transpose(...)) back to the hidden size"
    if q["x"] != k["x"]:  # queries from fewer positions (the first-token last layer): projections stay
        return {"kind": "MultiHeadAttention", "q": q["y"], "k": k["y"], "v": v["y"], "heads": q["heads"],
                "scale": scale, "out": out.output[0]}
    return {"kind": "Attention", "x": q["x"], "w": np.concatenate([q["w"], k["w"], v["w"]], axis=1),
            "b": np.concatenate([q["b"], k["b"], v["b"]]), "heads": q["heads"], "scale": scale,
            "out": out.output[0]}


def pack_attention(src: Path, dst: Path, external: bool = False) -> dict[str, Any]:
    """Rewrite the self-attention blocks of the ONNX file ``src`` as ``Attention`` operators, and the
    first-token ones as ``MultiHeadAttention`` (module docstring), and write the result to ``dst``.
    Returns ``{"fusions": {"Attention": n, "MultiHeadAttention": m}}`` (the kinds written) and, per
    reason, the Softmax blocks left as they were. Packing nothing is an error that says why."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = _Graph(model)
    found: list[dict[str, Any]] = []
    left: Counter[str] = Counter()
    for node in list(g.graph.node):
        if node.op_type == "Softmax":
            m = _match(g, node)
            if isinstance(m, str):
                left[m] += 1
            else:
                found.append(m)
    if not found:
        why = "; ".join(f"{r} ({n}x)" for r, n in left.items()) or "the graph has no Softmax"
        raise UnsupportedTargetError(
            f"quantize.fuse: packed found no self-attention block it can pack in {Path(src).name}: {why}. "
            "Set quantize.fuse: none (or attention/multihead)."
        )
    mask = "edgekd_attention_mask_int32"
    new_nodes = [helper.make_node("Cast", [MASK_INPUT], [mask], to=TensorProto.INT32, name="edgekd_mask_int32")]
    new_inits = []
    outs = {m["out"] for m in found}
    kept = [n for n in g.graph.node if not (set(n.output) & outs)]  # the context Reshapes, replaced
    for i, m in enumerate(found):
        if m["kind"] == "MultiHeadAttention":
            new_nodes.append(helper.make_node("MultiHeadAttention", [m["q"], m["k"], m["v"], "", mask], [m["out"]],
                                              domain=MS_DOMAIN, name=f"edgekd_attention{i}", num_heads=m["heads"],
                                              scale=m["scale"]))
            continue
        w, b = f"edgekd_attention{i}_qkv_weight", f"edgekd_attention{i}_qkv_bias"
        new_inits += [numpy_helper.from_array(m["w"], w), numpy_helper.from_array(m["b"], b)]
        new_nodes.append(helper.make_node("Attention", [m["x"], w, b, mask], [m["out"]], domain=MS_DOMAIN,
                                          name=f"edgekd_attention{i}", num_heads=m["heads"], scale=m["scale"]))
    g.graph.initializer.extend(new_inits)
    _replace_nodes(g.graph, kept + new_nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    tmp = Path(dst).with_name(Path(dst).name + ".tmp")
    onnx.save(model, str(tmp), save_as_external_data=external,
              location=(Path(dst).name + ".data") if external else None)
    tmp.replace(dst)
    return {"fusions": dict(Counter(m["kind"] for m in found)), "left_as_is": dict(left)}


def _replace_nodes(graph: Any, nodes: list[Any]) -> None:
    """``graph``'s nodes become ``nodes`` in topological order, less those nothing reads (and the
    initializers nothing reads)."""
    outputs = {o.name for o in graph.output}
    while True:  # drop what no node and no graph output reads (the unpacked blocks' leftovers)
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered: list[Any] = []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):
            raise UnsupportedTargetError("quantize.fuse: packed left a graph with a cycle: set quantize.fuse: none")
        nodes = rest
    graph.ClearField("node")
    graph.node.extend(ordered)
    used = {i for n in ordered for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
