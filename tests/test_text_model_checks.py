"""What the models' own files allow, checked before anything trains: data.max_length against each model's
positions (RoBERTa-style ids start after the padding id; rotary and relative-only positions have no bound;
nothing is downloaded to check), and a student.model whose tokenizer gives other ids than the teacher's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from encoder_families import config

from edgekd.errors import RecipeError
from edgekd.recipe import parse_recipe
from edgekd.recipe_check import check_inputs
from edgekd.tasks.text.task import TextClassificationTask
from edgekd.testing import tiny_bert, tiny_recipe


def problems(tmp_path, teacher_dir, csv, **sections) -> list[str]:
    return check_inputs(parse_recipe(tiny_recipe(tmp_path, teacher_dir, csv, **sections)))


def test_max_length_over_the_teachers_positions_is_refused_up_front(tmp_path, tiny_classifier_dir, tiny_csv):
    """A max_length of 300 on a 128-position model failed mid-training (an index error in the embeddings)."""
    found = problems(tmp_path, tiny_classifier_dir, tiny_csv, data={"max_length": 300})
    assert [p for p in found if p.startswith("data.max_length")] == [
        f"data.max_length: 300 tokens per text, and teacher.model ({tiny_classifier_dir}) has positions for 128 "
        "(max_position_embeddings 128): set data.max_length to 128 or less"]
    assert not [p for p in problems(tmp_path, tiny_classifier_dir, tiny_csv, data={"max_length": 128})
                if p.startswith("data.max_length")]


def test_the_student_and_ensemble_models_are_checked_too(tmp_path, tiny_classifier_dir, tiny_csv):
    short = tiny_bert(tmp_path / "short", num_layers=1, num_labels=2)
    cfg = (short / "config.json").read_text().replace('"max_position_embeddings": 128', '"max_position_embeddings": 64')
    (short / "config.json").write_text(cfg)
    found = problems(tmp_path, tiny_classifier_dir, tiny_csv, data={"max_length": 100},
                     student={"model": str(short)}, teacher={"ensemble": [{"kind": "model", "model": str(short)}]})
    found = [p for p in found if p.startswith("data.max_length")]
    assert len(found) == 1 and f"teacher.ensemble[0].model ({short}) has positions for 64" in found[0]
    found = problems(tmp_path, tiny_classifier_dir, tiny_csv, data={"max_length": 100}, student={"model": str(short)})
    assert [p for p in found if "student.model" in p and "positions for 64" in p]


def test_roberta_positions_start_after_the_padding_id(tmp_path, tiny_csv):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=45, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=130, pad_token_id=1, type_vocab_size=1, num_labels=2)
    cfg.id2label, cfg.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    model = RobertaForSequenceClassification(cfg).eval()
    folder = tmp_path / "roberta"
    model.save_pretrained(folder)
    # what the check says is what the model does: 128 tokens run, 129 do not
    with torch.no_grad():
        model(input_ids=torch.full((1, 128), 5))
        with pytest.raises(IndexError):
            model(input_ids=torch.full((1, 129), 5))
    from edgekd.tasks.text.task import max_tokens

    assert max_tokens(cfg)[0] == 128
    found = [p for p in problems(tmp_path, folder, tiny_csv, data={"max_length": 129}) if p.startswith("data.max")]
    assert len(found) == 1 and "has positions for 128 (max_position_embeddings 130, of which the first 2 are never " \
                               "used: roberta numbers positions from its padding id 1 + 1)" in found[0]
    assert not [p for p in problems(tmp_path, folder, tiny_csv, data={"max_length": 128}) if p.startswith("data.max")]
    # the stage that loads it refuses it too (a model the check could not read here)
    with pytest.raises(RecipeError, match="data.max_length: 129 tokens per text"):
        TextClassificationTask(["negative", "positive"], max_length=129).load_model(folder)


def test_models_without_a_position_bound_are_not_refused():
    from edgekd.tasks.text.task import max_tokens

    assert max_tokens(SimpleNamespace(model_type="bert")) is None  # no max_position_embeddings key
    assert max_tokens(config("modernbert", 45)) is None  # rotary positions
    assert max_tokens(config("deberta-v3", 45)) is None  # relative positions only (position_biased_input false)
    biased = config("deberta-v2", 45)
    biased.position_biased_input = True
    assert max_tokens(biased) == (128, "max_position_embeddings 128")
    assert max_tokens(config("mpnet", 45))[0] == 126  # MPNet fixes padding_idx at 1, whatever pad_token_id says
    assert max_tokens(config("xlm-roberta", 45))[0] == 127  # pad_token_id 0 here: positions from 1


def test_a_model_not_on_this_machine_is_not_downloaded_to_check(tmp_path, tiny_csv, monkeypatch):
    from edgekd import assets

    def no_download(*a, **k):
        raise AssertionError("the recipe check downloaded a model")

    monkeypatch.setattr(assets, "fetch", no_download)
    monkeypatch.setattr(assets, "fetch_mirror", no_download)
    monkeypatch.setattr(assets, "download_wheel", no_download)
    for teacher in ("minilm-l6", "someone/not-in-the-local-cache"):
        recipe = tiny_recipe(tmp_path, "unused", tiny_csv, data={"max_length": 4096})
        recipe["teacher"] = {"model": teacher}
        assert not [p for p in check_inputs(parse_recipe(recipe)) if p.startswith("data.max_length")]


def _cased_student(folder):
    """A tiny student with the teacher's vocabulary whose tokenizer keeps case (so 'GREAT' is [UNK])."""
    from transformers import BertTokenizerFast

    tiny_bert(folder, num_layers=1, num_labels=2, seed=4)
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=False).save_pretrained(folder)
    return folder


def test_tokenizers_that_give_the_same_ids_agree_and_others_are_told_apart(tmp_path):
    from transformers import AutoTokenizer, BertTokenizerFast

    from edgekd.tasks.text.task import tokenizer_difference

    a = AutoTokenizer.from_pretrained(tiny_bert(tmp_path / "a", num_layers=1))
    b = AutoTokenizer.from_pretrained(tiny_bert(tmp_path / "b", num_layers=1, seed=5))
    assert tokenizer_difference(a, b, 64, ["a text"]) is None
    cased = AutoTokenizer.from_pretrained(_cased_student(tmp_path / "cased"))
    why = tokenizer_difference(a, cased, 64)
    assert why.startswith("they tokenize 'The movie was GREAT") and "normalised or split otherwise" in why
    vocab = (tmp_path / "a" / "vocab.txt").read_text().split()
    other = tmp_path / "other.txt"
    other.write_text("\n".join([*vocab[:-1], "zzzextra"]) + "\n")
    why = tokenizer_difference(a, BertTokenizerFast(vocab_file=str(other)), 64)
    assert why.startswith(f"their vocabularies differ ({len(vocab)} and {len(vocab)} tokens; 1 of the teacher's")


def test_a_student_model_with_another_tokenizer_is_refused_up_front(tmp_path, tiny_classifier_dir, tiny_csv):
    student = _cased_student(tmp_path / "cased")
    found = [p for p in problems(tmp_path, tiny_classifier_dir, tiny_csv, student={"model": str(student)})
             if p.startswith("student.model")]
    assert len(found) == 1
    assert f"the tokenizer of {student} gives other token ids than the teacher's ({tiny_classifier_dir})" in found[0]
    assert "eval, prune, export parity, quantization calibration" in found[0]
    same = tiny_bert(tmp_path / "same", num_layers=1, num_labels=2, seed=6)
    assert not [p for p in problems(tmp_path, tiny_classifier_dir, tiny_csv, student={"model": str(same)})
                if p.startswith("student.model")]


def test_the_distill_stage_refuses_it_before_training(tmp_path, tiny_classifier_dir, tiny_csv):
    """Where the check could not read the tokenizers (a hub id not cached yet), the distill stage refuses it."""
    from edgekd.pipeline import run_stages

    student = _cased_student(tmp_path / "cased")
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv, student={"model": str(student)}))
    with pytest.raises(RecipeError, match="student.model: the tokenizer of .* gives other token ids"):
        run_stages(recipe, ["teacher", "distill"])
    ctx_dir = tmp_path / "runs" / "tiny"
    assert not (ctx_dir / "distill" / "model").exists()


def test_a_targets_max_sequence_below_max_length_is_refused_up_front():
    """artifact.json records data.max_length, which the server and the bench tokenize to; a target exported for
    fewer tokens refused every longer text at request time (or failed its whole export at parity)."""
    from edgekd.recipe import load_recipe
    from edgekd.recipe_check import check_inputs

    short = load_recipe("default", ["export.options.executorch.max_sequence=32"])
    assert ("export.options.executorch.max_sequence: 32 tokens, shorter than data.max_length 64, which the server "
            "and the bench tokenize texts to: set it to 64 or more, or leave it out (it defaults to "
            "data.max_length)") in check_inputs(short)
    for fine in (["export.options.executorch.max_sequence=64"], ["export.options.coreml.max_sequence=128"], []):
        assert not [p for p in check_inputs(load_recipe("default", fine)) if "max_sequence" in p], fine
