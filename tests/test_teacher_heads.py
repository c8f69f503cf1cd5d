"""A saved classification head against the run's labels: the same labels in another order get their output
rows put in the run's order (every encoder family), numbered-only names are read by position and said so, a head
for other labels (other names, or another count) is refused with both label lists; the teacher stage and an
ensemble member of kind model get the same treatment."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from encoder_families import FAMILIES, batch, config

from edgekd.errors import RecipeError
from edgekd.tasks.text.task import TextClassificationTask

RUN = ["negative", "positive"]


def save_classifier(folder, family: str, id2label: dict[int, str], seed: int = 0):
    """A tiny random classifier of ``family`` whose config names its outputs ``id2label``."""
    from transformers import AutoModelForSequenceClassification

    cfg = config(family, 45)
    cfg.num_labels = len(id2label)
    cfg.id2label = dict(id2label)
    cfg.label2id = {v: k for k, v in id2label.items()}
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder)
    return folder


def raw_logits(folder, b):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def logits(model, b):
    with torch.no_grad():
        return model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_a_head_for_the_run_labels_in_another_order_is_reordered(family, tmp_path, caplog):
    """The audit's case: id2label {0: positive, 1: negative} in a run whose labels are [negative, positive]."""
    folder = save_classifier(tmp_path / family, family, {0: "positive", 1: "negative"})
    task = TextClassificationTask(RUN)
    assert task.has_task_head(folder)  # loaded as it is (reordered) and not fine-tuned
    with caplog.at_level(logging.WARNING, logger="edgekd"):
        model = task.load_model(folder)
    b = batch()
    torch.testing.assert_close(logits(model, b), raw_logits(folder, b)[:, [1, 0]], atol=1e-6, rtol=1e-5)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    assert "in another order ['positive', 'negative']" in caplog.text and "put in the run's order" in caplog.text


def test_a_reordered_head_of_three_labels_and_names_in_another_case(tmp_path):
    from transformers import AutoConfig

    from edgekd.tasks.text.task import match_head

    folder = save_classifier(tmp_path / "three", "bert", {0: "Sports", 1: "Politics", 2: "Tech"})
    task = TextClassificationTask(["politics", "sports", "tech"])
    assert match_head(AutoConfig.from_pretrained(folder), task.label_names).order == (1, 0, 2)
    model = task.load_model(folder)
    b = batch()
    torch.testing.assert_close(logits(model, b), raw_logits(folder, b)[:, [1, 0, 2]], atol=1e-6, rtol=1e-5)
    assert model.config.id2label == {0: "politics", 1: "sports", 2: "tech"}
    same = save_classifier(tmp_path / "same", "bert", {0: "NEGATIVE", 1: "POSITIVE"})
    torch.testing.assert_close(logits(TextClassificationTask(RUN).load_model(same), b), raw_logits(same, b))


@pytest.mark.parametrize(("head", "run"), [
    ({0: "LABEL_0", 1: "LABEL_1"}, RUN),  # transformers' default names: the outputs are only numbered
    ({0: "negative", 1: "positive"}, ["0", "1"]),  # a dataset with integer labels
])
def test_numbered_labels_are_read_by_position_and_said(tmp_path, caplog, head, run):
    folder = save_classifier(tmp_path / "m", "bert", head)
    task = TextClassificationTask(run)
    assert task.has_task_head(folder)
    with caplog.at_level(logging.WARNING, logger="edgekd"):
        model = task.load_model(folder)
    b = batch()
    torch.testing.assert_close(logits(model, b), raw_logits(folder, b))
    assert model.config.id2label == dict(enumerate(run))
    assert "by position only" in caplog.text and str(list(head.values())) in caplog.text


def test_a_head_for_other_label_names_is_refused_naming_both_lists(tmp_path):
    folder = save_classifier(tmp_path / "m", "roberta", {0: "sports", 1: "politics"})
    with pytest.raises(RecipeError) as e:
        TextClassificationTask(RUN).load_model(folder)
    msg = str(e.value)
    assert "['sports', 'politics']" in msg and "['negative', 'positive']" in msg
    assert "set id2label in its config.json" in msg and "without its head" in msg


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "deberta-v3", "modernbert"])
def test_a_head_for_another_number_of_labels_is_refused_up_front(family, tmp_path):
    """It failed with transformers' raw 'size mismatch' RuntimeError while loading."""
    folder = save_classifier(tmp_path / family, family, {0: "a", 1: "b", 2: "c"})
    task = TextClassificationTask(RUN)
    assert not task.has_task_head(folder)
    with pytest.raises(RecipeError, match=r"its classification head is for 3 labels \['a', 'b', 'c'\], and this "
                                          r"run's data has 2 \['negative', 'positive'\]"):
        task.load_model(folder)


def _swap_labels_in_config(folder):
    """The same weights, but a config that says output 0 is 'positive' (so its outputs are the other way round)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["id2label"] = {"0": "positive", "1": "negative"}
    cfg["label2id"] = {"positive": 0, "negative": 1}
    path.write_text(json.dumps(cfg))
    return folder


@pytest.mark.slow
def test_teacher_stage_and_ensemble_member_put_swapped_heads_in_the_data_order(tmp_path, tiny_csv):
    """A local teacher and a kind-model ensemble member whose heads list [positive, negative]: the cached targets
    are their outputs in the data's order [negative, positive], and the saved teacher names the data's labels."""
    from edgekd.pipeline import run_stages
    from edgekd.recipe import parse_recipe
    from edgekd.testing import classifier_probs as probs
    from edgekd.testing import tiny_bert, tiny_recipe

    teacher = _swap_labels_in_config(tiny_bert(tmp_path / "teacher", num_layers=2, num_labels=2, seed=1))
    member = _swap_labels_in_config(tiny_bert(tmp_path / "member", num_layers=2, num_labels=2, seed=2))
    recipe = parse_recipe(tiny_recipe(tmp_path, teacher, tiny_csv,
                                      teacher={"ensemble": [{"kind": "model", "model": str(member)}]}))
    ctx = run_stages(recipe, ["teacher"])
    assert ctx.examples.label_names == RUN

    texts = ctx.splits.texts("train")
    want = np.log((probs(teacher, texts) + probs(member, texts)) / 2)[:, [1, 0]]
    np.testing.assert_allclose(np.load(ctx.run.stage_dir("teacher") / "train_logits.npy"), want, atol=1e-4)
    saved = json.loads((ctx.model_dir("teacher") / "config.json").read_text())
    assert saved["id2label"] == {"0": "negative", "1": "positive"}
    assert ctx.run.stage_record("teacher")["metrics"]["finetuned"] is False


def test_an_ensemble_member_for_other_labels_is_refused(tmp_path, tiny_classifier_dir, tiny_csv):
    from edgekd.pipeline import run_stages
    from edgekd.recipe import parse_recipe
    from edgekd.testing import tiny_bert, tiny_recipe

    three = tiny_bert(tmp_path / "three", num_layers=1, num_labels=3)
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv, teacher={
        "ensemble": [{"kind": "model", "model": str(three)}]}))
    with pytest.raises(RecipeError, match=r"teacher.ensemble\[0\].model: .*its classification head is for 3 labels "
                                          r"\['label_0', 'label_1', 'label_2'\].*must already be fine-tuned"):
        run_stages(recipe, ["teacher"])


def test_stages_made_before_heads_were_reordered_are_redone(tmp_path, tiny_csv, monkeypatch):
    """A teacher, ensemble member or student.model whose head lists the run's labels in another order was used
    as it was before 2026-12-07: the teacher and distill fingerprints mark such a model, so a record made then
    is redone; a model whose head is in the run's order keeps its fingerprints."""
    import edgekd.tasks.text.task as text_task
    from edgekd.pipeline import create_context, fingerprint_of
    from edgekd.recipe import parse_recipe
    from edgekd.testing import tiny_bert, tiny_recipe

    swapped = _swap_labels_in_config(tiny_bert(tmp_path / "swapped", num_layers=2, num_labels=2, seed=1))
    plain = tiny_bert(tmp_path / "plain", num_layers=2, num_labels=2, seed=2)

    def fingerprints(model, **sections):
        ctx = create_context(parse_recipe(tiny_recipe(tmp_path, model, tiny_csv, **sections)))
        return {name: fingerprint_of(ctx, name) for name in ("teacher", "distill")}

    cases = [(swapped, {}), (plain, {"teacher": {"ensemble": [{"kind": "model", "model": str(swapped)}]}}),
             (plain, {"student": {"model": str(swapped)}})]
    marked = [fingerprints(t, **s) for t, s in cases]
    untouched = fingerprints(plain)
    monkeypatch.setattr(text_task, "head_reordered", lambda *a: False)  # as the code before the change saw them
    unmarked = [fingerprints(t, **s) for t, s in cases]
    assert fingerprints(plain) == untouched
    assert marked[0]["teacher"] != unmarked[0]["teacher"] and marked[0]["distill"] != unmarked[0]["distill"]
    assert marked[1]["teacher"] != unmarked[1]["teacher"]
    assert marked[2]["teacher"] == unmarked[2]["teacher"] and marked[2]["distill"] != unmarked[2]["distill"]
