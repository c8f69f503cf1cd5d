"""Vocabulary trimming: kept-token logits unchanged, removed tokens to [UNK], files consistent,
the folder reloads with standard tools; and a tiny pipeline run that trims, exports and benches."""

from __future__ import annotations

import json

import pytest
import torch

from edgekd.errors import StageError
from edgekd.pruning.vocab import FromTrimmedIds, domain_token_ids, original_ids, trim_vocabulary

TRAIN_TEXTS = ["the movie is good", "the plot was dull", "a fine film but not very warm", "good good fun"]


@pytest.fixture
def classifier(tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval(),
            AutoTokenizer.from_pretrained(tiny_classifier_dir))


def _keep(tok, texts=TRAIN_TEXTS, **kw):
    return domain_token_ids(tok(texts)["input_ids"], tok, **kw)


def test_kept_ids_are_the_training_tokens_and_every_special_token(classifier):
    _, tok = classifier
    keep = _keep(tok)
    words = {w for t in TRAIN_TEXTS for w in t.split()}
    assert set(tok.convert_ids_to_tokens(keep)) == words | set(tok.all_special_tokens)
    # min_count: "good" occurs 3 times, "the" twice, "movie" once.
    kept2 = set(tok.convert_ids_to_tokens(_keep(tok, min_count=2)))
    assert {"good", "the"} <= kept2 and "movie" not in kept2 and "[MASK]" in kept2


def test_keep_first_keeps_the_vocabularys_first_ids_but_not_its_placeholders(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "of",
             "film", "good", "dull", "plot", "warm"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    texts = ["good film", "dull plot"]
    only_train = set(tok.convert_ids_to_tokens(_keep(tok, texts=texts)))
    assert only_train == {"good", "film", "dull", "plot"} | set(tok.all_special_tokens)
    first = set(tok.convert_ids_to_tokens(_keep(tok, texts=texts, keep_first=10)))
    # ids 0-9 minus the two placeholders: "the", "a", "of" are kept although no training text has them.
    assert first == only_train | {"the", "a", "of"}
    assert "warm" not in first and not {"[unused0]", "[unused1]"} & first
    # A text word kept this way keeps its own token after trimming (not [UNK]).
    model_vocab = _keep(tok, texts=texts, keep_first=10)
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32)).eval()
    _, new_tok = trim_vocabulary(model, tok, model_vocab)
    assert new_tok.convert_ids_to_tokens(new_tok("the warm film")["input_ids"]) == [
        "[CLS]", "the", "[UNK]", "film", "[SEP]"]


def test_logits_of_kept_token_texts_equal_the_untrimmed_model(tiny_classifier_dir, classifier):
    from transformers import AutoModelForSequenceClassification

    model, tok = classifier
    trimmed, new_tok = trim_vocabulary(AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval(),
                                       tok, _keep(tok))
    assert trimmed.get_input_embeddings().num_embeddings == len(new_tok) == trimmed.config.vocab_size
    texts = ["the good film", "not very warm but fun", "the plot was good good"]  # kept tokens only
    a, b = tok(texts, padding=True, return_tensors="pt"), new_tok(texts, padding=True, return_tensors="pt")
    assert not torch.equal(a["input_ids"], b["input_ids"])  # the ids really were renumbered
    with torch.no_grad():
        want = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"]).logits
        got = trimmed(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The original-id wrapper (bench rows of unpruned models) agrees too.
    from edgekd.tasks.text.task import SequenceClassifierExport

    table = original_ids(new_tok, tok)
    assert torch.equal(table[b["input_ids"]], a["input_ids"])
    with torch.no_grad():
        (wrapped,) = FromTrimmedIds(SequenceClassifierExport(model), table)(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(wrapped, want, rtol=0, atol=0)


def test_removed_tokens_become_unk_and_special_ids_follow(classifier, tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification

    _, tok = classifier
    _, new_tok = trim_vocabulary(AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir), tok,
                                 _keep(tok))
    enc = new_tok("the awful boring movie")
    assert new_tok.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "the", "[UNK]", "[UNK]", "movie", "[SEP]"]
    for name in ("pad", "unk", "cls", "sep", "mask"):
        t = getattr(new_tok, f"{name}_token")
        assert getattr(new_tok, f"{name}_token_id") == new_tok.convert_tokens_to_ids(t) < len(new_tok)
    assert new_tok.pad_token_id == 0  # [PAD] stays first: the order of the kept tokens is the original one


def test_saved_folder_is_self_consistent_and_reloads_with_standard_tools(tmp_path, tiny_classifier_dir, classifier):
    from tokenizers import Tokenizer
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertTokenizer

    _, tok = classifier
    model, new_tok = trim_vocabulary(AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval(),
                                     tok, _keep(tok))
    model.save_pretrained(tmp_path)
    new_tok.save_pretrained(tmp_path)
    vocab_txt = (tmp_path / "vocab.txt").read_text().split("\n")[:-1]
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    assert tj["model"]["vocab"] == {t: i for i, t in enumerate(vocab_txt)}
    assert {a["content"]: a["id"] for a in tj["added_tokens"]} == {t: vocab_txt.index(t) for t in tok.all_special_tokens}
    assert tj["post_processor"]["special_tokens"]["[CLS]"]["ids"] == [vocab_txt.index("[CLS]")]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["vocab_size"] == len(vocab_txt) and cfg["pad_token_id"] == vocab_txt.index("[PAD]")

    text = "the good movie is awful"
    fast = AutoTokenizer.from_pretrained(tmp_path)
    ids = fast(text)["input_ids"]
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids == ids
    assert BertTokenizer(str(tmp_path / "vocab.txt"))(text)["input_ids"] == ids  # the slow one from vocab.txt
    base = AutoModel.from_pretrained(tmp_path)
    assert base.get_input_embeddings().num_embeddings == len(vocab_txt)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)


def test_a_tied_output_embedding_is_trimmed_with_the_input_one(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from edgekd.testing import tiny_bert

    d = tiny_bert(tmp_path / "t")
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=64)).eval()
    ref = BertForMaskedLM(mlm.config).eval()
    ref.load_state_dict(mlm.state_dict())
    keep = _keep(tok)
    trimmed, new_tok = trim_vocabulary(mlm, tok, keep)
    assert trimmed.get_output_embeddings().weight is trimmed.get_input_embeddings().weight
    a, b = tok("the good film", return_tensors="pt"), new_tok("the good film", return_tensors="pt")
    with torch.no_grad():
        want = ref(input_ids=a["input_ids"]).logits[..., keep]
        got = trimmed(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(got, want)


def test_keep_chars_and_unsupported_tokenizers(classifier, tiny_classifier_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    _, tok = classifier
    # The tiny vocabulary has the one-letter word "a": kept with keep_chars even if no text uses it.
    assert "a" in tok.convert_ids_to_tokens(_keep(tok, texts=["good"], keep_chars=True))
    assert "a" not in tok.convert_ids_to_tokens(_keep(tok, texts=["good"]))
    with pytest.raises(StageError, match="outside the tokenizer"):
        domain_token_ids([[0, 10_000]], tok)

    bpe = Tokenizer(models.BPE(vocab={"[UNK]": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")], unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir)
    with pytest.raises(StageError, match="WordPiece"):
        trim_vocabulary(model, fast, [0, 1])


def test_recipe_keys_are_checked():
    from edgekd.recipe import PruneConfig

    with pytest.raises(ValueError, match="prune.enabled is false"):
        PruneConfig(trim_vocab=True)
    with pytest.raises(ValueError, match="trim_vocab shrinks"):
        PruneConfig(enabled=True, method="channels", keep_params=0.5, trim_vocab=True)
    assert PruneConfig(enabled=True, trim_vocab=True).keep_params is None  # trimming alone is a valid stage
    # A key that shapes the trim is refused when nothing trims, never accepted and ignored.
    for key, value in (("vocab_keep_first", 10_000), ("vocab_min_count", 2), ("vocab_keep_chars", True)):
        with pytest.raises(ValueError, match=f"prune.{key} shape"):
            PruneConfig(enabled=True, keep_params=0.5, **{key: value})
        assert getattr(PruneConfig(enabled=True, keep_params=0.5, trim_vocab=True, **{key: value}), key) == value


@pytest.mark.slow
def test_tiny_run_trims_the_vocabulary_and_every_export_is_consistent(tmp_path, tiny_teacher_dir, tiny_csv,
                                                                       monkeypatch):
    import yaml
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    import edgekd.tasks.text.prune as text_prune
    from edgekd.cli import app

    # Every recovery trains the trimmed model on the trimmed tokenizer's ids.
    seen = []
    real_train = text_prune.train

    def spy(model, data, *a, **kw):
        seen.append((model.get_input_embeddings().num_embeddings, max(int(max(s)) for s in data.input_ids)))
        return real_train(model, data, *a, **kw)

    monkeypatch.setattr(text_prune, "train", spy)
    from edgekd.export.stage import load_artifact
    from edgekd.testing import tiny_recipe

    # The budget counts from the student before the trim, and keeping only tokens seen 40 times costs this tiny run
    # nearly half of its validation accuracy: a budget wide enough that a round is kept and the final recovery runs.
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, baseline={"enabled": False},
                         prune={"enabled": True, "max_accuracy_drop": 0.9, "steps": 2, "latency_step": 0.25,
                                "recover_epochs": 0.5, "recover_hidden_weight": 1.0, "final_recover_epochs": 0.5,
                                "trim_vocab": True, "vocab_min_count": 40},
                         export={"targets": ["onnx"], "parity_examples": 32},
                         quantize={"enabled": True, "method": "dynamic", "max_accuracy_drop": 0.5, "speed_runs": 5},
                         # In this process: the bench's child processes are tested in tests/devices/test_bench.py.
                         bench={"enabled": True, "runs": 2, "warmup": 1, "batch_sizes": [1], "torch_models": True,
                                "isolate": False})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    pm = stages["prune"]["metrics"]
    assert pm["vocab"]["vocab_after"] < pm["vocab"]["vocab_before"]
    assert set(pm["vocab"]["after"]) == {"validation", "test"}
    assert 1 <= len(pm["steps"]) <= 2 and "stopped" in pm and "final_recovery" in pm
    assert all("latency_ms" in s and "hidden" not in s for s in pm["steps"])
    assert "search kept round" in res.output
    n_vocab = pm["vocab"]["vocab_after"]
    assert len(seen) == len(pm["steps"]) + 1  # each round's recovery and the final one
    assert all(rows == n_vocab and top < n_vocab for rows, top in seen), (seen, n_vocab)
    for folder in (run / "prune" / "model", run / "export" / "onnx", run / "export" / "onnx-int8"):
        tok = AutoTokenizer.from_pretrained(folder)
        assert len(tok) == n_vocab, folder
    runner, _ = load_artifact(run / "export" / "onnx")
    tok = AutoTokenizer.from_pretrained(run / "export" / "onnx")
    enc = tok(["the movie was awful and boring"], return_tensors="np")
    assert int(enc["input_ids"].max()) < n_vocab
    assert runner.run({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    assert stages["export"]["metrics"]["targets"]["onnx"]["parity"]["top1_agreement"] == 1.0
    # Calibration, validation, test and OOD inputs are all the trimmed tokenizer's ids.
    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe

    ctx = create_context(load_recipe(path))
    for split in ("train", "validation"):
        assert int(ctx.calibration_data(split, 64)["input_ids"].max()) < n_vocab
    assert int(ctx.validation_data()[0]["input_ids"].max()) < n_vocab
    assert int(ctx.parity_data()[0]["input_ids"].max()) < n_vocab
    # Every model is measured on the same texts in the same plan: the shipped ones on the trimmed tokenizer's
    # ids, the unpruned PyTorch ones on their own tokenizer's ids (shorter: the trim splits the words it dropped).
    data = json.loads((run / "bench" / "local" / "results.json").read_text())
    cases = {e["name"]: e["cases"][0] for e in data["results"] if e.get("cases")}
    assert {n: c["tokenizer"] for n, c in cases.items()} == {
        "onnx": "shipped", "onnx-int8": "shipped", "pytorch-student-pruned": "shipped",
        "pytorch-teacher": "original", "pytorch-student": "original"}
    assert len({c["plan_sha256"] for c in cases.values()}) == 1
    assert cases["pytorch-teacher"]["inputs_sha256"] == cases["pytorch-student"]["inputs_sha256"] != \
        cases["onnx"]["inputs_sha256"]
    tokens = data["inputs"]["tokenizers"]  # this tiny vocabulary has no pieces to split into: [UNK], as long
    assert tokens["original"]["mean_tokens_per_text"] <= tokens["shipped"]["mean_tokens_per_text"]
    assert tokens["texts"] == len(ctx.tokenized("test", ctx.tokenizer))
    models = stages["bench"]["metrics"]["models"]
    assert set(models) == {"onnx", "onnx-int8", "pytorch-teacher", "pytorch-student", "pytorch-student-pruned"}
    assert all(m["status"] == "ok" and 0.0 <= m["accuracy"] <= 1.0 for m in models.values()), models
    # ...but the unpruned ones are scored on their own tokenizer's ids: the accuracy the eval stage gave
    # them on the same test texts, not that of [UNK]-ridden inputs through the table.
    ev = stages["eval"]["metrics"]
    for who in ("teacher", "student"):
        want = ev.get(f"{who}.accuracy", (ev.get(who) or {}).get("accuracy"))
        assert models[f"pytorch-{who}"]["accuracy"] == pytest.approx(want, abs=1e-9), (who, models, ev)
    results = json.loads((run / "bench" / "local" / "results.json").read_text())["results"]
    notes = {e["name"]: e.get("note") for e in results}
    assert "own tokenizer" in notes["pytorch-teacher"] and not notes.get("pytorch-student-pruned")
    # Those are only timed through the table, not also scored there (their outputs would be dropped).
    scored = {e["name"] for e in results if e.get("eval_examples")}
    assert scored == {"onnx", "onnx-int8", "pytorch-student-pruned"}, scored
    # Their logits are the eval stage's, which ran the same models on the same texts in the same ids: read, not
    # computed again, and the numbers the models give.
    assert all(notes[f"pytorch-{who}"].endswith("(the eval stage's logits)") for who in ("teacher", "student"))
    _eval_logits_are_read_only_when_they_answer_the_same_inputs(ctx, run, monkeypatch)


def _eval_logits_are_read_only_when_they_answer_the_same_inputs(ctx, run, monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    import edgekd.ood
    from edgekd.export.parity import source_outputs
    from edgekd.stages.base import load_stage_model
    from edgekd.tasks.text.evaluate import LOGITS_FILE, run_eval, saved_logits
    from edgekd.tasks.text.task import TokenizedSplit

    # An out-of-domain set of a few texts (this tiny recipe names none), scored by the eval stage run again.
    texts = ["an awful boring film", "a moving and wonderful play", "dull", "great fun"]

    def fake_ood(c, tokenizer=None):
        tok = tokenizer or c.tokenizer
        return (SimpleNamespace(name="fake-ood", record=lambda: {"name": "fake-ood"}),
                TokenizedSplit(c.task.tokenize(tok, texts), np.array([0, 1, 0, 1]), tok.pad_token_id or 0))

    monkeypatch.setattr(edgekd.ood, "ood_split", fake_ood)
    run_eval(ctx)
    task = ctx.task
    models = {who: (task.export_module(load_stage_model(ctx, stage)), task.model_io())
              for who, stage in (("teacher", "teacher"), ("student", "distill"))}
    read = ctx.bench_own_outputs(models, None)
    assert {n: v[2] for n, v in read.items()} == {"teacher": "the eval stage's logits",
                                                   "student": "the eval stage's logits"}
    test, _ = ctx.parity_data(None, tokenizer=ctx.tokenizer)
    ood = edgekd.ood.ood_inputs(ctx, ctx.tokenizer)[1]
    for who, (module, io) in models.items():
        for got, inputs in ((read[who][0], test), (read[who][1], ood)):
            want = source_outputs(module, inputs, io.output_names)["logits"]
            np.testing.assert_allclose(got["logits"], want, rtol=1e-4, atol=1e-5)
    # Other texts (the test split's first three), or a file changed since the eval stage recorded it: run here.
    other = "run here: the eval stage scored other test texts or ids"
    assert {n: v[2] for n, v in ctx.bench_own_outputs(models, 3).items()} == {"teacher": other, "student": other}
    assert saved_logits(ctx, ctx.parity_data(3, tokenizer=ctx.tokenizer)[0], ood) == (
        {}, "the eval stage scored other test texts or ids")
    path = run / "eval" / LOGITS_FILE
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["teacher.test"] = arrays["teacher.test"][:, ::-1].copy()  # every answer flipped
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    again = ctx.bench_own_outputs(models, None)
    changed = "run here: the eval stage's record is not current: its file eval/logits.npz is missing or changed"
    assert {n: v[2] for n, v in again.items()} == {"teacher": changed, "student": changed}
    assert saved_logits(ctx, test, ood) == (
        {}, "the eval stage's record is not current: its file eval/logits.npz is missing or changed")
    np.testing.assert_allclose(again["teacher"][0]["logits"], read["teacher"][0]["logits"], rtol=1e-4, atol=1e-5)
    # Another out-of-domain set than the eval stage scored: run here too.
    run_eval(ctx)
    texts[0] = "an awful boring play"
    other = "run here: the eval stage scored another out-of-domain set or ids"
    assert {n: v[2] for n, v in ctx.bench_own_outputs(models, None).items()} == {"teacher": other, "student": other}
    assert saved_logits(ctx, test, edgekd.ood.ood_inputs(ctx, ctx.tokenizer)[1])[1] == (
        "the eval stage scored another out-of-domain set or ids")


def test_a_model_trimmed_already_is_not_trimmed_again_with_the_teacher_ids(classifier, tiny_classifier_dir):
    import types

    from transformers import AutoModelForSequenceClassification

    from edgekd.tasks.text.prune import _trim_vocab

    _, tok = classifier
    trimmed, _ = trim_vocabulary(AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir), tok,
                                 _keep(tok))
    ctx = types.SimpleNamespace(recipe=types.SimpleNamespace(prune=None), task=None, tokenizer=tok)
    with pytest.raises(StageError, match=r"trimmed already\?"):
        _trim_vocab(ctx, trimmed, None)
