"""Batched serving never changes an answer, int8 included.

Dynamic int8 takes one activation scale per call over the whole batch (padding included), so the
server refuses to batch it and runs each of its rows alone; static int8 (fixed scales) batches, and
its batched answers equal the unbatched ones. Every comparison runs over a whole small test split.
"""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import pytest
from serve_helpers import LABELS, MAX_LENGTH, ort_loader, slow_loader

from edgekd.errors import StageError
from edgekd.export.base import read_artifact_meta, write_artifact_meta
from edgekd.runfolder import sha256_file
from edgekd.testing import sentiment_rows

TEST_SPLIT = [text for text, _ in sentiment_rows(48, seed=11)]


def _tokenised(folder):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(MAX_LENGTH)
    return [np.asarray(tok.encode(t).ids, dtype=np.int64) for t in TEST_SPLIT]


def _padded(rows: list[np.ndarray]) -> dict[str, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def _quantized_folder(export_dir, dst, precision: str):
    """A copy of the tiny float export, quantized with ONNX Runtime as the quantize stage does."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    shutil.copytree(export_dir, dst)
    model = dst / "model.onnx"
    tmp = dst / "float.onnx"
    model.rename(tmp)
    if precision == "int8-dynamic":
        quantize_dynamic(str(tmp), str(model), weight_type=QuantType.QInt8)
    else:
        batches = [_padded([r]) for r in _tokenised(export_dir)[:16]]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(batches)

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(tmp), str(model), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    tmp.unlink()
    meta = read_artifact_meta(dst)
    meta.update(precision=precision, sha256=sha256_file(model), size_bytes=model.stat().st_size)
    write_artifact_meta(dst, meta)
    return dst


@pytest.fixture(scope="module")
def dynamic_dir(export_dir, tmp_path_factory):
    return _quantized_folder(export_dir, tmp_path_factory.mktemp("q") / "onnx-int8", "int8-dynamic")


@pytest.fixture(scope="module")
def static_dir(export_dir, tmp_path_factory):
    return _quantized_folder(export_dir, tmp_path_factory.mktemp("q") / "onnx-int8-static", "int8-static")


def _answers(responses) -> list[tuple[str, list[float]]]:
    out = []
    for r in responses:
        assert r.status_code == 200, r.text
        out += [(p["label"], [p["probabilities"][k] for k in LABELS]) for p in r.json()["predictions"]]
    return out


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))


def test_dynamic_int8_rows_depend_on_their_batch(dynamic_dir):
    # Why the server must not batch it: the same text gets other logits inside a padded batch.
    runner, _ = ort_loader(dynamic_dir)
    rows = _tokenised(dynamic_dir)
    together = runner.run(_padded(rows))["logits"]
    alone = np.concatenate([runner.run(_padded([r]))["logits"] for r in rows])
    assert not np.array_equal(together, alone)


def test_batching_a_dynamic_int8_artifact_is_refused(dynamic_dir):
    from fastapi.testclient import TestClient

    from edgekd.serving import ServeSettings, create_app

    app = create_app(ServeSettings(export_dir=dynamic_dir, batching=True), loader=ort_loader)
    with pytest.raises(StageError, match=r"int8-dynamic.*onnx-int8-static.*serve.batching: false"), TestClient(app):
        pass


def test_dynamic_int8_unbatched_answers_do_not_depend_on_the_request(make_client, dynamic_dir):
    client = make_client(export_dir=dynamic_dir)
    alone = _answers([client.post("/predict", json={"text": t}) for t in TEST_SPLIT])
    together = _answers([client.post("/predict", json={"texts": TEST_SPLIT})])
    assert together == alone  # identical labels and probabilities, every text of the split


def test_dynamic_int8_token_tensors_padded_together_answer_as_each_text_alone(make_client, dynamic_dir):
    """v2 token tensors a client padded to its longest row: each row runs alone at its own length, so its
    answer is its /predict answer, whatever its neighbours."""
    client = make_client(export_dir=dynamic_dir)
    batch = _padded(_tokenised(dynamic_dir))
    r = client.post("/v2/models/onnx-int8/infer", json={"inputs": [  # the folder served alone: its name
        {"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()} for k, v in batch.items()]})
    assert r.status_code == 200, r.text
    out = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")
    together = np.asarray(out["data"]).reshape(out["shape"])
    alone = np.asarray([p for _, p in _answers([client.post("/predict", json={"text": t}) for t in TEST_SPLIT])])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-7)


def test_static_int8_batched_answers_equal_unbatched(live_server, static_dir):
    box: list = []
    plain = live_server(export_dir=static_dir)
    batched = live_server(export_dir=static_dir, loader=slow_loader(0.05, box), batching=True,
                          max_batch_size=8, max_wait_ms=20)
    bodies = [{"text": t} for t in TEST_SPLIT]
    want = _answers(asyncio.run(_post_all(plain.url, bodies)))
    got = _answers(asyncio.run(_post_all(batched.url, bodies)))
    assert len(got) == len(TEST_SPLIT)
    assert max(box[0].calls[1:]) > 1, "no batch formed"
    assert got == want
