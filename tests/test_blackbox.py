"""Black-box teachers over real HTTP on loopback: an edgekd server (uvicorn) serving a tiny model
exported with the project's ONNX exporter, and a small stdlib server that fails on purpose
(503s, dropped connections, a wrong key) and counts every request it gets."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgekd.errors import RecipeError
from edgekd.recipe import TeacherClientConfig, TeacherEndpoint, parse_recipe
from edgekd.teachers import AnswerCache, TeacherRequestError, ask_all, open_black_box
from edgekd.teachers.combine import softmax
from edgekd.testing import NEGATIVE, POSITIVE

LABELS = ["negative", "positive"]
FAST = TeacherClientConfig(backoff_s=0.01, max_backoff_s=0.05, timeout_s=10)


# --- a teacher that fails on purpose ----------------------------------------------------------------------------
def word_probability(text: str) -> list[float]:
    """A sensible teacher for the synthetic reviews: P(positive) from the sentiment words it sees."""
    words = text.lower().split()
    pos, neg = sum(w in POSITIVE for w in words), sum(w in NEGATIVE for w in words)
    p = (pos + 0.5) / (pos + neg + 1.0)
    return [1 - p, p]


class FlakyTeacher:
    """/predict and /v2/models/<name>/infer on loopback (stdlib HTTP/1.1, one thread per connection).

    ``fail`` lists what the next requests get before normal answers: an HTTP status (503, 429, 401)
    or "close" (the connection is closed without an answer). ``fail_after`` makes every request after
    that many answered ones fail with 503 (a teacher that goes down in the middle of a run)."""

    def __init__(self, labels_only: bool = False, api_key: str | None = None):
        self.fail: list[int | str] = []
        self.fail_after: int | None = None
        self.labels_only, self.api_key = labels_only, api_key
        self.requests: list[tuple[float, str, int]] = []  # (monotonic time, path, texts)
        self.answered = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                return None

            def _send(self, status: int, body: dict, headers: dict | None = None):
                blob = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(blob)

            def do_GET(self):
                owner.requests.append((time.monotonic(), self.path, 0))
                self._send(200, {"name": "m", "parameters": {"labels": ",".join(LABELS)}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                v2 = self.path.startswith("/v2/")
                texts = body["inputs"][0]["data"] if v2 else body["texts"]
                with owner.lock:
                    owner.requests.append((time.monotonic(), self.path, len(texts)))
                    failure = owner.fail.pop(0) if owner.fail else None
                    if failure is None and owner.fail_after is not None and owner.answered >= owner.fail_after:
                        failure = 503
                if failure == "close":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if failure is not None:
                    self._send(int(failure), {"error": f"failing on purpose ({failure})"}, {"Retry-After": "0"})
                    return
                if owner.api_key and self.headers.get("Authorization") != f"Bearer {owner.api_key}":
                    self._send(401, {"error": "the API key is not valid."})
                    return
                with owner.lock:
                    owner.answered += 1
                probs = [word_probability(t) for t in texts]
                top = [LABELS[int(np.argmax(p))] for p in probs]
                if v2:
                    name = body.get("outputs", [{}])[0].get("name")
                    data = top if name == "label" else [x for p in probs for x in p]
                    shape = [len(texts)] if name == "label" else [len(texts), 2]
                    self._send(200, {"model_name": "m", "outputs": [{"name": name, "shape": shape, "data": data}]})
                elif owner.labels_only:
                    self._send(200, {"predictions": [{"label": label} for label in top]})
                else:
                    self._send(200, {"predictions": [
                        {"label": label, "probabilities": dict(zip(LABELS, p, strict=True))}
                        for label, p in zip(top, probs, strict=True)]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def texts_asked(self, prefix: str = "/") -> int:
        return sum(n for _, path, n in self.requests if path.startswith(prefix))


@pytest.fixture
def flaky():
    servers = []

    def start(**kw) -> FlakyTeacher:
        srv = FlakyTeacher(**kw)
        srv.thread.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.server.shutdown()
        srv.server.server_close()


def edgekd_box(url: str, cfg: TeacherClientConfig = FAST, **kw):
    return open_black_box(TeacherEndpoint(kind="edgekd", url=url, **kw), LABELS, "teacher", cfg)


# --- the real edgekd server -------------------------------------------------------------------------------------
class Uvicorn:
    """uvicorn on a free loopback port in a thread, counting the requests the app receives."""

    def __init__(self, app):
        import uvicorn

        self.paths: list[str] = []

        @app.middleware("http")
        async def count(request, call_next):
            self.paths.append(request.url.path)
            return await call_next(request)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def exported_teacher(tmp_path_factory, tiny_classifier_dir) -> Path:
    """The tiny classifier exported to ONNX by the project's exporter (parity checked)."""
    from edgekd.teachers import export_classifier

    rec = export_classifier(tiny_classifier_dir, tmp_path_factory.mktemp("teacher-export"),
                            ["a good film", "the plot was dull", "fine", "boring and bland"], [1, 0, 1, 0],
                            max_length=16)
    assert rec["parity"]["top1_agreement"] == 1.0
    return Path(rec["folder"])


@pytest.fixture(scope="module")
def edgekd_server(exported_teacher):
    from edgekd.serving import ServeSettings, create_app

    srv = Uvicorn(create_app(ServeSettings(export_dir=exported_teacher, model_name="tiny-teacher")))
    yield srv
    srv.stop()


@pytest.mark.slow  # the ONNX export of the served model takes ~10 s
def test_edgekd_v2_and_onnx_teachers_agree_with_the_model(edgekd_server, exported_teacher, tiny_classifier_dir, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a good film", "the plot was dull", "fine", "boring and bland", "it was not very good"]
    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    with torch.no_grad():
        want = softmax(np.stack([model(**tok([t], return_tensors="pt")).logits[0].numpy() for t in texts]))

    over_http = np.array(edgekd_box(edgekd_server.url).ask(texts))
    v2 = open_black_box(TeacherEndpoint(kind="v2", url=edgekd_server.url, model_name="tiny-teacher"), LABELS,
                        "teacher", FAST)
    v2_logits = open_black_box(TeacherEndpoint(kind="v2", url=edgekd_server.url, model_name="tiny-teacher",
                                               targets="logits"), LABELS, "teacher", FAST)
    onnx = open_black_box(TeacherEndpoint(kind="onnx", path=str(exported_teacher)), LABELS, "teacher", FAST)
    np.testing.assert_allclose(over_http, want, atol=1e-5)
    np.testing.assert_allclose(np.array(v2.ask(texts)), want, atol=1e-5)
    np.testing.assert_allclose(softmax(np.array(v2_logits.ask(texts))), want, atol=1e-5)
    np.testing.assert_allclose(np.array(onnx.ask(texts)), want, atol=1e-5)
    # v2 read the label order from the model's metadata once, then only inferred
    assert edgekd_server.paths.count("/v2/models/tiny-teacher") == 2
    labels_box = edgekd_box(edgekd_server.url, targets="labels")
    assert labels_box.ask(texts) == want.argmax(axis=1).tolist()


@pytest.mark.slow  # the ONNX export of the tiny teacher takes ~10 s (shared with the tests above)
def test_a_dynamic_int8_onnx_teacher_answers_each_text_as_it_is_served(exported_teacher, tmp_path):
    """ONNX Runtime's dynamic int8 takes one activation scale per call, padding included: a whole batch in one
    call gave each text an answer that depended on its neighbours. Each text now runs alone at its own length."""
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgekd.runfolder import sha256_file

    folder = tmp_path / "onnx-int8"
    shutil.copytree(exported_teacher, folder)
    meta = json.loads((folder / "artifact.json").read_text())
    quantize_dynamic(str(exported_teacher / meta["file"]), str(folder / meta["file"]), weight_type=QuantType.QInt8)
    meta.update(precision="int8-dynamic", sha256=sha256_file(folder / meta["file"]))
    (folder / "artifact.json").write_text(json.dumps(meta))
    box = open_black_box(TeacherEndpoint(kind="onnx", path=str(folder), targets="logits"), LABELS, "teacher", FAST)
    texts = ["good", "the plot was dull and the film far too long for anyone", "fine film", "bland"]
    alone = np.array([box.ask([t])[0] for t in texts])
    np.testing.assert_array_equal(np.array(box.ask(texts)), alone)
    # what one call over the padded batch gives instead
    together = box.runner.run(box.codec.pad(box.codec.encode(texts)))[box.output]
    assert np.abs(together - alone).max() > 1e-6


@pytest.mark.slow  # the ONNX export of the served model takes ~10 s
def test_refusals_fail_at_once_with_the_servers_reason(edgekd_server):
    box = open_black_box(TeacherEndpoint(kind="v2", url=edgekd_server.url, model_name="nope"), LABELS, "teacher", FAST)
    before = len(edgekd_server.paths)
    with pytest.raises(TeacherRequestError, match="404: unknown model 'nope'"):
        box.ask(["good"])
    assert len(edgekd_server.paths) == before + 1  # a 404 is not retried
    # a batch over the server's limit (64 texts by default) is refused with the key to change
    box = edgekd_box(edgekd_server.url)
    with pytest.raises(TeacherRequestError, match="422: 70 texts in one request.*teacher.client.batch_size"):
        box.ask(["good"] * 70)
    assert box.stats()["requests"] == 1


# --- retries, cache, rate limit, keys, labels -------------------------------------------------------------------
@pytest.mark.parametrize("failure", [503, 429, "close"])
def test_requests_are_retried_after_failures_and_drops(flaky, failure):
    srv = flaky()
    srv.fail = [failure, failure]
    box = edgekd_box(srv.url)
    got = box.ask(["good film", "awful plot"])
    assert len(srv.requests) == 3  # two failures, then the answer
    np.testing.assert_allclose(got, [word_probability("good film"), word_probability("awful plot")])
    stats = box.stats()
    assert stats["requests"] == 3 and stats["retries"] == 2 and len(stats["retry_reasons"]) == 2


def test_retries_are_bounded_and_backoff_doubles(flaky):
    srv = flaky()
    srv.fail = [503] * 10
    waits = []
    cfg = TeacherClientConfig(max_attempts=4, backoff_s=0.5, max_backoff_s=1.5)
    box = open_black_box(TeacherEndpoint(kind="edgekd", url=srv.url), LABELS, "teacher", cfg, sleep=waits.append)
    with pytest.raises(TeacherRequestError, match="failed 4 times"):
        box.ask(["good"])
    assert len(srv.requests) == 4
    assert waits == [0.0, 0.0, 0.0]  # the server said Retry-After: 0
    srv.requests.clear()
    srv.fail = ["close"] * 10
    waits.clear()
    with pytest.raises(TeacherRequestError, match="failed 4 times"):
        box.ask(["good"])
    assert waits == [0.5, 1.0, 1.5]  # doubled each time, capped by max_backoff_s


def test_cached_texts_are_never_asked_again_even_after_an_interrupted_run(flaky, tmp_path):
    srv = flaky()
    texts = [f"good film number {i}" if i % 2 else f"dull plot {i}" for i in range(10)]
    identity = edgekd_box(srv.url).identity
    # the teacher goes down after two answered batches: the run fails, the answers so far are kept
    srv.fail_after = 2
    cfg = TeacherClientConfig(max_attempts=2, backoff_s=0.0)
    with pytest.raises(TeacherRequestError):
        ask_all(edgekd_box(srv.url, cfg), texts, AnswerCache(tmp_path, identity), batch_size=3)
    assert len(AnswerCache(tmp_path, identity)) == 6
    # it is back: a new run (a new process: a fresh cache object) asks only for the 4 texts left
    srv.fail_after = None
    srv.requests.clear()
    got = ask_all(edgekd_box(srv.url), texts + texts[:2], AnswerCache(tmp_path, identity), batch_size=3)
    assert srv.texts_asked() == 4 and got.asked == 4 and got.from_cache == 6
    np.testing.assert_allclose(got.outputs, [word_probability(t) for t in texts + texts[:2]])
    # and a third run asks nothing at all
    srv.requests.clear()
    again = ask_all(edgekd_box(srv.url), texts, AnswerCache(tmp_path, identity), batch_size=3)
    assert srv.requests == [] and again.asked == 0
    np.testing.assert_allclose(again.outputs, got.outputs[:10])


def test_requests_are_rate_limited(flaky, tmp_path):
    srv = flaky()
    cfg = TeacherClientConfig(requests_per_second=20)
    box = edgekd_box(srv.url, cfg)
    ask_all(box, [f"text {i}" for i in range(6)], AnswerCache(tmp_path, box.identity), batch_size=1)
    starts = [t for t, _, _ in srv.requests]
    assert len(starts) == 6
    # 1/20 s apart when sent; arrival times jitter on a busy machine, so the server checks the span
    assert starts[-1] - starts[0] >= 0.2


def test_api_key_comes_from_the_environment_variable_the_recipe_names(flaky, monkeypatch):
    srv = flaky(api_key="s3cret")
    with pytest.raises(RecipeError, match="EDGEKD_TEST_TEACHER_KEY is not set"):
        edgekd_box(srv.url, api_key_env="EDGEKD_TEST_TEACHER_KEY")
    monkeypatch.setenv("EDGEKD_TEST_TEACHER_KEY", "wrong")
    with pytest.raises(TeacherRequestError, match="401: the API key is not valid"):
        edgekd_box(srv.url, api_key_env="EDGEKD_TEST_TEACHER_KEY").ask(["good"])
    assert len(srv.requests) == 1  # a refused key is not retried
    monkeypatch.setenv("EDGEKD_TEST_TEACHER_KEY", "s3cret")
    assert edgekd_box(srv.url, api_key_env="EDGEKD_TEST_TEACHER_KEY").ask(["good"]) == [word_probability("good")]


def test_labels_only_endpoints(flaky):
    srv = flaky(labels_only=True)
    assert edgekd_box(srv.url, targets="labels").ask(["good good", "awful", "the plot"]) == [1, 0, 0]
    with pytest.raises(TeacherRequestError, match="without probabilities .* set teacher.targets to labels"):
        edgekd_box(srv.url).ask(["good"])  # asked for probabilities, the endpoint gives none
    v2 = open_black_box(TeacherEndpoint(kind="v2", url=srv.url, model_name="m", targets="labels"), LABELS,
                        "teacher", FAST)
    assert v2.ask(["good", "bad"]) == [1, 0]
    assert not any(path == "/v2/models/m" for _, path, _ in srv.requests)  # labels need no label order


# --- the pipeline end to end ------------------------------------------------------------------------------------
def blackbox_recipe(tmp_path, teacher_dir, csv_path, teacher: dict, **sections) -> dict:
    recipe = {
        "name": "bb",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": str(csv_path), "max_length": 16, "split": {"validation": 0.15, "test": 0.15, "seed": 1}},
        "teacher": {"model": str(teacher_dir), **teacher},
        "distill": {"alpha": 0.7, "temperature": 2.0, "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3}},
        "baseline": {"enabled": True},
        "runtime": {"precision": "fp32"},
    }
    recipe["distill"]["train"].update({"warmup_ratio": 0.0})
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


@pytest.mark.slow
def test_pipeline_with_an_edgekd_server_as_the_teacher(tmp_path, edgekd_server, exported_teacher, tiny_teacher_dir,
                                                       tiny_csv):
    """`edgekd run` with `teacher: {kind: edgekd, url: ...}` plus unlabelled texts: the teacher is asked once
    per distinct text over HTTP, the student is built from the local base model, eval scores the black box
    from its cached answers, and a second run asks nothing."""
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe
    from edgekd.testing import sentiment_rows

    extra = tmp_path / "unlabelled.txt"
    extra.write_text("\n".join(t for t, _ in sentiment_rows(60, seed=99)) + "\n")
    recipe = blackbox_recipe(tmp_path, tiny_teacher_dir, tiny_csv, {
        "kind": "edgekd", "url": edgekd_server.url, "client": {"batch_size": 16},
        "unlabelled": {"dataset": str(extra)}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    before = edgekd_server.paths.count("/predict")
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "bb"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert set(stages) == {"teacher", "distill", "baseline", "eval"}
    ctx = create_context(load_recipe(path))
    t = stages["teacher"]["metrics"]
    member = t["teachers"][0]
    n_rows = len(ctx.splits.train) + t["unlabelled"]["texts"]
    assert t["unlabelled"]["texts"] > 40 and t["cached_examples"] == n_rows
    assert len(np.load(run / "teacher" / "train_logits.npy")) == n_rows
    assert member["kind"] == "edgekd" and member["from_cache"] == 0
    # one request per 16 distinct texts (train, unlabelled, validation, test), all seen by the server
    assert member["requests"] == -(-member["asked"] // 16) == edgekd_server.paths.count("/predict") - before
    assert not (run / "teacher" / "model").exists()  # nothing of the black box is stored but its answers
    d = stages["distill"]["metrics"]
    assert d["train_examples"] == n_rows and d["layers_from_teacher"] == [0, 2]
    assert d["hard_teacher_targets"] is False
    ev = stages["eval"]["metrics"]
    assert ev["teacher"]["params"] is None and ev["student"]["layers"] == 2
    # the black box's test accuracy is what the ONNX export gives on the test texts
    onnx = open_black_box(TeacherEndpoint(kind="onnx", path=str(exported_teacher)), LABELS, "teacher", FAST)
    test_probs = np.array(onnx.ask(ctx.splits.texts("test")))
    assert ev["teacher"]["accuracy"] == pytest.approx(float((test_probs.argmax(1) == ctx.splits.labels("test")).mean()))
    assert "—" in res.output  # the teacher's size is unknown in the summary table

    # the teacher stage again (forced): every answer comes from the run folder's cache, no request is sent
    sent = edgekd_server.paths.count("/predict")
    res = CliRunner().invoke(app, ["teacher", str(path), "--force"])
    assert res.exit_code == 0, res.output
    assert edgekd_server.paths.count("/predict") == sent
    again = json.loads((run / "manifest.json").read_text())["stages"]["teacher"]["metrics"]["teachers"][0]
    assert again["asked"] == 0 and again["from_cache"] == member["asked"]


@pytest.mark.slow
def test_pipeline_with_a_labels_only_teacher_trains_on_its_labels(tmp_path, flaky, tiny_teacher_dir, tiny_csv):
    from edgekd.pipeline import run_stages

    srv = flaky(labels_only=True)
    recipe = parse_recipe(blackbox_recipe(tmp_path, tiny_teacher_dir, tiny_csv,
                                          {"kind": "edgekd", "url": srv.url, "targets": "labels"},
                                          baseline={"enabled": False}))
    ctx = run_stages(recipe, ["teacher", "distill", "eval"])
    t = ctx.run.stage_record("teacher")["metrics"]
    assert t["hard_targets"] is True
    d = ctx.run.stage_record("distill")["metrics"]
    assert d["hard_teacher_targets"] is True and "teacher_ce" in d["train_history"][0] and "kd" not in d["train_history"][0]
    # the teacher's labels are the word-count rule; its accuracy on validation is recorded
    val_texts = ctx.splits.texts("validation")
    want = np.mean([int(np.argmax(word_probability(x))) == y for x, y in zip(val_texts, ctx.splits.labels("validation"), strict=True)])
    assert t["validation"]["accuracy"] == pytest.approx(want)
    # hidden-state matching needs the teacher's states, which a black box does not have
    bad = parse_recipe(blackbox_recipe(tmp_path, tiny_teacher_dir, tiny_csv,
                                       {"kind": "edgekd", "url": srv.url, "targets": "labels"},
                                       distill={"hidden_weight": 1.0}, baseline={"enabled": False}))
    with pytest.raises(RecipeError, match="black-box teacher has no hidden states"):
        run_stages(bad, ["distill"])


# --- benchmarks/blackbox_vs_whitebox.py: its bookkeeping, without distilling ------------------------------------
@pytest.fixture
def bvw(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import blackbox_vs_whitebox

    return blackbox_vs_whitebox


def test_benchmark_shares_one_answer_cache_between_run_folders(bvw, tmp_path):
    identity = {"kind": "edgekd", "url": "http://127.0.0.1:1"}
    shared, run_a, run_b = tmp_path / "shared", tmp_path / "a", tmp_path / "b"
    AnswerCache(run_a, identity).add(["x", "y"], [[0.1, 0.9], [0.8, 0.2]])
    assert bvw.merge_cache(run_a, shared) == 2
    assert bvw.merge_cache(shared, run_b) == 2 and bvw.merge_cache(shared, run_b) == 0  # nothing twice
    b = AnswerCache(run_b, identity)
    assert "x" in b and b.get("y") == [0.8, 0.2]
    b.add(["z"], [[0.5, 0.5]])
    with open(b.path, "ab") as f:
        f.write(b'{"k":"cut sho')  # a crash mid-line: dropped, the rest merged
    assert bvw.merge_cache(run_b, shared) == 1 and bvw.cache_size(shared) == 3
    assert AnswerCache(shared, identity).get("z") == [0.5, 0.5]


def test_benchmark_augmented_variant_uses_teacher_augment_with_one_seed_for_every_run(bvw, tmp_path):
    from edgekd.recipe import Recipe

    recipe = Recipe()
    made = [bvw.variant_recipe(recipe, "blackbox-augmented", None, seed, tmp_path, "http://127.0.0.1:1", None, 2)
            for seed in (42, 43)]
    assert [r.seed for r in made] == [42, 43]
    assert {(r.teacher.augment.copies, r.teacher.augment.seed) for r in made} == {(2, bvw.AUGMENT_SEED)}
    plain = bvw.variant_recipe(recipe, "blackbox", None, 42, tmp_path, "http://127.0.0.1:1", None, 2)
    assert plain.teacher.augment.copies == 0 and plain.teacher.kind == "edgekd"


def test_benchmark_summary_pairs_the_differences_by_seed(bvw):
    def res(acc):
        return {"student_test_accuracy": acc, "student_agreement_with_teacher": 0.9, "teacher_test_accuracy": 0.84,
                "epochs": 3.0, "train_rows": 100}

    report = {"test_examples": 1000, "run_white_box": {"seed": 1, "teacher_test_accuracy": 0.84,
                                                       "student_test_accuracy": 0.83, "baseline_test_accuracy": None},
              "runs": {"whitebox": {"1": res(0.84), "2": res(0.82), "3": res(0.83)},
                       "blackbox-augmented@5ep": {"1": res(0.835), "2": res(0.81)}}}
    table = bvw.summarise(report)
    s = report["summary"]
    assert s["whitebox"]["student_test_accuracy_pct"]["mean"] == pytest.approx(83.0)
    assert s["whitebox"]["student_test_accuracy_pct"]["sd"] == pytest.approx(1.0)
    d = s["blackbox-augmented@5ep"]["difference_vs_whitebox_points"]
    assert d["per_seed"] == {1: -0.5, 2: -1.0} and d["mean"] == pytest.approx(-0.75) and d["within_1_point"] is True
    assert "5ep" in table and "-0.75 ± 0.35" in table
    assert report["teacher_traffic"]["texts_sent"] == 0  # no black-box figures of traffic in this report
    assert bvw.parse_variant("blackbox-augmented@5") == ("blackbox-augmented", 5.0)
