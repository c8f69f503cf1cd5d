"""The Python API: the README's example runs as written (on a tiny recipe), edgekd.distill teaches
the student it was asked for with the stage's loss, edgekd.load answers as POST /predict does, and
bad input is refused with what to change."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import edgekd
from edgekd.api import override_strings, texts_and_labels
from edgekd.errors import ArgumentError, DataError, EdgeKDError, RecipeError, StageError
from edgekd.testing import sentiment_rows, tiny_bert, tiny_recipe, write_sentiment_csv

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    marker = text.index("<!-- api-example:")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


def test_the_package_exports_the_api_lazily():
    import subprocess
    import sys

    code = ("import sys, edgekd; assert 'torch' not in sys.modules and 'edgekd.api' not in sys.modules; "
            "print(edgekd.run.__module__, edgekd.distill.__module__, edgekd.load.__module__, edgekd.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == ["edgekd.api"] * 3
    assert set(edgekd.__all__) >= {"run", "distill", "load"}
    with pytest.raises(AttributeError, match="no attribute 'rnu'"):
        edgekd.rnu  # noqa: B018


def test_overrides_become_the_set_strings_of_the_command_line():
    assert override_strings({"prune": {"keep_params": 0.4, "steps": 2}, "export.targets": ["onnx"],
                             "output_dir": Path("/tmp/x"), "name": "a b", "eval": {"ood_dataset": None}}) == [
        "prune.keep_params=0.4", "prune.steps=2", 'export.targets=["onnx"]', 'output_dir="/tmp/x"', 'name="a b"',
        "eval.ood_dataset=null"]
    with pytest.raises(RecipeError, match="prune: an empty mapping"):
        override_strings({"prune": {}})
    with pytest.raises(RecipeError, match="seed: object is not a recipe value"):
        override_strings({"seed": object()})


def test_run_refuses_a_wrong_key_before_anything_runs(tmp_path, tiny_teacher_dir):
    csv = write_sentiment_csv(tmp_path / "r.csv", n=40)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, tiny_teacher_dir, csv)))
    with pytest.raises(RecipeError, match=r"distill\.temprature: unknown key\. Did you mean 'temperature'"):
        edgekd.run(path, distill={"temprature": 4})
    with pytest.raises(RecipeError, match="stages: give a list"):
        edgekd.run(path, stages="distill")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # a tiny pipeline run (teacher, distill, prune, ONNX export, int8), then distill alone
def test_the_readme_example_runs(tmp_path, tiny_teacher_dir, monkeypatch):
    csv = write_sentiment_csv(tmp_path / "reviews.csv", n=200, seed=1)
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, csv,
                         teacher={"finetune": {"epochs": 2, "batch_size": 32, "lr": 3e-3}},
                         distill={"train": {"epochs": 1, "batch_size": 32, "lr": 2e-3}},
                         baseline={"enabled": False},
                         prune={"enabled": True, "keep_params": 0.6, "recover_epochs": 0.5},
                         export={"targets": ["onnx"]}, quantize={"enabled": True, "speed_runs": 5},
                         bench={"enabled": False})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = readme_example()
    # The one change: the built-in default (a 12-minute benchmark) becomes the tiny recipe.
    assert code.count('edgekd.run("default"') == 1
    code = code.replace('edgekd.run("default"', f'edgekd.run({str(path)!r}')
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)

    run, model, student = scope["run"], scope["model"], scope["student"]
    assert run.folder == tmp_path / "runs" / "tiny"
    saved = yaml.safe_load((run.folder / "recipe.yaml").read_text())
    assert saved["prune"]["keep_params"] == 0.4  # the override defined the run, as --set does
    record = json.loads((run.folder / "invocations.jsonl").read_text().splitlines()[-1])
    assert record["status"] == "ok" and record["overrides"] == ["prune.keep_params=0.4"]
    assert record["argv"][0] == "edgekd.run"
    assert run.manifest["stages"]["prune"]["metrics"]["target"] == {"keep_params": 0.4}

    # run.load() is what `edgekd serve RUN` would serve: the quantize stage's recommendation
    recommended = Path(run.metrics("quantize")["recommended_dir"]).name
    assert model.target == recommended and model.labels == ["negative", "positive"]
    lines = out.getvalue().splitlines()
    assert any(line.split()[0] in ("negative", "positive") for line in lines if line.strip())

    # edgekd.distill built the student it was asked for and saved it whole
    assert student.config.num_hidden_layers == 2
    assert (tmp_path / "my-student" / "config.json").is_file() and (tmp_path / "my-student" / "vocab.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # load().predict gives what POST /predict gives for the same texts
    from fastapi.testclient import TestClient

    from edgekd.serving import ServeSettings, create_app

    texts = ["a warm, funny film", "dull", "no spoilers: just go and see it"]
    mine = edgekd.load(run.folder, "onnx").predict(texts)
    with TestClient(create_app(ServeSettings(export_dir=run.folder / "export" / "onnx"))) as client:
        served = client.post("/predict", json={"texts": texts}).json()["predictions"]
    assert [p.label for p in mine] == [p["label"] for p in served]
    np.testing.assert_allclose([p.score for p in mine], [p["score"] for p in served], rtol=1e-6)
    with pytest.raises(DataError, match="text 1 is empty: give text to classify"):
        model.predict(["fine", "  "])
    with pytest.raises(DataError, match="no texts to classify"):
        model.predict([])
    with pytest.raises(TypeError, match="conf_threshold: text models take no options"):
        model.predict(["fine"], conf_threshold=0.5)
    assert repr(edgekd.load(run.folder / "export" / "onnx")).startswith("edgekd.Model('tiny', target='onnx', task='text-classification'")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny 4-layer BERT classifier (two labels named negative/positive) and its folder; its head is
    scaled up so that its answers are far from uniform (a random head's are nearly so)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = tiny_bert(tmp_path_factory.mktemp("api-teacher"), num_layers=4, num_labels=2, seed=5)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)
    model.save_pretrained(folder)
    return folder


def _kl_to_teacher(teacher, student, tok, texts, temperature):
    import torch

    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        t = torch.log_softmax(teacher(**enc).logits / temperature, -1)
        s = torch.log_softmax(student(**enc).logits / temperature, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.slow  # two short trainings of a tiny BERT
def test_distill_copies_the_asked_layers_and_moves_the_student_toward_the_teacher(classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgekd.students import build_student

    teacher = AutoModelForSequenceClassification.from_pretrained(classifier)
    tok = AutoTokenizer.from_pretrained(classifier)
    rows = sentiment_rows(96, seed=2)
    texts = [t for t, _ in rows]
    before = build_student(teacher, [1, 3])
    # The teacher's layers 1 and 3, block for block, before training moves them.
    for i, t in enumerate([1, 3]):
        for (name, p), (_, q) in zip(before.bert.encoder.layer[i].state_dict().items(),
                                     teacher.bert.encoder.layer[t].state_dict().items(), strict=True):
            assert torch.equal(p, q), name
    kl_before = _kl_to_teacher(teacher, before, tok, texts, 1.0)

    student = edgekd.distill(teacher, data=rows, tokenizer=tok, layers=[1, 3], alpha=1.0, temperature=1.0,
                             hidden_weight=1.0, train={"epochs": 4, "batch_size": 16, "lr": 3e-3}, seed=1)
    assert student.config.num_hidden_layers == 2 and not student.training
    kl_after = _kl_to_teacher(teacher, student, tok, texts, 1.0)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    # The same call gives the same student (seeded), and label names work like ids.
    again = edgekd.distill(str(classifier), data={"text": texts, "label": [["negative", "positive"][y] for _, y in rows]},
                           layers=[1, 3], alpha=1.0, temperature=1.0, hidden_weight=1.0,
                           train={"epochs": 4, "batch_size": 16, "lr": 3e-3}, seed=1)
    for (n, p), (_, q) in zip(student.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_distill_refuses_bad_input_with_what_to_change(classifier, tiny_teacher_dir):
    rows = [("good", 1), ("bad", 0)]
    with pytest.raises(RecipeError, match=r"distill\.temprature: unknown key\. Did you mean 'temperature'"):
        edgekd.distill(classifier, data=rows, temprature=4)
    with pytest.raises(RecipeError, match=r"distill\.train\.epochs: Input should be greater than 0"):
        edgekd.distill(classifier, data=rows, train={"epochs": 0})
    with pytest.raises(RecipeError, match="rounds"):
        edgekd.distill(classifier, data=rows, rounds=2)
    with pytest.raises(RecipeError, match=r"distill\.hidden_loss: the loss of hidden-state matching, and none is on"):
        edgekd.distill(classifier, data=rows, hidden_loss="mse")
    with pytest.raises(StageError, match="no sequence-classification head"):
        edgekd.distill(tiny_teacher_dir, data=rows)
    with pytest.raises(DataError, match="text 1 is empty"):
        edgekd.distill(classifier, data=[("good", 1), ("  ", 0)])
    with pytest.raises(DataError, match="label 0 is 'great', which the teacher does not know"):
        edgekd.distill(classifier, data=[("good", "great")])
    with pytest.raises(DataError, match="label 1 is 2, outside the teacher's 2 labels"):
        edgekd.distill(classifier, data=[("good", 1), ("bad", 2)])
    with pytest.raises(DataError, match="no training data"):
        edgekd.distill(classifier)
    with pytest.raises(RecipeError, match="leave it out when you give a student"):
        edgekd.distill(classifier, classifier, data=rows, layers=[0])


def test_data_forms_give_the_same_examples():
    want = (["a", "b"], [1, 0])
    label2id = {"negative": 0, "positive": 1}
    assert texts_and_labels((["a", "b"], [1, 0]), label2id, 2) == want
    assert texts_and_labels([("a", 1), ("b", 0)], label2id, 2) == want
    assert texts_and_labels({"text": ["a", "b"], "label": ["positive", "negative"]}, label2id, 2) == want
    assert texts_and_labels({"text": ["a", "b"], "label": np.array([1, 0])}, label2id, 2) == want
    with pytest.raises(DataError, match="no 'label' column; its columns: text, y"):
        texts_and_labels({"text": ["a"], "y": [1]}, label2id, 2)
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        texts_and_labels((["a", "b"], [1]), label2id, 2)
    with pytest.raises(DataError, match="label 0 is True"):
        texts_and_labels([("a", True)], label2id, 2)


def test_load_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        edgekd.load(tmp_path / "nowhere")
    with pytest.raises(StageError, match="holds no exported artifact"):
        edgekd.load(tmp_path)


# --- inputs refused or carried through as given ------------------------------------------------------


def test_keyword_overrides_read_back_as_the_values_given():
    from edgekd.recipe import load_recipe

    given = {"a": [Path("/tmp/x"), ("y", Path("z"))], "b": {"nested": [{"p": Path("q")}]},
             "c": "emoji 😀 and 東京", "d": "\u2028 \x85 \x7f \ud83d", "e": 1e-05, "f": float("inf"), "g": 3}
    sets = override_strings(given)
    # Paths anywhere become their strings; characters stay as they are, not as surrogate escapes.
    assert sets[0] == 'a=["/tmp/x", ["y", "z"]]' and sets[2] == 'c="emoji 😀 and 東京"'
    back = {s.split("=", 1)[0]: yaml.safe_load(s.split("=", 1)[1]) for s in sets}
    assert back == {"a": ["/tmp/x", ["y", "z"]], "b.nested": [{"p": "q"}], "c": "emoji 😀 and 東京",
                    "d": "\u2028 \x85 \x7f \ud83d", "e": 1e-05, "f": float("inf"), "g": 3}
    assert isinstance(back["e"], float)  # YAML 1.1 reads 1e-05 as a string
    # An empty mapping is a value (as --set export.options={} is); for a section it would set nothing.
    assert override_strings({"export": {"options": {}}}) == ["export.options={}"]
    assert load_recipe("default", override_strings({"export": {"options": {}}})).export.options == {}
    with pytest.raises(RecipeError, match=r"distill\.train: an empty mapping sets none of a recipe section's keys"):
        override_strings({"distill": {"train": {}}})
    with pytest.raises(RecipeError, match="a: object is not a recipe value"):
        override_strings({"a": [1, object()]})


def test_run_refuses_an_empty_stage_list_and_reads_a_generator_once(tmp_path, tiny_teacher_dir, monkeypatch):
    import edgekd.pipeline

    class Ran(Exception):
        pass

    def run_stages(recipe, stages, **kw):
        raise Ran(stages)

    monkeypatch.setattr(edgekd.pipeline, "run_stages", run_stages)  # what would run, without running it
    csv = write_sentiment_csv(tmp_path / "r.csv", n=40)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, tiny_teacher_dir, csv)))
    with pytest.raises(RecipeError, match="stages: an empty list runs nothing"):
        edgekd.run(path, stages=[])
    with pytest.raises(RecipeError, match="stages: an empty list runs nothing"):
        edgekd.api.run_recipe(str(path), stages=[])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(Ran) as ran:
        edgekd.run(path, stages=(s for s in ["distill"]))
    assert ran.value.args[0] == ["distill"]


def test_distill_refuses_a_precision_the_recipe_does_not_take(classifier):
    rows = [("good", 1), ("bad", 0)]
    with pytest.raises(RecipeError, match=r"precision: 'FP32' is not a training precision \(did you mean 'fp32'\?\); "
                                          r"give one of 'auto', 'fp32', 'bf16', 'fp16'"):
        edgekd.distill(classifier, data=rows, precision="FP32")
    with pytest.raises(RecipeError, match=r"'float32' is not a training precision \(did you mean 'fp32'\?\)"):
        edgekd.distill(classifier, data=rows, precision="float32")
    with pytest.raises(RecipeError, match=r"precision: 'int8' is not a training precision; give one of"):
        edgekd.distill(classifier, data=rows, precision="int8")


def _student(teacher, id2label, swap=False):
    """A student built from the teacher, its head's rows swapped (``swap``) and named ``id2label``."""
    import torch

    from edgekd.students import build_student

    student = build_student(teacher, [1, 3])
    if swap:
        with torch.no_grad():
            student.classifier.weight.copy_(student.classifier.weight.flip(0))
            student.classifier.bias.copy_(student.classifier.bias.flip(0))
    student.config.id2label = dict(enumerate(id2label))
    student.config.label2id = {v: k for k, v in student.config.id2label.items()}
    return student


@pytest.mark.slow  # three short trainings of a tiny BERT
def test_distill_lines_a_students_labels_up_with_the_teachers_by_name(classifier, tmp_path):
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    teacher = AutoModelForSequenceClassification.from_pretrained(classifier)
    tok = AutoTokenizer.from_pretrained(classifier)
    rows = sentiment_rows(32, seed=3)
    kw = {"data": rows, "tokenizer": tok, "seed": 1, "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the teacher's labels in its order: nothing to say
        plain = edgekd.distill(teacher, _student(teacher, ["negative", "positive"]), **kw)
    # The teacher's labels in another order: the rows are put in the teacher's order, by name, so the
    # student trains (and is saved) exactly as the one above.
    with pytest.warns(UserWarning, match=r"the student: its classification head lists the run's labels in another "
                                         r"order \['positive', 'negative'\]"):
        swapped = edgekd.distill(teacher, _student(teacher, ["positive", "negative"], swap=True),
                                 out_dir=tmp_path / "swapped", **kw)
    assert swapped.config.id2label == {0: "negative", 1: "positive"}
    assert AutoConfig.from_pretrained(tmp_path / "swapped").id2label == {0: "negative", 1: "positive"}
    for (n, p), (_, q) in zip(plain.state_dict().items(), swapped.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    # Numbered names only: read by position, said, and saved with the teacher's names.
    with pytest.warns(UserWarning, match="told apart by position only"):
        edgekd.distill(teacher, _student(teacher, ["LABEL_0", "LABEL_1"]), out_dir=tmp_path / "numbered", **kw)
    assert AutoConfig.from_pretrained(tmp_path / "numbered").id2label == {0: "negative", 1: "positive"}


def test_distill_refuses_a_student_for_other_labels(classifier):
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(classifier)
    rows = [("good", 1), ("bad", 0)]
    student = _student(teacher, ["cat", "dog"])
    with pytest.raises(StageError, match=r"the student's labels \['cat', 'dog'\] are not the teacher's "
                                         r"\['negative', 'positive'\]: no name matches up"):
        edgekd.distill(teacher, student, data=rows, train={"epochs": 1})
    assert student.config.id2label == {0: "cat", 1: "dog"}  # refused before anything changed
    with pytest.raises(StageError, match=r"the student is a BertModel, not a sequence classifier"):
        edgekd.distill(teacher, student.bert, data=rows, train={"epochs": 1})


def test_predict_refuses_what_is_not_a_text_or_an_image_saying_what_to_give():
    from types import SimpleNamespace

    from edgekd.tasks.detection.serve import predict_local as detect
    from edgekd.tasks.text.serve import predict_local as classify

    for given, name in [(None, "NoneType"), (42, "int"), ({"text": "a"}, "dict")]:
        with pytest.raises(DataError, match=rf"predict takes a text \(a string\) or a list of texts \(strings\), "
                                            rf"not {name}\."):
            classify(None, None, given, 8, {})
        with pytest.raises(DataError, match=rf"predict takes an image \(a file path, bytes, a PIL image or an H x W x 3 "
                                            rf"RGB uint8 array\) or a list of images, not {name}\."):
            detect(SimpleNamespace(default_options={}), None, given, 8, {})
    with pytest.raises(DataError, match=r"not bytes: decode bytes to a string first"):
        classify(None, None, b"great film", 8, {})
    with pytest.raises(DataError, match=r"image 0 is an array of shape \[4, 4\] and dtype uint8: give H x W x 3"):
        detect(SimpleNamespace(default_options={}), None, np.zeros((4, 4), np.uint8), 8, {})


# --- audit fixes: precision, out_dir, tokenizer, max_length, argument errors, force, teacher mode ------------------

FAST = {"train": {"epochs": 1, "batch_size": 8, "lr": 3e-3}}


def _spy_training(monkeypatch) -> list:
    """Replace the training loop by a spy (the refusals below come before it), returning its calls."""
    import edgekd.train

    calls: list = []
    monkeypatch.setattr(edgekd.train, "train", lambda *a, **k: calls.append(k))
    return calls


def _precisions_trained(monkeypatch) -> list[str]:
    """The mixed precision of every Accelerator the training loop makes, as it makes it."""
    import edgekd.train

    made: list[str] = []
    real = edgekd.train.make_accelerator

    def spy(precision, grad_accum=1):
        accelerator = real(precision, grad_accum)
        made.append(accelerator.mixed_precision)
        return accelerator

    monkeypatch.setattr(edgekd.train, "make_accelerator", spy)
    return made


@pytest.mark.slow  # two short trainings of a tiny BERT
def test_distill_trains_at_one_precision_then_another_in_one_process(classifier, monkeypatch):
    """Accelerate's state is a process-wide singleton that refuses another mixed precision ("restart your
    runtime"): a bf16 call after an fp32 one (or after `edgekd.run` with precision auto on a bf16 machine)
    crashed. In a process of its own, each call trains at its own precision."""
    made = _precisions_trained(monkeypatch)
    rows = sentiment_rows(16, seed=3)
    edgekd.distill(classifier, data=rows, precision="fp32", **FAST)
    edgekd.distill(classifier, data=rows, precision="bf16", **FAST)  # bf16 autocast runs on CPU in torch
    edgekd.distill(classifier, data=rows, precision="fp32", **FAST)
    assert made == ["no", "bf16", "no"]


def test_a_distributed_launch_refuses_another_precision_naming_both(monkeypatch):
    """Under a distributed launch the processes' Accelerate state is not torn down: another precision is an
    error naming both, not Accelerate's "restart your runtime"."""
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState

    import edgekd.train

    edgekd.train.make_accelerator("bf16")  # a first training of this process, at bf16
    try:
        launch = SimpleNamespace(use_distributed=True, num_processes=2)
        monkeypatch.setattr(edgekd.train, "init_process_state", lambda: launch)
        with pytest.raises(StageError, match=r"precision 'fp32' trains in Accelerate's mixed precision 'no', but this "
                                             r"distributed launch \(2 processes\) has already trained in 'bf16' "
                                             r"\(precision 'bf16'\).*give precision 'bf16'"):
            edgekd.train.make_accelerator("fp32")
        assert edgekd.train.make_accelerator("bf16").mixed_precision == "bf16"  # the launch's own precision trains
    finally:
        AcceleratorState._reset_state()


def test_accelerate_launch_mixed_precision_is_taken_by_auto_and_a_clash_is_an_error(monkeypatch):
    """`accelerate launch --mixed_precision bf16` with a recipe precision of fp32 trained in fp32: Accelerate lets
    the Accelerator's argument win over the launch's silently. `auto` now takes the launch's; another precision
    is an error naming both."""
    import edgekd.train

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert edgekd.train.resolve_precision("auto") == "bf16" == edgekd.train.resolve_precision("bf16")
    with pytest.raises(StageError, match=r"precision 'fp32' trains in Accelerate's mixed precision 'no', but "
                                         r"ACCELERATE_MIXED_PRECISION is 'bf16' \(accelerate launch --mixed_precision, "
                                         r"or its config\): give precision 'bf16' .*, or 'auto' to take the launch's; "
                                         r"or launch with --mixed_precision no"):
        edgekd.train.make_accelerator("fp32")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # a launch's default: auto trains in fp32 as launched
    monkeypatch.setattr(edgekd.train, "cpu_has_fast_bf16", lambda: True)
    assert edgekd.train.resolve_precision("auto") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(StageError, match=r"ACCELERATE_MIXED_PRECISION is 'fp8' .*edgekd trains in no, bf16 or fp16"):
        edgekd.train.resolve_precision("auto")


def test_a_real_accelerate_launch_sets_what_resolve_precision_reads(tmp_path):
    """The variable is the one `accelerate launch --mixed_precision` sets (a one-process launch)."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text("import edgekd.train\nprint('auto ->', edgekd.train.resolve_precision('auto'))\n"
                      "try:\n    edgekd.train.resolve_precision('fp32')\nexcept Exception as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                          "--mixed_precision", "bf16", str(script)], capture_output=True, text=True, timeout=300,
                         env={**env, "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "auto -> bf16" in res.stdout
    assert "but ACCELERATE_MIXED_PRECISION is 'bf16'" in res.stdout, res.stdout


def test_a_deepspeed_launch_keeps_its_own_precision(monkeypatch):
    """Under DeepSpeed, Accelerate holds mixed precision "no" (DeepSpeed's config has the precision) and checks
    nothing: a second training at bf16 in the launch is not refused."""
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    import edgekd.train

    monkeypatch.setattr(AcceleratorState, "_shared_state",
                        {"_mixed_precision": "no", "distributed_type": DistributedType.DEEPSPEED})
    edgekd.train._accelerator_state_for("bf16", "bf16", SimpleNamespace(use_distributed=True, num_processes=2))
    monkeypatch.setattr(AcceleratorState, "_shared_state",
                        {"_mixed_precision": "no", "distributed_type": DistributedType.MULTI_CPU})
    with pytest.raises(StageError, match="has already trained in 'no'"):
        edgekd.train._accelerator_state_for("bf16", "bf16", SimpleNamespace(use_distributed=True, num_processes=2))


@pytest.mark.slow  # a tiny teacher fine-tune at bf16 through edgekd.run, then edgekd.distill at its default fp32
def test_the_readme_order_runs_with_a_bf16_pipeline_before_distill(tmp_path, tiny_teacher_dir, monkeypatch):
    """The README's order: edgekd.run (here precision bf16, what auto picks on a bf16 machine), then
    edgekd.distill at its default fp32, in one process."""
    made = _precisions_trained(monkeypatch)
    csv = write_sentiment_csv(tmp_path / "r.csv", n=60, seed=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, tiny_teacher_dir, csv, runtime={"precision": "bf16"},
                                               teacher={"finetune": {"epochs": 1, "batch_size": 16, "lr": 3e-3}})))
    run = edgekd.run(path, stages=["teacher"])
    student = edgekd.distill(run.folder / "teacher" / "model", data=sentiment_rows(16), layers=[0, 2], **FAST)
    assert student.config.num_hidden_layers == 2 and made == ["bf16", "no"]


def test_distill_refuses_an_out_dir_of_other_files_before_training(classifier, tmp_path, monkeypatch):
    """out_dir is replaced whole (written whole or not at all): a folder of the user's files would be deleted.
    Refused before training, as are '.' (found only after training before) and a file."""
    calls = _spy_training(monkeypatch)
    rows = [("good", 1), ("bad", 0)]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(EdgeKDError, match=r"out_dir: .*mine holds files and is not a saved model folder \(no "
                                          r"config\.json with its weights beside it\); saving would replace the whole "
                                          r"folder and delete them"):
        edgekd.distill(classifier, data=rows, out_dir=mine, **FAST)
    monkeypatch.chdir(mine)
    with pytest.raises(EdgeKDError, match=r"out_dir: '\.' is not a folder of its own .* name a new folder"):
        edgekd.distill(classifier, data=rows, out_dir=".", **FAST)
    with pytest.raises(EdgeKDError, match=r"out_dir: .*notes\.txt is a file"):
        edgekd.distill(classifier, data=rows, out_dir=mine / "notes.txt", **FAST)
    assert not calls and (mine / "notes.txt").read_text() == "keep me" and sorted(os.listdir(mine)) == ["notes.txt"]


def test_distill_replaces_a_model_folder_saved_before(classifier, tmp_path):
    rows = [("good film", 1), ("bad film", 0)]
    out = tmp_path / "student"
    edgekd.distill(classifier, data=rows, out_dir=out, **FAST)
    (out / "stale.txt").write_text("from before")
    edgekd.distill(classifier, data=rows, out_dir=out, **FAST)  # a saved model folder: replaced whole
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_distill_refuses_to_save_over_the_teachers_folder(classifier, tmp_path, monkeypatch):
    """The teacher's folder is a saved model folder, so out_dir=<it> was accepted and replaced by the student:
    the teacher was gone. Refused before training, the teacher given as its folder or as a model loaded from
    it; so is a folder holding the teacher's or the student's (its own folder is replaced, as documented)."""
    from transformers import AutoModelForSequenceClassification

    calls = _spy_training(monkeypatch)
    rows = [("good", 1), ("bad", 0)]
    before = sorted(os.listdir(classifier))
    for teacher in (classifier, AutoModelForSequenceClassification.from_pretrained(classifier)):
        with pytest.raises(ArgumentError, match=r"out_dir: .* is the teacher's folder \(.*\); saving the student "
                                                r"there would replace it: name another folder"):
            edgekd.distill(teacher, data=rows, out_dir=classifier, **FAST)
    with pytest.raises(ArgumentError, match=r"out_dir: .* holds the teacher's folder"):
        edgekd.distill(classifier, data=rows, out_dir=classifier.parent, **FAST)
    student = tiny_bert(tmp_path / "students" / "small", num_layers=2, num_labels=2)
    with pytest.raises(ArgumentError, match=r"out_dir: .*students holds the student's folder"):
        edgekd.distill(classifier, student, data=rows, out_dir=tmp_path / "students", **FAST)
    assert not calls and sorted(os.listdir(classifier)) == before


def test_distill_refuses_a_student_whose_tokenizer_gives_other_ids(classifier, tmp_path, monkeypatch):
    """The same vocabulary size, other ids (reversed): the pipeline refuses such a student.model; so does
    edgekd.distill, before training, with the pipeline's check."""
    calls = _spy_training(monkeypatch)
    student = tiny_bert(tmp_path / "student", num_layers=2, num_labels=2)
    lines = (student / "vocab.txt").read_text().split("\n")
    (student / "vocab.txt").write_text("\n".join(lines[:5] + lines[5:-1][::-1]) + "\n")
    (student / "tokenizer.json").unlink(missing_ok=True)
    with pytest.raises(StageError, match=r"student: the tokenizer of .* gives other token ids than the teacher's: "
                                         r"their vocabularies differ"):
        edgekd.distill(classifier, student, data=sentiment_rows(8), **FAST)
    assert not calls


def test_distill_refuses_a_student_object_whose_config_pads_with_another_id(classifier, tmp_path, monkeypatch):
    """A student built in code has no tokenizer here to compare ids with; only its vocabulary size was checked,
    so a student made for a tokenizer padding with id 1 (RoBERTa's) trained on BERT ids. Its config's padding
    id is now compared with the teacher tokenizer's; setting it as the message says lets it train."""
    from transformers import AutoModelForSequenceClassification

    calls = _spy_training(monkeypatch)
    student = AutoModelForSequenceClassification.from_pretrained(tiny_bert(tmp_path / "s", num_layers=2, num_labels=2))
    student.name_or_path = ""  # built in code: no folder of its own
    student.config.pad_token_id = 1
    with pytest.raises(StageError, match=r"student: its config's pad_token_id is 1, and the teacher's tokenizer pads "
                                         r"with id 0: .* set student\.config\.pad_token_id = 0"):
        edgekd.distill(classifier, student, data=sentiment_rows(8), **FAST)
    assert not calls
    student.config.pad_token_id = 0
    edgekd.distill(classifier, student, data=sentiment_rows(8), **FAST)
    assert calls


def test_distill_checks_max_length_up_front(classifier, monkeypatch):
    calls = _spy_training(monkeypatch)
    rows = [("good", 1), ("bad", 0)]
    with pytest.raises(ArgumentError, match=r"max_length: 512 tokens per text, and the teacher has positions for 128 "
                                            r"\(max_position_embeddings 128\): give max_length=128 or less"):
        edgekd.distill(classifier, data=rows, max_length=512, **FAST)
    with pytest.raises(ArgumentError, match=r"max_length: Input should be greater than or equal to 8 \(got 0\)"):
        edgekd.distill(classifier, data=rows, max_length=0, **FAST)
    with pytest.raises(ArgumentError, match=r"max_length: Input should be a valid integer \(got '64'\)"):
        edgekd.distill(classifier, data=rows, max_length="64", **FAST)
    assert not calls


def test_distill_says_what_was_wrong_with_its_arguments(classifier, tmp_path, monkeypatch):
    calls = _spy_training(monkeypatch)
    rows = [("good", 1), ("bad", 0)]
    with pytest.raises(StageError, match=r"teacher: the folder .*nowhere does not exist: give the folder a model was "
                                         r"saved to"):
        edgekd.distill(tmp_path / "nowhere", data=rows, **FAST)
    with pytest.raises(StageError, match=r"teacher: the folder .*nowhere does not exist"):
        edgekd.distill(str(tmp_path / "nowhere"), data=rows, **FAST)
    with pytest.raises(ArgumentError, match=r"batch_size: Input should be greater than or equal to 1 \(got 0\)"):
        edgekd.distill(classifier, data=rows, batch_size=0, **FAST)
    with pytest.raises(ArgumentError, match=r"seed: Input should be a valid integer \(got 'a'\)"):
        edgekd.distill(classifier, data=rows, seed="a", **FAST)
    assert not calls
    edgekd.distill(classifier, data=rows, seed=np.int64(3), batch_size=np.int64(2), **FAST)  # whole numbers too
    assert len(calls) == 1


def test_a_tuple_of_two_pairs_is_read_as_pairs_and_an_ambiguous_one_is_refused():
    label2id = {"negative": 0, "positive": 1}
    assert texts_and_labels((("good film", 1), ("bad film", 0)), label2id, 2) == (["good film", "bad film"], [1, 0])
    assert texts_and_labels((("good film", "positive"), ("bad film", "negative")), label2id, 2) == (
        ["good film", "bad film"], [1, 0])
    assert texts_and_labels((("good", "bad", "fine"), (1, 0, 1)), label2id, 2) == (["good", "bad", "fine"], [1, 0, 1])
    assert texts_and_labels((("good", "bad"), (1, 0)), label2id, 2) == (["good", "bad"], [1, 0])  # "bad" no label
    with pytest.raises(DataError, match=r"reads two ways: as \(texts, labels\) and as two \(text, label\) pairs"):
        texts_and_labels((("negative", "positive"), ("positive", "negative")), label2id, 2)


def test_run_records_force(tmp_path, tiny_teacher_dir, monkeypatch):
    """`edgekd run --force` shows in the record's argv; edgekd.run(force=True) recorded nothing of it."""
    import edgekd.pipeline

    def run_stages(recipe, stages, **kw):
        recipe.run_dir().mkdir(parents=True, exist_ok=True)
        raise RuntimeError("stopped here")

    monkeypatch.setattr(edgekd.pipeline, "run_stages", run_stages)
    csv = write_sentiment_csv(tmp_path / "r.csv", n=40)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, tiny_teacher_dir, csv)))
    for force in (True, False):
        with pytest.raises(RuntimeError, match="stopped here"):
            edgekd.run(path, stages=["distill"], force=force)
        record = json.loads((tmp_path / "runs" / "tiny" / "invocations.jsonl").read_text().splitlines()[-1])
        assert record["force"] is force and ("--force" in record["argv"]) is force


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_distill_hands_a_teacher_model_back_in_its_mode(classifier, mode):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = AutoModelForSequenceClassification.from_pretrained(classifier)
    getattr(teacher, mode)()
    teacher.bert.embeddings.dropout.eval()  # a mixed model: each module keeps its own flag
    before = {name: m.training for name, m in teacher.named_modules()}
    edgekd.distill(teacher, data=[("good film", 1), ("bad film", 0)], tokenizer=AutoTokenizer.from_pretrained(classifier),
                   **FAST)
    assert {name: m.training for name, m in teacher.named_modules()} == before
