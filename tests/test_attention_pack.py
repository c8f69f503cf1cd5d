"""``quantize.fuse: packed``: the attention blocks of the shipped text graph (the first-token export of
a BERT, as the default run writes it) become ONNX Runtime's ``Attention`` (Q/K/V in one weight,
``attention_mask`` as the mask) with the export's own answers on padded texts, the scale read from
the graph, the first-token last block's heads, scores and softmax as one ``MultiHeadAttention``, and
dynamic int8 turning each packed block into ``QAttention``, the whole file computing what the unpacked
int8 file does; graphs it cannot pack are refused with why, and as a quantize candidate reported as
not built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_quantize import accuracy, bert_export, export_folder, qcfg  # noqa: F401  (fixtures)

from edgekd.errors import UnsupportedTargetError
from edgekd.export.attention import pack_attention
from edgekd.quantization import quantize_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def shipped_export(tmp_path_factory) -> Path:
    """A 3-layer tiny BERT classifier exported as the text family ships it (last block over the first
    position only), with tokenizer and artifact.json."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from edgekd.tasks.text.first_token import FirstTokenClassifierExport
    from edgekd.testing import tiny_bert

    torch.manual_seed(0)
    src = tiny_bert(tmp_path_factory.mktemp("pack-bert"), num_layers=3, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(src).eval()
    with torch.no_grad():  # projections of unlike ranges, as trained ones have: one int8 scale cannot fit all
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(0.25)
            layer.attention.self.value.weight.mul_(8.0)
        model.classifier.weight.mul_(50.0)  # logits far from 0, so a changed rounding shows in them
    return export_folder(FirstTokenClassifierExport(model), src, tmp_path_factory.mktemp("pack-export") / "onnx")


def padded(n: int = 12, width: int = 12, seed: int = 3) -> dict[str, np.ndarray]:
    """Texts of lengths 2..width, right-padded: most rows have masked keys."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 40, size=(n, width)).astype(np.int64)
    mask = np.zeros_like(ids)
    for i in range(n):
        keep = 2 + i % (width - 1)
        mask[i, :keep] = 1
        ids[i, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feed)[0]


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_packed_blocks_give_the_exports_answers_on_padded_texts(shipped_export, tmp_path):
    src, dst = shipped_export / "model.onnx", tmp_path / "packed.onnx"
    notes = pack_attention(src, dst)
    # the first two blocks packed; the last one's queries are the first position only, so its
    # projections stay and the heads, scores, mask and softmax become one MultiHeadAttention
    assert notes["fusions"] == {"Attention": 2, "MultiHeadAttention": 1} and notes["left_as_is"] == {}
    got, before = ops(dst), ops(src)
    assert got.count("Attention") == 2 and got.count("MultiHeadAttention") == 1 and before.count("Softmax") == 3
    assert "Softmax" not in got and "Transpose" not in got
    assert got.count("MatMul") == before.count("MatMul") - 2 * 5 - 2  # per full block 5, last block Q.K and P.V
    feed = padded()
    np.testing.assert_allclose(run(dst, feed), run(src, feed), atol=1e-5, rtol=1e-5)
    # the mask is honoured: changing the tokens under padding changes nothing
    noisy = {k: v.copy() for k, v in feed.items()}
    noisy["input_ids"][noisy["attention_mask"] == 0] = 7
    np.testing.assert_allclose(run(dst, noisy), run(dst, feed), atol=1e-5, rtol=1e-5)


def test_the_graphs_own_scale_is_kept(shipped_export, tmp_path):
    """A scale other than 1/sqrt(head size) (here 1000 times larger in the export) is the one each
    Attention gets, with the same answers as the changed export."""
    from onnx import numpy_helper

    model = onnx.load(str(shipped_export / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    scales = set()
    for node in model.graph.node:  # Softmax(Add(Mul(scores, scale), mask))
        if node.op_type == "Softmax":
            add = made_by[node.input[0]]
            scales |= {made_by[i].input[1] for i in add.input if i in made_by and made_by[i].op_type == "Mul"
                       and made_by[made_by[i].input[0]].op_type == "MatMul"}
    assert scales and all(0 < numpy_helper.to_array(inits[n]) < 1 for n in scales)
    for name in scales:
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * 1000, name))
    src, dst = tmp_path / "scaled.onnx", tmp_path / "packed.onnx"
    onnx.save(model, str(src))
    pack_attention(src, dst)
    feed = padded(seed=4)
    np.testing.assert_allclose(run(dst, feed), run(src, feed), atol=1e-5, rtol=1e-5)
    assert np.isfinite(run(dst, feed)).all()
    want = [float(numpy_helper.to_array(inits[n])) for n in scales]
    got = [a.f for n in onnx.load(str(dst)).graph.node if n.op_type in ("Attention", "MultiHeadAttention")
           for a in n.attribute
           if a.name == "scale"]
    assert len(got) == 3 and all(g == pytest.approx(want[0], rel=1e-6) for g in got) and len(set(want)) == 1


def test_a_graph_without_packable_attention_is_refused_with_why(bert_export, tmp_path):  # noqa: F811
    """The full-model export (scaled_dot_product_attention, its mask built with Where) is not the form
    this rewrite knows: refused, with the reason and the setting to change, and nothing written."""
    with pytest.raises(UnsupportedTargetError, match="found no self-attention block.*mask is not built from the "
                       "attention_mask input.*fuse: none"):
        pack_attention(bert_export / "model.onnx", tmp_path / "out.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # quantizes with the guard and times the float and int8 models
def test_dynamic_int8_turns_packed_blocks_into_qattention(shipped_export, tmp_path):
    val = padded(32, seed=6)
    labels = np.zeros(32, dtype=np.int64)
    out = tmp_path / "q"
    report = quantize_onnx(shipped_export, out, qcfg(method="dynamic", fuse="packed", max_accuracy_drop=1.0),
                           val, val, labels, accuracy)
    assert report["fusion"]["fusions"] == {"Attention": 2, "MultiHeadAttention": 1}
    assert report["fusion"]["parity"]["top1_agreement"] == 1.0 and report["fusion"]["parity"]["max_abs_diff"] < 1e-4
    got = ops(out / "model.onnx")
    assert got.count("QAttention") == 2 and "Attention" not in got and "Softmax" not in got
    assert got.count("MultiHeadAttention") == 1  # float: its projections before it are int8 MatMuls
    assert report["settings"]["fuse"] == "packed" and report["quantized"]["top1_agreement"] >= 0.9
    assert report["settings"]["qattention_weights"] == {"rewritten": 2, "left_with_one_scale": [],
                                                        "scales": "one per Q, K and V projection"}
    assert set(report["speed_guard"]["all"]) == {"float", "float/fused-packed", report["candidate"]}


def test_a_candidate_that_cannot_be_packed_is_reported_and_the_others_compete(bert_export, tmp_path):  # noqa: F811
    """``quantize.candidates: [{fuse: packed}]`` on a graph it cannot pack: the section's own setup is
    written, the report names the candidate that was not built and why. Asked for as the section's
    own ``fuse``, the same graph is an error."""
    from edgekd.recipe import QuantizeCandidate

    val = padded(16, seed=7)
    labels = np.zeros(16, dtype=np.int64)
    report = quantize_onnx(bert_export, tmp_path / "q", qcfg(method="dynamic", candidates=[QuantizeCandidate(fuse="packed")],
                                                             max_accuracy_drop=1.0), val, val, labels, accuracy)
    assert report["candidate"] == "dynamic" and [c["name"] for c in report["candidates"]] == ["dynamic"]
    (skipped,) = report["candidates_not_built"]
    assert skipped["name"] == "dynamic/fused-packed" and "not built" in skipped["why"]
    assert "attention_mask input" in skipped["why"]
    with pytest.raises(UnsupportedTargetError, match="fuse: none"):
        quantize_onnx(bert_export, tmp_path / "q2", qcfg(method="dynamic", fuse="packed", max_accuracy_drop=1.0),
                      val, val, labels, accuracy)
    assert not (tmp_path / "q2").exists()


@pytest.mark.parametrize("per_channel", [False, True])
def test_packed_int8_computes_what_the_unpacked_int8_model_does(shipped_export, tmp_path, per_channel):
    """Dynamic int8 of the packed graph (QAttention, its weights given one scale per Q, K and V, or per
    column) answers each text at its own length as the int8 unpacked graph does: same rounding, so
    packing changes the operators, not the model quantization-aware recovery trained."""
    from edgekd.quantization.onnx_methods import make_method

    src = shipped_export / "model.onnx"
    packed = tmp_path / "packed.onnx"
    pack_attention(src, packed)
    out = {}
    for name, path, fuse in (("plain", src, "none"), ("packed", packed, "packed")):
        cfg = qcfg(method="dynamic", per_channel=per_channel, fuse=fuse)
        method = make_method(cfg, None, ["input_ids", "attention_mask"], {}, tmp_path, False)
        out[name] = tmp_path / f"{name}-int8.onnx"
        method.quantize(path, out[name], [])
    assert ops(out["packed"]).count("QAttention") == 2 and ops(out["packed"]).count("MultiHeadAttention") == 1
    feed = padded(seed=8)
    for i in range(len(feed["input_ids"])):
        n = int(feed["attention_mask"][i].sum())
        one = {k: v[i:i + 1, :n] for k, v in feed.items()}
        want = run(out["plain"], one)
        assert np.abs(want).max() > 0.05
        np.testing.assert_allclose(run(out["packed"], one), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("answers_change", [False, True])
def test_a_kept_unfused_session_is_written_into_the_file(shipped_export, tmp_path, monkeypatch, answers_change):
    """When the quantize stage keeps the session without SkipLayerNormFusion, the written int8 file
    has its residual Adds as Sum, so ONNX Runtime's default session runs it unfused too, with the
    tuned session's answers on every validation example (checked in the stage); a rewrite that would
    change an answer is undone and the report says so."""
    from edgekd.export import timing
    from edgekd.quantization import onnx_stage

    off = {"disabled_optimizers": ["SkipLayerNormFusion"]}
    monkeypatch.setattr(onnx_stage, "tune_session", lambda *a, **k: {
        "runtime_options": dict(off), "tuning": {"timed": True, "chosen": "SkipLayerNormFusion off"}})
    if answers_change:  # a rewrite that also moves every LayerNorm's epsilon: answers differ
        real = timing.write_residual_adds_as_sum

        def skewed(path, dst=None):
            n = real(path, dst)
            path = dst or path
            model = onnx.load(str(path))
            for node in model.graph.node:
                for a in node.attribute:
                    if node.op_type == "LayerNormalization" and a.name == "epsilon":
                        a.f = 0.5
            onnx.save(model, str(path))
            return n

        monkeypatch.setattr(timing, "write_residual_adds_as_sum", skewed)
    val = padded(24, seed=9)
    report = quantize_onnx(shipped_export, tmp_path / "q", qcfg(method="dynamic", max_accuracy_drop=1.0),
                           val, val, np.zeros(24, dtype=np.int64), accuracy)
    written = tmp_path / "q" / "model.onnx"
    rewritten = report["session"]["tuning"]["residual_adds_as_sum"]
    if answers_change:
        assert rewritten == "not rewritten: ONNX Runtime's default session did not answer as the tuned one"
        assert "Sum" not in ops(written) and timing.has_skip_layernorm_pattern(written)
        return
    # the embeddings' LayerNorm and two per block, the first-token block's included
    assert rewritten == 7 and ops(written).count("Sum") == 7 and not timing.has_skip_layernorm_pattern(written)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(written), so, providers=["CPUExecutionProvider"])
    assert "SkipLayerNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert report["session"]["runtime_options"] == off


def test_the_quantize_stage_starts_from_the_exported_adds_when_the_export_wrote_sums(shipped_export, tmp_path,
                                                                                     monkeypatch):
    """An export folder whose residual Adds were written as Sum (its session was faster unfused) is
    quantized from the graph as exported: the fusions and this stage's own session choice see Adds,
    and the int8 file is the one the Add folder gives."""
    import shutil

    from edgekd.export import timing
    from edgekd.export.base import read_artifact_meta, write_artifact_meta
    from edgekd.export.stage import artifact_digest
    from edgekd.quantization import onnx_stage

    monkeypatch.setattr(onnx_stage, "tune_session", lambda *a, **k: {
        "runtime_options": {}, "tuning": {"timed": True, "chosen": "default"}})
    summed = tmp_path / "summed"
    shutil.copytree(shipped_export, summed)
    assert timing.write_residual_adds_as_sum(summed / "model.onnx") == 7
    write_artifact_meta(summed, {**read_artifact_meta(summed), "sha256": artifact_digest(summed / "model.onnx")})
    val = padded(24, seed=9)
    reports = {}
    for name, folder in (("adds", shipped_export), ("sums", summed)):
        reports[name] = quantize_onnx(folder, tmp_path / f"q-{name}", qcfg(method="dynamic", fuse="packed",
                                                                          max_accuracy_drop=1.0),
                                      val, val, np.zeros(24, dtype=np.int64), accuracy)
    assert reports["sums"]["residual_sums_as_adds"] is True and "residual_sums_as_adds" not in reports["adds"]
    a, b = tmp_path / "q-adds" / "model.onnx", tmp_path / "q-sums" / "model.onnx"
    assert ops(a) == ops(b) and "Sum" not in ops(b) and ops(b).count("QAttention") == 2
    feed = padded(seed=8)
    np.testing.assert_array_equal(run(b, feed), run(a, feed))
