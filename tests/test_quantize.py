"""Quantization: ONNX dynamic/static/fp16 export folders, calibration on the recipe's samples,
the accuracy guard (fails, finds the sensitive operator, recovers), the speed guard, torchao and
pt2e int8, Core ML weight compression."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekd.errors import DataError
from edgekd.export.base import read_artifact_meta, write_artifact_meta
from edgekd.quantization import make_reader, onnx_stage, quantize_onnx, registered_methods
from edgekd.recipe import QuantizeConfig
from edgekd.runfolder import sha256_file

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": float((outputs["logits"].argmax(-1) == labels).mean())}


def write_meta(folder: Path, **extra) -> None:
    model = folder / "model.onnx"
    write_artifact_meta(folder, {"target": "onnx", "exporter": "onnx", "file": "model.onnx",
                                 "sha256": sha256_file(model), "size_bytes": model.stat().st_size,
                                 "precision": "fp32", "labels": ["negative", "positive"], **extra})


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_export(tmp_path_factory) -> Path:
    """A tiny BERT classifier exported by the project's ONNX target, with tokenizer and artifact.json."""
    from transformers import AutoModelForSequenceClassification

    from edgekd.tasks.text.task import SequenceClassifierExport
    from edgekd.testing import tiny_bert

    src = tiny_bert(tmp_path_factory.mktemp("q-bert"), num_layers=2, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(src).eval()
    return export_folder(SequenceClassifierExport(model), src, tmp_path_factory.mktemp("export") / "onnx")


def export_folder(module, tokenizer_dir: Path, out: Path) -> Path:
    """``module`` exported by the project's ONNX target into ``out`` with the tokenizer files of
    ``tokenizer_dir`` and artifact.json, as the export stage writes a text folder."""
    from edgekd.export import get_exporter
    from edgekd.export import onnx as _onnx  # noqa: F401  (registers the target)
    from edgekd.tasks.text.task import TEXT_IO

    ids = np.random.default_rng(0).integers(5, 40, size=(2, 12))
    get_exporter("onnx").export(module, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, TEXT_IO, out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    write_meta(out, io={"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"]},
               extra_sha256={n: sha256_file(out / n) for n in TOKENIZER_FILES})  # as the export stage records
    return out


def text_inputs(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(5, 40, size=(n, 12)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def fragile_model(folder: Path, seed: int = 0) -> Path:
    """x[N,16] -> MatMul 'mm_hidden' -> Relu -> MatMul 'mm_out' -> logits[N,2].

    mm_out's weight has one outlier row (±1000) on a hidden unit that is always zero, so it never
    matters in float; per-tensor int8 scales every other weight of mm_out to zero, and the int8
    model predicts one class for everything.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(16, 16)).astype(np.float32)
    w1[:, 0] = 0  # hidden unit 0 is always zero
    w2 = rng.normal(size=(16, 2)).astype(np.float32)
    w2[0] = [1000.0, -1000.0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm_hidden"),
         helper.make_node("Relu", ["h"], ["hr"], name="relu"),
         helper.make_node("MatMul", ["hr", "w2"], ["logits"], name="mm_out")],
        "fragile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "labels.json").write_text('["a", "b"]')
    write_meta(folder)
    return folder


def fragile_data(folder: Path, n: int = 200) -> tuple[dict[str, np.ndarray], np.ndarray]:
    import onnxruntime as ort

    x = np.random.default_rng(3).normal(size=(n, 16)).astype(np.float32)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    labels = sess.run(None, {"x": x})[0].argmax(-1)  # the float model is right by construction
    return {"x": x}, labels


@pytest.fixture
def fragile(tmp_path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    folder = fragile_model(tmp_path / "export" / "onnx")
    inputs, labels = fragile_data(folder)
    return folder, inputs, labels


def qcfg(**kw) -> QuantizeConfig:
    kw.setdefault("speed_runs", 5)
    return QuantizeConfig(enabled=True, **kw)


# --- tests -------------------------------------------------------------------------------------

def test_every_recipe_method_is_registered():
    from edgekd.registry import QUANTIZE_METHODS  # what the recipe validates quantize.method against

    values = list(QUANTIZE_METHODS)
    assert set(values) == set(registered_methods())


@pytest.mark.slow  # exports a BERT with torch.onnx (dynamo) once per module
def test_dynamic_int8_writes_a_servable_export_folder(bert_export, tmp_path):
    from edgekd.export import get_exporter

    val = text_inputs(32)
    labels = np.zeros(32, dtype=np.int64)
    out = tmp_path / "export" / "onnx-int8"
    report = quantize_onnx(bert_export, out, qcfg(max_accuracy_drop=1.0), None, val, labels, accuracy)

    meta = read_artifact_meta(out)
    assert meta["precision"] == "int8-dynamic" and meta["exporter"] == "onnx" and meta["file"] == "model.onnx"
    assert meta["sha256"] == sha256_file(out / "model.onnx") != read_artifact_meta(bert_export)["sha256"]
    assert meta["size_bytes"] == (out / "model.onnx").stat().st_size < (bert_export / "model.onnx").stat().st_size
    assert meta["source"]["sha256"] == read_artifact_meta(bert_export)["sha256"]
    assert meta["quantization"]["method"] == "dynamic" and meta["labels"] == ["negative", "positive"]
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (bert_export / name).read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    from edgekd.serving.model import verify_artifact

    verify_artifact(out, meta)  # every file listed in artifact.json matches: the server will load it

    runner = get_exporter("onnx").load(out / "model.onnx")
    logits = runner.run(val)["logits"]
    assert logits.shape == (32, 2) and np.isfinite(logits).all()
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops
    assert report["accuracy_guard"]["passed"] and report["accuracy_guard"]["attempts"][0]["float_nodes"] == []
    assert report["quantized"]["top1_agreement"] >= 0.5 and report["quantized"]["max_abs_diff"] < 0.5
    assert report["preprocess"]["options"] is not None  # ORT's recommended pre-processing ran


@pytest.mark.slow  # exports a BERT with torch.onnx (dynamo) once per module
def test_the_quantized_folder_describes_its_own_graph_not_the_float_exports(bert_export, tmp_path):
    """artifact.json's notes (node count, opset, weight bytes) and creation time are the int8 file's,
    not copied from the float folder's meta; the float export's notes are kept under source_notes."""
    src = tmp_path / "onnx"
    shutil.copytree(bert_export, src)
    float_notes = {"exporter": "torch.onnx.export(dynamo=True)", "nodes": 1, "opset": 1, "weight_bytes": 1,
                   "created_by_test": True}
    write_artifact_meta(src, {**read_artifact_meta(src), "notes": float_notes, "created": "2000-01-01T00:00:00+00:00"})
    out = tmp_path / "onnx-int8"
    quantize_onnx(src, out, qcfg(max_accuracy_drop=1.0), None, text_inputs(16), np.zeros(16, dtype=np.int64),
                  accuracy)
    meta = read_artifact_meta(out)
    proto = onnx.load(str(out / "model.onnx"))
    from onnx import numpy_helper

    assert meta["notes"]["nodes"] == len(proto.graph.node)
    assert meta["notes"]["opset"] == next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert meta["notes"]["weight_bytes"] == sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    assert meta["notes"]["external_data"] is False and meta["notes"]["source_notes"] == float_notes
    assert meta["created"] > "2000-01-01T00:00:00+00:00"


def test_dynamic_int8_is_judged_one_text_per_call_at_its_own_length(bert_export, tmp_path):
    """Dynamic int8 takes one activation scale per call, padding included, and is served one text per
    call: the guard judges it so (its recorded outputs are those of each text alone, unpadded)."""
    import onnxruntime as ort

    val = text_inputs(24, seed=5)
    lengths = np.random.default_rng(6).integers(3, 13, size=24)
    val["attention_mask"] = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
    val["input_ids"] = np.where(val["attention_mask"] == 1, val["input_ids"], 0)
    labels = np.zeros(24, dtype=np.int64)
    out = tmp_path / "onnx-int8"
    report = quantize_onnx(bert_export, out, qcfg(max_accuracy_drop=1.0), None, val, labels, accuracy)

    def session(folder):
        return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    ref = session(bert_export).run(["logits"], val)[0]  # float: rows do not depend on each other
    q = session(out)
    alone = np.concatenate([q.run(["logits"], {k: v[i:i + 1, :n] for k, v in val.items()})[0]
                            for i, n in enumerate(lengths)])
    batched = q.run(["logits"], val)[0]
    assert not np.allclose(alone, batched, atol=1e-6)  # the batch really changes the answers
    assert report["quantized"]["max_abs_diff"] == pytest.approx(float(np.abs(alone - ref).max()), abs=1e-6)


@pytest.mark.slow  # exports a BERT with torch.onnx (dynamo) once per module
def test_static_calibrates_on_the_recipe_sample_count(bert_export, tmp_path):
    calib = text_inputs(50, seed=2)
    val = text_inputs(16)
    report = quantize_onnx(bert_export, tmp_path / "onnx-int8-static",
                           qcfg(method="static", calibration_samples=20, max_accuracy_drop=1.0),
                           calib, val, np.zeros(16, dtype=np.int64), accuracy)
    assert report["settings"]["calibration_samples"] == 20
    assert report["precision"] == "int8-static"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx-int8-static" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def _embedding_gathers(path: Path) -> tuple[int, int]:
    """(Gathers whose table is a 2-D weight, GatherBlockQuantized nodes) in an ONNX file."""
    model = onnx.load(str(path))
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    plain = sum(n.op_type == "Gather" and n.input[0] in weights for n in model.graph.node)
    return plain, sum(n.op_type == "GatherBlockQuantized" for n in model.graph.node)


@pytest.mark.slow  # exports a BERT with torch.onnx (dynamo) once per module
@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_four_bit_embeddings_shrink_the_file_and_keep_the_answers(bert_export, tmp_path, method):
    import onnxruntime as ort

    val = text_inputs(32)
    labels = np.zeros(32, dtype=np.int64)
    calib = text_inputs(20, seed=2)
    runs = {}
    for bits in (8, 4):
        out = tmp_path / f"{method}-{bits}"
        four = {"embedding_bits": 4, "embedding_float_rows": 0} if bits == 4 else {}  # every table 4-bit
        calibrated = {"calibration_samples": 20} if method == "static" else {}  # (dynamic reads none)
        report = quantize_onnx(bert_export, out, qcfg(method=method, **four, **calibrated, max_accuracy_drop=1.0),
                               calib, val, labels, accuracy)
        runs[bits] = (out / "model.onnx", report)
    plain8, g4_8 = _embedding_gathers(runs[8][0])
    plain4, g4_4 = _embedding_gathers(runs[4][0])
    # Every embedding table (word, position, token type) is 4-bit; none is left as a float or int8 Gather.
    assert g4_8 == 0 and g4_4 >= 3 and plain4 == 0
    assert runs[4][1]["settings"]["embeddings"] == "4-bit GatherBlockQuantized, block 32"
    assert "embeddings" not in runs[8][1]["settings"]
    assert runs[4][0].stat().st_size < runs[8][0].stat().st_size
    # The 4-bit tables answer as the 8-bit ones do, up to rounding.
    outs = {b: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, val)[0]
            for b, (p, _) in runs.items()}
    assert np.abs(outs[4] - outs[8]).max() < 0.1


def test_four_bit_tables_are_stored_packed_in_uint8_with_the_same_answers(tmp_path, monkeypatch):
    """The 4-bit tables go to ONNX Runtime as uint8 (two values per byte), the layout its kernel gathers
    fastest, and answer exactly as the UINT4 tensors the quantizer writes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekd.quantization import onnx_methods

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["out"], axis=0)], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    packed, plain = tmp_path / "packed.onnx", tmp_path / "uint4.onnx"
    onnx.save(model, str(packed))
    onnx.save(model, str(plain))
    assert onnx_methods.quantize_embeddings_4bit(packed, 32, [], False) == 1
    with monkeypatch.context() as m:
        m.setattr(onnx_methods, "_pack_uint4_as_uint8", lambda model: 0)
        onnx_methods.quantize_embeddings_4bit(plain, 32, [], False)
    dtypes = {}
    for path in (packed, plain):
        inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
        (node,) = onnx.load(str(path)).graph.node
        dtypes[path.stem] = [(TensorProto.DataType.Name(inits[n].data_type), list(inits[n].dims))
                             for n in (node.input[0], node.input[3])]
    assert dtypes == {"packed": [("UINT8", [50, 32]), ("UINT8", [50, 1])],
                      "uint4": [("UINT4", [50, 64]), ("UINT4", [50, 2])]}
    ids = {"ids": np.array([[0, 7, 49, 7, 3]], dtype=np.int64)}
    got = ort.InferenceSession(str(packed), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    want = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    np.testing.assert_array_equal(got, want)
    # and both are the table up to 4-bit rounding (16 levels per block of 32 values)
    assert np.abs(got[0] - table[ids["ids"][0]]).max() < (table.max() - table.min()) / 15


def test_small_tables_keep_their_float_values_beside_four_bit_vocabularies(tmp_path):
    """``embedding_float_rows``: a table of at most that many rows (here 64, a position table) stays a
    plain Gather over its own float32 values, bit for bit; a larger one (2,000 rows, a vocabulary)
    becomes 4-bit; 0 makes every table 4-bit. An unnamed small Gather is named first, so that the
    quantizer's exclusion by name cannot reach the unnamed vocabulary Gather too."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekd.errors import StageError
    from edgekd.quantization import onnx_methods

    rng = np.random.default_rng(1)
    words, positions = rng.normal(size=(2000, 64)).astype(np.float32), rng.normal(size=(64, 64)).astype(np.float32)

    def model(word_name, position_name):
        graph = helper.make_graph(
            [helper.make_node("Gather", ["words", "ids"], ["w"], axis=0, name=word_name),
             helper.make_node("Gather", ["positions", "pos"], ["p"], axis=0, name=position_name),
             helper.make_node("Add", ["w", "p"], ["out"])], "g",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None]),
             helper.make_tensor_value_info("pos", TensorProto.INT64, [1, None])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "w", "p")],
            [numpy_helper.from_array(words, "words"), numpy_helper.from_array(positions, "positions")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    paths = {rows: tmp_path / f"float{rows}.onnx" for rows in (0, 64, 63)}
    for rows, path in paths.items():
        onnx.save(model("word_gather", "position_gather"), str(path))
        assert onnx_methods.quantize_embeddings_4bit(path, 32, [], False, float_rows=rows) == (1 if rows == 64 else 2)
    kinds = {rows: {n.name: n.op_type for n in onnx.load(str(p)).graph.node if "gather" in n.name}
             for rows, p in paths.items()}
    assert kinds[0] == kinds[63] == {"word_gather_Q4": "GatherBlockQuantized", "position_gather_Q4": "GatherBlockQuantized"}
    assert kinds[64] == {"word_gather_Q4": "GatherBlockQuantized", "position_gather": "Gather"}
    inits = {t.name: t for t in onnx.load(str(paths[64])).graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(inits["positions"]), positions)  # its own values
    feed = {"ids": np.array([[5, 1999, 0, 5]], dtype=np.int64), "pos": np.array([[0, 1, 2, 63]], dtype=np.int64)}
    out = {rows: dict(zip(("w", "p"), ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
        ["w", "p"], feed), strict=True)) for rows, p in paths.items()}
    np.testing.assert_array_equal(out[64]["p"][0], positions[feed["pos"][0]])  # the table's own rows, exactly
    np.testing.assert_array_equal(out[64]["w"], out[0]["w"])  # the vocabulary: the same 4-bit values
    assert np.abs(out[0]["w"][0] - words[feed["ids"][0]]).max() > 1e-3  # which are 4-bit
    assert np.abs(out[0]["p"][0] - positions[feed["pos"][0]]).max() > 1e-3  # and so is the position table at 0

    unnamed = tmp_path / "unnamed.onnx"
    onnx.save(model("", ""), str(unnamed))
    assert onnx_methods.quantize_embeddings_4bit(unnamed, 32, [], False, float_rows=64) == 1
    ops = sorted(n.op_type for n in onnx.load(str(unnamed)).graph.node)
    assert ops == ["Add", "Gather", "GatherBlockQuantized"]
    only_small = tmp_path / "small.onnx"
    onnx.save(model("word_gather", "position_gather"), str(only_small))
    with pytest.raises(StageError, match="2 embedding table\\(s\\) have at most quantize.embedding_float_rows=2000"):
        onnx_methods.quantize_embeddings_4bit(only_small, 32, [], False, float_rows=2000)


def test_four_bit_embeddings_are_refused_where_they_cannot_apply(fragile, tmp_path):
    from edgekd.errors import RecipeError, StageError
    from edgekd.recipe import parse_recipe

    with pytest.raises(RecipeError, match="embedding_bits: 4 quantizes the embeddings of an int8 method"):
        parse_recipe({"name": "x", "quantize": {"enabled": True, "method": "fp16", "embedding_bits": 4}})
    with pytest.raises(RecipeError, match="embedding_block_size must be a power of 2"):
        parse_recipe({"name": "x", "quantize": {"enabled": True, "embedding_block_size": 48}})
    with pytest.raises(RecipeError, match="embedding_float_rows .* needs quantize.embedding_bits: 4"):
        parse_recipe({"name": "x", "quantize": {"enabled": True, "embedding_float_rows": 0}})
    from edgekd.recipe_check import check_inputs

    detector = parse_recipe({"task": "detection", "eval": {"ood_dataset": None}, "student": {"model": "edgekd-det-s"},
                             "quantize": {"enabled": True, "embedding_bits": 4, "guard_metric": "map50",
                                          "candidates": [{"method": "static"}, {"embedding_bits": 4}]},
                             "export": {"targets": ["onnx"]}})
    why = "it shrinks the embedding tables of a text encoder; a detector has none"
    assert check_inputs(detector) == [f"quantize.embedding_bits: {why}: remove it",
                                      f"quantize.candidates[1].embedding_bits: {why}: remove it"]
    folder, inputs, labels = fragile  # MatMuls only: no embedding table to shrink
    with pytest.raises(StageError, match="found no Gather over a float weight"):
        quantize_onnx(folder, tmp_path / "onnx-int8", qcfg(embedding_bits=4, max_accuracy_drop=1.0), None,
                      inputs, labels, accuracy)
    assert not (tmp_path / "onnx-int8").exists()  # nothing half-written


def test_calibration_reader_counts_and_checks_samples():
    reader = make_reader(text_inputs(10), 4, ["input_ids", "attention_mask"], {"input_ids": np.int64})
    rows = list(reader)
    assert len(rows) == 4 == reader.served and rows[0]["input_ids"].shape == (1, 12)
    with pytest.raises(DataError, match="only 10 calibration examples"):
        make_reader(text_inputs(10), 11, ["input_ids", "attention_mask"])
    with pytest.raises(DataError, match="lack"):
        make_reader({"input_ids": np.zeros((4, 3))}, 2, ["input_ids", "attention_mask"])


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_accuracy_guard_finds_and_keeps_the_sensitive_node_in_float(fragile, tmp_path, method):
    folder, inputs, labels = fragile
    out = tmp_path / "export" / "onnx-int8"
    calibrated = {"calibration_samples": 50} if method == "static" else {}  # (dynamic reads none)
    report = quantize_onnx(folder, out, qcfg(method=method, **calibrated), inputs, inputs, labels, accuracy)

    guard = report["accuracy_guard"]
    first, last = guard["attempts"][0], guard["attempts"][-1]
    assert guard["float_metric"] == 1.0
    assert not first["passed"] and first["drop"] > 0.2  # all-int8 breaks the model
    assert guard["sensitivity"][0]["node"] == "mm_out"  # the outlier MatMul is ranked first
    assert guard["sensitivity"][0]["metric_recovered"] > 0.2
    assert last["passed"] and last["float_nodes"] == ["mm_out"] and guard["passed"]
    assert [n["node"] for n in guard["float_nodes"]] == ["mm_out"]
    assert guard["drop"] <= 0.01
    meta = read_artifact_meta(out)
    assert meta["quantization"]["float_nodes"] == ["mm_out"] and meta["quantization"]["accuracy_guard"]["passed"]
    graph = onnx.load(str(out / "model.onnx")).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}
    assert nodes["mm_out"].op_type == "MatMul" and "w2" in nodes["mm_out"].input  # float weights
    if method == "dynamic":  # mm_hidden became an integer MatMul
        assert "mm_hidden" not in nodes or nodes["mm_hidden"].op_type != "MatMul"
    else:  # QDQ keeps the MatMul, fed by dequantized int8 tensors
        assert {made_by.get(i) for i in nodes["mm_hidden"].input} == {"DequantizeLinear"}
    if method == "static":  # retries reuse the calibration: the samples were read once
        assert report["settings"]["calibration_samples"] == 50


def test_guard_that_cannot_meet_the_budget_recommends_float(fragile, tmp_path):
    folder, inputs, labels = fragile
    report = quantize_onnx(folder, tmp_path / "q", qcfg(max_attempts=1), None, inputs, labels, accuracy)
    guard = report["accuracy_guard"]
    assert not guard["passed"] and "float model is recommended" in guard["note"]
    assert report["recommended"] == "float" and report["recommended_dir"] == str(folder)
    assert guard["note"] in report["reasons"]
    assert read_artifact_meta(tmp_path / "q")["quantization"]["recommended"] == "float"


def test_guard_metric_must_exist(fragile, tmp_path):
    folder, inputs, labels = fragile
    with pytest.raises(DataError, match="guard_metric"):
        quantize_onnx(folder, tmp_path / "q", qcfg(guard_metric="f1"), None, inputs, labels, accuracy)


def test_speed_guard_reports_side_by_side_timings(fragile, tmp_path):
    folder, inputs, labels = fragile
    report = quantize_onnx(folder, tmp_path / "q", qcfg(max_accuracy_drop=1.0, speed_runs=7), None,
                           inputs, labels, accuracy)
    speed = report["speed_guard"]
    assert speed["batch"] == 1 and speed["float"]["runs"] == speed["quantized"]["runs"] == 7
    assert speed["quantized_faster"] == (speed["quantized"]["p50_ms"] < speed["float"]["p50_ms"])
    assert speed["speedup"] == pytest.approx(speed["float"]["p50_ms"] / speed["quantized"]["p50_ms"], rel=1e-2)
    assert ("note" in speed) == (not speed["quantized_faster"])
    assert report["recommended"] == ("quantized" if speed["quantized_faster"] else "float")


def test_side_by_side_timing_feeds_every_model_the_same_inputs_in_rotating_blocks_as_its_runner_would(
        monkeypatch, tmp_path):
    import types

    import onnxruntime as ort

    from edgekd.quantization.guard import time_side_by_side

    calls, options = [], {}

    class Session:
        def __init__(self, path, so, providers, disabled_optimizers=None):
            self.path = Path(path).name
            options[self.path] = so
            assert disabled_optimizers is None  # no runtime_options given: ONNX Runtime's own optimisers

        def get_inputs(self):
            return [types.SimpleNamespace(name="x", type="tensor(float)")]

        def get_outputs(self):
            return [types.SimpleNamespace(name="y", type="tensor(float)")]

        def get_providers(self):
            return ["CPUExecutionProvider"]

        def run(self, _, feed):
            calls.append((self.path, int(feed["x"][0, 0])))

    monkeypatch.setattr(ort, "InferenceSession", Session)
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / name).write_bytes(b"")  # the runner checks the file is there
    feeds = [{"x": np.full((1, 2), i, dtype=np.float32)} for i in range(3)]
    out = time_side_by_side({"float": tmp_path / "a.onnx", "quantized": tmp_path / "b.onnx"}, feeds, runs=25,
                            threads=2, warmup=0, block=10)
    assert out["float"]["runs"] == out["quantized"]["runs"] == 25
    order = [p for p, _ in calls]
    assert order == ["a.onnx"] * 10 + ["b.onnx"] * 10 + ["a.onnx"] * 10 + ["b.onnx"] * 10 + ["a.onnx"] * 5 + \
        ["b.onnx"] * 5
    assert [f for p, f in calls if p == "a.onnx"] == [f for p, f in calls if p == "b.onnx"] == [i % 3 for i in range(25)]
    # The runner's own session settings: the thread count, ONNX Runtime's spinning left as it is.
    assert set(options) == {"a.onnx", "b.onnx"}
    for so in options.values():
        assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
        with pytest.raises(Exception):  # noqa: B017 (an unset entry raises in ONNX Runtime)
            so.get_session_config_entry("session.intra_op.allow_spinning")


def test_slower_int8_is_reported_and_float_recommended(fragile, tmp_path, monkeypatch):
    folder, inputs, labels = fragile

    def slower_int8(paths, inputs, runs, threads):
        return {name: {"p50_ms": 1.0 if name == "float" else 1.5, "p90_ms": 1.6, "runs": runs} for name in paths}

    monkeypatch.setattr(onnx_stage, "time_side_by_side", slower_int8)
    report = quantize_onnx(folder, tmp_path / "q", qcfg(), None, inputs, labels, accuracy)
    assert report["accuracy_guard"]["passed"]
    assert not report["speed_guard"]["quantized_faster"]
    assert "int8-dynamic is not faster than float" in report["speed_guard"]["note"]
    assert report["recommended"] == "float" and report["reasons"] == [report["speed_guard"]["note"]]


OFF = {"disabled_optimizers": ["SkipLayerNormFusion"]}


def test_the_quantized_folder_records_its_own_session_choice_not_the_float_folders(fragile, tmp_path):
    folder, inputs, labels = fragile
    meta = read_artifact_meta(folder)
    write_artifact_meta(folder, {**meta, "runtime_options": OFF, "session_tuning": {"timed": True}})
    report = quantize_onnx(folder, tmp_path / "q", qcfg(max_accuracy_drop=1.0), None, inputs, labels, accuracy)
    out = read_artifact_meta(tmp_path / "q")
    # The int8 graph has no Add -> LayerNormalization pair: nothing timed, ONNX Runtime's defaults kept.
    assert out["runtime_options"] == {} == report["session"]["runtime_options"]
    assert out["session_tuning"] == {"timed": False, "reason": "no Add -> LayerNormalization pair to fuse"}


@pytest.mark.parametrize("tuned_metric_ok", [True, False])
def test_a_faster_session_is_kept_only_within_the_accuracy_budget(fragile, tmp_path, monkeypatch, tuned_metric_ok):
    from edgekd.quantization.guard import Evaluator

    folder, inputs, labels = fragile
    seen = []

    def tune(path, rows, runs, threads):
        seen.append((Path(path), len(rows), runs))
        return {"runtime_options": dict(OFF), "tuning": {"timed": True, "chosen": "SkipLayerNormFusion off"}}

    real_score = Evaluator.score

    def score(self, path, subset=False, precision=None, options=None):
        result = real_score(self, path, subset, precision, options)
        if options == OFF and not tuned_metric_ok:
            result = {**result, "metric": result["metric"] - 0.5}
        return result

    monkeypatch.setattr(onnx_stage, "tune_session", tune)
    monkeypatch.setattr(Evaluator, "score", score)
    report = quantize_onnx(folder, tmp_path / "q", qcfg(max_accuracy_drop=0.2, max_attempts=4), None,
                           inputs, labels, accuracy)
    assert report["accuracy_guard"]["passed"] and len(seen) == 1 and seen[0][2] >= 200
    out = read_artifact_meta(tmp_path / "q")
    tuning = report["session"]["tuning"]
    assert "validation_metric" in tuning
    if tuned_metric_ok:
        assert out["runtime_options"] == OFF and "note" not in tuning
        assert report["quantized"]["metrics"]["accuracy"] == pytest.approx(tuning["validation_metric"])
    else:
        assert out["runtime_options"] == {} and "outside the budget" in tuning["note"]
        assert report["quantized"]["metrics"]["accuracy"] == pytest.approx(report["accuracy_guard"]["quantized_metric"])


def test_the_verdict_against_float_times_each_model_in_the_session_it_ships_with(fragile, tmp_path, monkeypatch):
    """Ranked in the default session the int8 model looks slower than float; in the tuned session it
    ships with it is faster. The recommendation reads the second timing, taken side by side."""
    folder, inputs, labels = fragile
    calls = []

    def timing(paths, rows, runs, threads):
        calls.append({n: (spec[1] if isinstance(spec, tuple) else {}) for n, spec in paths.items()})
        tuned = len(calls) > 1
        return {n: {"p50_ms": 1.0 if n == "float" else (0.8 if tuned else 1.2), "p90_ms": 1.0, "cpu_p50_ms": 1.0,
                    "runs": runs} for n in paths}

    monkeypatch.setattr(onnx_stage, "time_side_by_side", timing)
    monkeypatch.setattr(onnx_stage, "tune_session", lambda path, rows, runs, threads: {
        "runtime_options": dict(OFF), "tuning": {"timed": True, "chosen": "SkipLayerNormFusion off"}})
    report = quantize_onnx(folder, tmp_path / "q", qcfg(max_accuracy_drop=1.0), None, inputs, labels, accuracy)
    assert len(calls) == 2 and calls[1] == {"float": {}, "dynamic": OFF}  # each in the session it ships with
    guard = report["speed_guard"]
    assert guard["quantized_faster"] and guard["speedup"] == 1.25 and report["recommended"] == "quantized"
    assert guard["ranking"]["speedup"] == pytest.approx(1 / 1.2, abs=1e-3) and "timed again" in guard["session"]


@pytest.mark.slow  # exports a BERT with torch.onnx (dynamo) once per module
def test_fp16_keeps_float_io(bert_export, tmp_path):
    val = text_inputs(8)
    report = quantize_onnx(bert_export, tmp_path / "onnx-fp16", qcfg(method="fp16", max_accuracy_drop=1.0),
                           None, val, np.zeros(8, dtype=np.int64), accuracy)
    assert read_artifact_meta(tmp_path / "onnx-fp16")["precision"] == "fp16"
    assert report["quantized"]["max_abs_diff"] < 0.05
    graph = onnx.load(str(tmp_path / "onnx-fp16" / "model.onnx")).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)


def test_weights_kept_beside_the_graph_stay_beside_it(fragile, tmp_path):
    folder, inputs, labels = fragile
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    write_meta(folder)
    out = tmp_path / "q"
    quantize_onnx(folder, out, qcfg(), None, inputs, labels, accuracy)
    assert sorted(p.name for p in out.iterdir()) == ["artifact.json", "labels.json", "model.onnx", "model.onnx.data"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert (sess.run(None, inputs)[0].argmax(-1) == labels).mean() > 0.99


def test_missing_artifact_json_is_a_clear_error(tmp_path):
    from edgekd.errors import UnsupportedTargetError

    with pytest.raises(UnsupportedTargetError, match="not an edgekd export folder"):
        quantize_onnx(tmp_path, tmp_path / "q", qcfg(), None, {"x": np.zeros((1, 16))}, np.zeros(1), accuracy)


# --- PyTorch / ExecuTorch ----------------------------------------------------------------------

def mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4)).eval()


def keyword_mlp():
    """torch.export and the timing call models with keyword inputs: this one takes ``x``."""
    import torch

    class KeywordMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

    return KeywordMLP().eval()


def _snr_db(ref, out) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float(10 * np.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def test_torchao_int8_dynamic():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchao")
    from edgekd.quantization import quantize_torch

    model = keyword_mlp()
    x = {"x": torch.randn(8, 64)}
    q, report = quantize_torch(model, qcfg(), x, method="int8-dynamic",
                               evaluate=lambda m: {"accuracy": 1.0})
    assert report["quantized_linears"] == 2
    assert type(model.net[0].weight).__name__ == "Parameter"  # the float model is left alone
    assert _snr_db(model(**x), q(**x)) > 20
    assert report["accuracy_guard"]["passed"]
    speed = report["speed_guard"]
    assert speed["quantized_faster"] == (speed["quantized_p50_ms"] < speed["float_p50_ms"])
    assert report["recommended"] == ("quantized" if speed["quantized_faster"] else "float")


@pytest.mark.slow  # torch.export + pt2e prepare/convert
def test_pt2e_xnnpack_calibrates_on_the_sample_count_asked():
    torch = pytest.importorskip("torch")
    pytest.importorskip("executorch")
    from edgekd.quantization import quantize_torch

    model = keyword_mlp()
    x = {"x": torch.randn(2, 64)}
    batches = [{"x": torch.randn(4, 64)} for _ in range(10)]
    # (a dynamic quantize section refuses calibration_samples, which none of its ONNX setups reads)
    q, report = quantize_torch(model, qcfg(), x, batches, method="pt2e-xnnpack", calibration_samples=12)
    assert report["calibration_samples"] == 12 and report["quantize_nodes"] > 0
    assert _snr_db(model(**x), q(**x)) > 15
    assert "skipped" in report["speed_guard"]


# --- Core ML -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["linear8", "palettize"])
def test_coreml_weight_compression(tmp_path, mode):
    torch = pytest.importorskip("torch")
    ct = pytest.importorskip("coremltools")
    from edgekd.quantization import quantize_coreml

    model = mlp()
    traced = torch.jit.trace(model, torch.randn(1, 64))
    ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 64))], convert_to="mlprogram",
                    compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    src = tmp_path / "model.mlpackage"
    ml.save(str(src))
    out = tmp_path / "q" / "model.mlpackage"
    palette = {"palette_bits": 4} if mode == "palettize" else {}  # linear8 reads no palette (refused there)
    report = quantize_coreml(src, out, qcfg(coreml_mode=mode, **palette))
    assert (out / "Manifest.json").is_file()
    assert report["size_bytes_after"] < report["size_bytes_before"] / 2
    expected = "constexpr_affine_dequantize" if mode == "linear8" else "constexpr_lut_to_dense"
    assert report["constexpr_ops"].get(expected, 0) >= 1
    err = report["weight_error"]
    assert err["weights_compared"] >= 1 and err["max_relative_error"] < (0.02 if mode == "linear8" else 0.3)
    assert "skipped" in report["accuracy_guard"]
    assert json.loads((out / "Manifest.json").read_text())


def test_weights_lose_their_duplicate_shape_records_before_quantizing(tmp_path):
    """torch.export graphs record every weight's shape in value_info. ONNX Runtime 1.30's quantizer turns
    a Gemm (transB) into a MatMul by transposing the weight, leaves that record as it was, and its own
    shape inference then fails; ``prepare`` drops the records of initializers (they carry their shape)."""
    from onnx import TensorProto, helper, numpy_helper

    from edgekd.quantization.onnx_stage import prepare

    w = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Gemm", ["h", "w"], ["logits"], transB=1)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(w, "w")],
        value_info=[helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 16]),
                    helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 16])],
    )
    src = tmp_path / "src.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dst = tmp_path / "prepared.onnx"
    notes = prepare(src, dst, preprocess=False)
    assert notes["dropped_weight_shape_records"] == 1
    prepared = onnx.load(str(dst))
    assert [vi.name for vi in prepared.graph.value_info] == ["h"]  # the activation's record stays
    assert [n.name for n in prepared.graph.node] == ["Relu_0", "Gemm_1"]

    def as_matmul(model):  # what ONNX Runtime 1.30's replace_gemm_with_matmul does to the graph
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.T.copy(), "w"))
        model.graph.node[1].CopyFrom(helper.make_node("MatMul", ["h", "w"], ["logits"], name="Gemm_1"))
        return model

    onnx.shape_inference.infer_shapes(as_matmul(prepared), strict_mode=True)  # passes without the record
    with pytest.raises(onnx.shape_inference.InferenceError, match="differ"):
        onnx.shape_inference.infer_shapes(as_matmul(onnx.load(str(src))), strict_mode=True)
