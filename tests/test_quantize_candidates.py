"""Choosing among quantization setups: the fastest within the accuracy budget (fake timings and
metrics), real-length calibration and timing rows, static QDQ graphs (per-channel axis),
calibration read from train/validation only, and fused transformer graphs quantized with parity."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
from test_quantize import accuracy, bert_export, fragile, qcfg, text_inputs  # noqa: F401  (fixtures)

from edgekd.errors import StageError
from edgekd.export.base import read_artifact_meta
from edgekd.quantization import make_reader, onnx_stage, quantize_onnx
from edgekd.quantization.calibration import real_length_rows
from edgekd.quantization.guard import choose_fastest
from edgekd.recipe import SETUP_OF_SECTION, QuantizeCandidate, QuantizeConfig

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def cand(name, p50, drop, metric=None, budget=0.01):
    return {"name": name, "p50_ms": p50, "drop": drop, "passed": drop <= budget,
            "metric": 0.9 - drop if metric is None else metric}


# --- choosing ----------------------------------------------------------------------------------

def test_fastest_within_budget_is_chosen_and_every_candidate_says_why():
    cands = [cand("dynamic", 1.0, 0.002), cand("static", 0.6, 0.03), cand("static-pc", 0.8, 0.004)]
    best, why = choose_fastest(cands, 0.01)
    assert best == 2
    assert why[1].startswith("over the accuracy budget") and "0.0300 > 0.01" in why[1]
    assert why[0].startswith("slower") and "static-pc" in why[0]
    assert why[2].startswith("chosen: fastest within the budget")


def test_near_ties_go_to_the_higher_validation_metric():
    cands = [cand("minmax", 0.80, 0.006, metric=0.824), cand("entropy", 0.82, 0.002, metric=0.828),
             cand("dyn", 0.95, 0.0, metric=0.83)]
    best, why = choose_fastest(cands, 0.01, tie=0.05)
    assert best == 1 and "highest validation metric" in why[1]
    assert why[0].startswith("as fast (within 5%) as entropy")
    assert choose_fastest(cands, 0.01, tie=0.0)[0] == 0  # without the tolerance the fastest wins


def test_a_near_tie_never_goes_to_a_candidate_no_faster_than_the_float_model():
    # dynamic is faster than float (1.00 ms); fp16 is within 5% of dynamic and more accurate, but slower
    # than float: choosing it would ship the float model although dynamic passed and is faster.
    cands = [cand("dynamic", 0.97, 0.005, metric=0.895), cand("fp16", 1.015, 0.0, metric=0.9)]
    assert choose_fastest(cands, 0.01)[0] == 1  # without the float model's time, the tie rule picks fp16
    best, why = choose_fastest(cands, 0.01, ceiling=1.0)
    assert best == 0 and why[0].startswith("chosen: fastest within the budget")
    assert "not faster than the float model (1.015 against 1.000 ms p50), which dynamic is" in why[1]
    # When nothing passing beats float, the rule is as before (the stage then recommends float and says why).
    assert choose_fastest(cands, 0.01, ceiling=0.5)[0] == 1


def test_nothing_in_budget_chooses_nothing():
    best, why = choose_fastest([cand("a", 1.0, 0.05), cand("b", 0.5, 0.02)], 0.01)
    assert best is None and all(w.startswith("over the accuracy budget") for w in why)


def test_candidates_inherit_the_section_and_duplicates_are_dropped():
    cfg = qcfg(method="static", calibration_method="entropy",
               candidates=[QuantizeCandidate(per_channel=True), QuantizeCandidate(method="static"),
                           QuantizeCandidate(method="dynamic", fuse="multihead")])
    setups = onnx_stage.candidate_configs(cfg)
    assert [n for n, _ in setups] == ["static/entropy", "static/entropy/per-channel", "dynamic/fused-multihead"]
    assert setups[1][1].calibration_method == "entropy" and setups[1][1].per_channel
    assert all(c.candidates == [] for _, c in setups)
    with pytest.raises(ValueError, match="extra"):
        QuantizeConfig(candidates=[{"methd": "static"}])


@pytest.mark.parametrize(("keys", "message"), [
    ({"method": "fp16", "reduce_range": True}, "quantize.reduce_range shape(s) int8 rounding, and every setup here "
                                              "is fp16"),
    ({"method": "fp16", "op_types": ["MatMul"], "weight_type": "quint8"}, "quantize.weight_type, quantize.op_types"),
    ({"calibration_method": "entropy"}, "quantize.calibration_method shape(s) static int8's calibrated activations"),
    ({"method": "static", "percentile": 99.9}, "quantize.percentile shape(s)"),  # calibration_method is minmax
    ({"calibration_split": "validation"}, "quantize.calibration_split chooses the calibration texts"),
    # no stage calls quantize_torch, the one reader of these whatever the section's method
    ({"method": "fp16", "per_channel": True}, "quantize.per_channel shape(s) int8 rounding, and every setup here "
                                              "is fp16"),
    ({"calibration_samples": 12}, "quantize.calibration_samples chooses the calibration texts, which only static "
                                  "int8 and smooth_alpha read"),
    ({"method": "fp16", "calibration_samples": 12, "calibration_split": "validation"},
     "quantize.calibration_samples, quantize.calibration_split choose the calibration texts"),
    ({"embedding_block_size": 64}, "quantize.embedding_block_size sizes the blocks of 4-bit embeddings"),
    ({"palette_bits": 4}, "quantize.palette_bits sets Core ML palettization, and quantize.coreml_mode is linear8"),
])
def test_keys_that_no_setup_reads_are_refused(keys, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantizeConfig(enabled=True, **keys)


def test_keys_that_a_candidate_reads_are_accepted_and_each_setup_inherits_them():
    for keys, candidate in (({"method": "fp16", "reduce_range": True}, {"method": "dynamic"}),
                            ({"calibration_method": "percentile", "percentile": 99.9}, {"method": "static"}),
                            ({"calibration_split": "validation"}, {"smooth_alpha": 0.5}),
                            ({"embedding_block_size": 64}, {"embedding_bits": 4})):
        cfg = QuantizeConfig(enabled=True, **keys, candidates=[QuantizeCandidate(**candidate)])
        setups = [c for _, c in onnx_stage.candidate_configs(cfg)]
        # the section's own setup does not read the key, yet is built (its candidate does read it)
        assert len(setups) == 2
        assert all(getattr(c, k) == v for c in setups for k, v in keys.items() if k not in candidate)
    QuantizeConfig(enabled=True, palette_bits=4, coreml_mode="palettize")
    # per_channel is read by int8 setups, calibration_samples by static and smoothed ones (no stage calls
    # edgekd.quantization.quantize_torch, which reads them too): accepted where one is, refused elsewhere
    QuantizeConfig(enabled=True, method="fp16", per_channel=True, candidates=[QuantizeCandidate(method="dynamic")])
    QuantizeConfig(enabled=True, calibration_samples=12, candidates=[QuantizeCandidate(smooth_alpha=0.5)])
    QuantizeConfig(enabled=True, method="static", calibration_samples=12)


def test_setups_whose_names_match_are_kept_apart():
    # fp16 does not read per_channel: the two setups differ only in a key their name leaves out. A recipe
    # cannot ask for this (a candidate's key its own setup does not read is refused); built as the stage
    # builds a derived setup, which skips that check, the names are still kept apart.
    with pytest.raises(ValueError, match=re.escape("per_channel: not read by the candidate's own setup")):
        qcfg(method="fp16", candidates=[QuantizeCandidate(per_channel=True)])
    cfg = QuantizeConfig.model_validate({"method": "fp16", "candidates": [{"per_channel": True}]},
                                        context={SETUP_OF_SECTION: True})
    names = [n for n, _ in onnx_stage.candidate_configs(cfg)]
    assert names == ["fp16", "fp16 (2)"]


def test_a_candidate_that_cannot_be_built_is_reported_and_the_others_compete(fragile, tmp_path, monkeypatch):
    folder, inputs, labels = fragile
    monkeypatch.setattr(onnx_stage, "time_side_by_side", lambda paths, rows, runs, threads: {
        n: {"p50_ms": 2.0 if n == "float" else 1.0, "p90_ms": 1.0, "cpu_p50_ms": 1.0, "runs": runs} for n in paths})
    # The fragile graph has no Gather: 4-bit embeddings cannot apply, which this candidate asks for.
    cfg = qcfg(max_accuracy_drop=1.0, candidates=[QuantizeCandidate(embedding_bits=4)])
    report = quantize_onnx(folder, tmp_path / "q", cfg, inputs, inputs, labels, accuracy)
    assert report["candidate"] == "dynamic" and report["recommended"] == "quantized"
    (skipped,) = report["candidates_not_built"]
    assert skipped["name"].startswith("dynamic/emb4") and "embedding_bits" in skipped["why"]


def test_stage_writes_the_fastest_candidate_in_budget(fragile, tmp_path, monkeypatch):
    """Fake timings make static QDQ the fastest; both candidates pass once mm_out stays in float."""
    folder, inputs, labels = fragile
    p50 = {"float": 2.0, "dynamic": 1.0, "static/minmax": 0.5}

    def fake_timing(paths, rows, runs, threads):
        assert isinstance(rows, list) and len(rows) == min(runs, len(labels))
        return {n: {"p50_ms": p50[n], "p90_ms": p50[n], "cpu_p50_ms": p50[n], "runs": runs} for n in paths}

    monkeypatch.setattr(onnx_stage, "time_side_by_side", fake_timing)
    cfg = qcfg(calibration_samples=50, candidates=[QuantizeCandidate(method="static")])
    out = tmp_path / "q"
    report = quantize_onnx(folder, out, cfg, inputs, inputs, labels, accuracy)
    by_name = {c["name"]: c for c in report["candidates"]}
    assert by_name["static/minmax"]["chosen"] and not by_name["dynamic"]["chosen"]
    assert by_name["dynamic"]["why"].startswith("slower: 1.000 ms")
    assert report["candidate"] == "static/minmax" and report["precision"] == "int8-static"
    assert report["recommended"] == "quantized" and report["speed_guard"]["speedup"] == 4.0
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "DequantizeLinear" in ops  # the folder holds the chosen (QDQ) model
    assert read_artifact_meta(out)["quantization"]["method"] == "static"


# --- real lengths ------------------------------------------------------------------------------

def test_rows_are_cut_to_their_real_length_for_calibration_and_timing():
    ids = np.arange(24).reshape(3, 8) + 5
    mask = np.array([[1] * 8, [1] * 3 + [0] * 5, [1] * 5 + [0] * 3])
    rows = real_length_rows({"input_ids": ids, "attention_mask": mask})
    assert [r["input_ids"].shape for r in rows] == [(1, 8), (1, 3), (1, 5)]
    assert rows[1]["input_ids"].tolist() == [ids[1, :3].tolist()] and rows[1]["attention_mask"].all()
    served = list(make_reader({"input_ids": ids, "attention_mask": mask}, 3, ["input_ids"], {"input_ids": np.int64}))
    assert [r["input_ids"].shape[1] for r in served] == [8, 3, 5] and set(served[0]) == {"input_ids"}


# --- static QDQ graphs -------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_static_qdq_nodes_and_per_channel_axis(fragile, tmp_path, per_channel):
    folder, inputs, labels = fragile
    out = tmp_path / "q"
    quantize_onnx(folder, out, qcfg(method="static", per_channel=per_channel, calibration_samples=40,
                                    max_accuracy_drop=1.0), inputs, inputs, labels, accuracy)
    graph = onnx.load(str(out / "model.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    made_by = {o: n for n in graph.node for o in n.output}
    mm = next(n for n in graph.node if n.name == "mm_hidden")
    act_dq, w_dq = (made_by[i] for i in mm.input)
    assert act_dq.op_type == w_dq.op_type == "DequantizeLinear"
    assert made_by[act_dq.input[0]].op_type == "QuantizeLinear"  # activations quantized at run time (calibrated)
    assert inits[w_dq.input[0]].dtype == np.int8 and inits[w_dq.input[0]].shape == (16, 16)
    scale = inits[w_dq.input[1]]
    axis = next((a.i for a in w_dq.attribute if a.name == "axis"), None)
    if per_channel:  # one scale per output column of the [in, out] MatMul weight
        assert scale.shape == (16,) and axis == 1
    else:
        assert scale.shape == ()


# --- calibration split -------------------------------------------------------------------------

class _Split:
    def __init__(self, base: int):
        self.base = base
        self.labels = np.arange(30) % 2

    def __len__(self):
        return 30

    def collate(self, idx):
        ids = np.full((len(idx), 12), self.base, dtype=np.int64) + np.arange(len(idx))[:, None] % 7
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.zeros(len(idx), np.int64)}


@pytest.mark.slow  # exports a BERT with torch.onnx (dynamo) once per module
def test_calibration_reads_the_train_split_never_test(bert_export, tmp_path, monkeypatch):
    """run_quantize through a context whose splits hold different token ids: the calibrator gets
    train rows (recipe default), validation when asked, and test never: a sample seeded by data.split.seed,
    stratified by label, not the first rows."""
    from edgekd.quantization import onnx_methods
    from edgekd.quantization.calibration import calibration_rows
    from edgekd.stages import quantize
    from edgekd.tasks.text.context import TextRunContext

    fed: list[np.ndarray] = []
    real = onnx_methods.make_reader

    def spy(inputs, samples, names, dtypes=None):
        fed.append(np.asarray(inputs["input_ids"][:samples]))
        return real(inputs, samples, names, dtypes)

    monkeypatch.setattr(onnx_methods, "make_reader", spy)
    monkeypatch.setattr(quantize, "quantize_fingerprint", lambda ctx: "fp")
    splits = {"train": _Split(5), "validation": _Split(20), "test": _Split(35)}
    read: list[str] = []
    export_root = bert_export.parent

    def stage_dir(name):
        return export_root

    shipped = object()
    for split in ("train", "validation"):
        recipe = types.SimpleNamespace(quantize=qcfg(method="static", calibration_samples=10,
                                                     calibration_split=split, max_accuracy_drop=1.0),
                                         export=types.SimpleNamespace(targets=["onnx"]),
                                         data=types.SimpleNamespace(split=types.SimpleNamespace(seed=13)),
                                         bench=types.SimpleNamespace(profile="local"))
        ctx = types.SimpleNamespace(
            recipe=recipe, task=types.SimpleNamespace(metrics=accuracy),
            # The calibration texts are tokenized as the shipped model reads them (a trimmed vocabulary's ids).
            shipped_tokenizer=shipped,
            tokenized=lambda s, tok=None: (read.append(s), splits[s])[1] if tok is shipped else None,
            validation_data=lambda: ({k: v for k, v in splits["validation"].collate(np.arange(16)).items()
                                      if k != "labels"}, np.zeros(16, np.int64)),
            parity_data=lambda: ({k: v for k, v in splits["test"].collate(np.arange(8)).items()
                                  if k != "labels"}, np.zeros(8, np.int64)),
            run=types.SimpleNamespace(stage_dir=stage_dir, record=lambda *a, **k: None),
        )
        ctx.calibration_data = types.MethodType(TextRunContext.calibration_data, ctx)
        quantize.run_quantize(ctx)
        assert read == [split] and fed[-1].shape == (10, 12)
        rows = calibration_rows(30, 10, 13, splits[split].labels)
        assert not np.array_equal(rows, np.arange(10)) and np.bincount(splits[split].labels[rows]).tolist() == [5, 5]
        assert np.array_equal(fed[-1], splits[split].collate(rows)["input_ids"])
        read.clear()
    with pytest.raises(StageError, match="not 'test'"):
        TextRunContext.calibration_data(ctx, "test", 4)


# --- fused graphs ------------------------------------------------------------------------------

@pytest.mark.slow  # exports a BERT with torch.onnx (dynamo) once per module
@pytest.mark.parametrize("method", ["dynamic", "static"])
@pytest.mark.parametrize("fuse", ["attention", "multihead"])
def test_fused_graph_is_quantized_with_parity(bert_export, tmp_path, method, fuse):
    """ORT's fusions applied before quantizing, the fused float model checked against the export.
    What each method quantizes: the packed Attention stays float (ORT's quantizer skips an Attention
    with qkv_hidden_sizes); with multihead the Q/K/V projection MatMuls are int8."""
    val = text_inputs(32)
    val["attention_mask"][::3, 8:] = 0  # padded rows: the mask must survive the fusions
    labels = np.zeros(32, dtype=np.int64)
    out = tmp_path / "q"
    calibrated = {"calibration_samples": 16} if method == "static" else {}  # (dynamic reads none)
    report = quantize_onnx(bert_export, out, qcfg(method=method, fuse=fuse, **calibrated, max_accuracy_drop=1.0),
                           val, val, labels, accuracy)
    fusion = report["fusion"]
    fused_op = {"attention": "Attention", "multihead": "MultiHeadAttention"}[fuse]
    assert fusion["ort_optimizer"][fused_op] == 2 and fusion["ort_optimizer"]["SkipLayerNormalization"] >= 2
    assert fusion["parity"]["top1_agreement"] == 1.0 and fusion["parity"]["max_abs_diff"] < 1e-4
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count(fused_op) == 2 and "QAttention" not in ops
    int8 = {"dynamic": ("MatMulInteger", "DynamicQuantizeMatMul"), "static": ("DequantizeLinear",)}[method]
    n_int8 = sum(ops.count(o) for o in int8)
    if method == "dynamic":  # 2 layers x (FFN in, FFN out [+ Q, K, V with multihead]) + pooler/classifier
        assert n_int8 >= (2 * 5 if fuse == "multihead" else 2 * 2)
    else:
        assert n_int8 > 0 and "QuantizeLinear" in ops
    assert report["quantized"]["top1_agreement"] >= 0.9 and report["settings"]["fuse"] == fuse
    assert set(report["speed_guard"]["all"]) == {"float", f"float/fused-{fuse}", report["candidate"]}
