"""A trimmed run's bench: the unpruned PyTorch models (handed over behind the trimmed vocabulary's id table)
are timed on their own tokenizer's ids of the same texts, in the same plan of calls as every other row, not
on the trimmed tokenizer's longer ids; the tables check one plan for every row and one set of arrays per
tokenizer, and say how long a text is in each."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

# Whole words and the pieces they split into once the trimmed vocabulary drops the whole words.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "a", "film", "play", "##ing",
         "playing", "wonder", "##ful", "wonderful", "dull", "good"]
TEXTS = ["the movie was wonderful", "a film playing", "the film was dull", "wonderful playing",
         "the movie was good", "a wonderful film", "playing the movie", "the film was good"]
DROPPED = ("playing", "wonderful")  # the training texts never used them whole


@pytest.fixture
def trimmed_run(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from edgekd.pruning.vocab import FromTrimmedIds, original_ids, trim_vocabulary
    from edgekd.tasks.text.task import TEXT_IO, SequenceClassifierExport

    run = tmp_path / "runs" / "trimmed"
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    student = BertForSequenceClassification(cfg).eval()
    (run / "distill" / "model").mkdir(parents=True)
    tok.save_pretrained(run / "distill" / "model")
    keep = [i for i, t in enumerate(VOCAB) if t not in DROPPED]
    pruned, trimmed_tok = trim_vocabulary(BertForSequenceClassification(cfg).eval(), tok, keep)
    (run / "prune" / "model").mkdir(parents=True)
    trimmed_tok.save_pretrained(run / "prune" / "model")
    table = original_ids(trimmed_tok, tok)
    enc = trimmed_tok(TEXTS, padding="longest", return_tensors="np")
    shipped = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    own = tok(TEXTS, padding="longest", return_tensors="np")
    own = {"input_ids": own["input_ids"].astype(np.int64), "attention_mask": own["attention_mask"].astype(np.int64)}
    models = {"student": (FromTrimmedIds(SequenceClassifierExport(student), table), TEXT_IO),
              "student-pruned": (SequenceClassifierExport(pruned.eval()), TEXT_IO)}
    return run, shipped, own, models, np.array([i % 2 for i in range(len(TEXTS))])


def _sha(examples, batch, cfg):
    """inputs_sha256 of a bench's timed calls at ``batch`` on ``examples``, its plan (measure.timing_rows)."""
    from edgekd.devices import measure, remote_runner
    from edgekd.tasks.text.task import TEXT_IO

    plan = measure.timing_rows(len(examples["input_ids"]), batch, cfg.warmup + cfg.runs)
    calls = remote_runner.real_length_calls(TEXT_IO.to_dict(), examples, plan)
    plan_sha = hashlib.sha256(f"{plan.shape}|".encode() + np.ascontiguousarray(plan, dtype=np.int64).tobytes())
    return remote_runner.inputs_sha256(calls[cfg.warmup:]), plan_sha.hexdigest()


def test_untrimmed_models_are_timed_on_their_own_tokenizers_ids_of_the_same_texts(trimmed_run):
    from edgekd.devices.bench import bench_run
    from edgekd.recipe import BenchConfig
    from edgekd.tasks.text.task import classification_metrics

    run, shipped, own, models, labels = trimmed_run
    lengths = {k: v["attention_mask"].sum(axis=1) for k, v in (("shipped", shipped), ("own", own))}
    assert (lengths["shipped"] > lengths["own"]).sum() == 5  # the same texts, longer in the trimmed ids
    cfg = BenchConfig(warmup=1, runs=6, rounds=2, batch_sizes=[1, 2], isolate=False, eval_batch_size=4)
    why = "run here: the eval stage scored other test texts or ids"
    scored = {"pytorch-student": ({"logits": np.zeros((len(TEXTS), 2), np.float32)}, None, why)}
    from edgekd.errors import StageError

    with pytest.raises(StageError, match="was not given their ids of the same texts"):
        bench_run(run, "local", cfg, shipped, labels, classification_metrics, models, own_outputs=lambda: scored)
    bench_run(run, "local", cfg, shipped, labels, classification_metrics, models, own_outputs=lambda: scored,
              original_inputs=(own, None))
    data = json.loads((run / "bench" / "local" / "results.json").read_text())
    rows = {e["name"]: e for e in data["results"]}
    for batch in (1, 2):
        case = {name: next(c for c in rows[name]["cases"] if c["batch"] == batch) for name in rows}
        want_own, plan = _sha(own, batch, cfg)
        want_shipped, _ = _sha(shipped, batch, cfg)
        assert case["pytorch-student"]["inputs_sha256"] == want_own != want_shipped
        assert case["pytorch-student-pruned"]["inputs_sha256"] == want_shipped
        assert case["pytorch-student"]["tokenizer"] == "original" and case["pytorch-student-pruned"]["tokenizer"] == "shipped"
        assert case["pytorch-student"]["plan_sha256"] == case["pytorch-student-pruned"]["plan_sha256"] == plan
        assert case["pytorch-student"]["mean_tokens_per_item"] < case["pytorch-student-pruned"]["mean_tokens_per_item"]
    # Scoring as before: the unpruned model's accuracy is the one given on its own tokenizer's ids.
    assert rows["pytorch-student"]["accuracy"] == 0.5
    assert rows["pytorch-student"]["note"].endswith(f"accuracy on its own tokenizer's ids ({why})")
    tokens = data["inputs"]["tokenizers"]
    assert tokens["texts"] == len(TEXTS) and tokens["texts_differing_in_length"] == 5
    assert tokens["shipped"]["mean_tokens_per_text"] == pytest.approx(lengths["shipped"].mean())
    assert tokens["original"]["mean_tokens_per_text"] == pytest.approx(lengths["own"].mean())
    table = (run / "bench" / "local" / "table.md").read_text()
    said = "the same texts, in the same order and batches, for every row, each model fed its own tokenizer's ids"
    assert said in data["inputs"]["description"] and said in table
    assert "one plan of texts for every row, one set of arrays per tokenizer" in table
    assert f"mean tokens per text: shipped {lengths['shipped'].mean():.2f}, original {lengths['own'].mean():.2f}" in table
    assert "5 of 8 texts differ in length" in table


def test_one_plan_for_every_row_and_one_set_of_arrays_per_tokenizer():
    """Rows of two tokenizers on one plan are one table; two rows of one tokenizer fed other arrays, or a
    row on another plan (or on no recorded plan beside another tokenizer's rows), are refused."""
    from edgekd.devices import tables
    from edgekd.errors import StageError

    def rows(**over):
        out = [{"name": "pytorch-teacher", "tokenizer": "original", "inputs_sha256": "o" * 64},
               {"name": "pytorch-student", "tokenizer": "original", "inputs_sha256": "o" * 64},
               {"name": "onnx-int8", "tokenizer": "shipped", "inputs_sha256": "s" * 64}]
        for r in out:
            r.update({"p50_ms": 1.0, "plan_sha256": "p" * 64, **over.get(r["name"], {})})
        return out

    assert tables.same_inputs(rows()) == {"original": "o" * 64, "shipped": "s" * 64}
    assert tables.check_same_inputs(rows()) is None  # no single fingerprint for the whole table
    with pytest.raises(StageError, match="of the original tokenizer timed on different inputs"):
        tables.same_inputs(rows(**{"pytorch-student": {"inputs_sha256": "x" * 64}}))
    with pytest.raises(StageError, match="different texts"):
        tables.same_inputs(rows(**{"onnx-int8": {"plan_sha256": "q" * 64}}))
    with pytest.raises(StageError, match="no plan recorded: pytorch-teacher"):
        tables.same_inputs(rows(**{"pytorch-teacher": {"plan_sha256": None}}))
    # One set of inputs (no trimmed vocabulary): as before, one fingerprint.
    one = [{"name": n, "p50_ms": 1.0, "inputs_sha256": "a" * 64} for n in ("a", "b")]
    assert tables.check_same_inputs(one) == "a" * 64
    with pytest.raises(StageError, match="different inputs"):
        tables.check_same_inputs([*one, {"name": "c", "p50_ms": 1.0, "inputs_sha256": "b" * 64}])


def test_a_side_by_side_of_two_benches_checks_each_tokenizer(tmp_path):
    from edgekd.devices import tables
    from edgekd.errors import StageError

    def bench(folder: Path, student_sha: str) -> Path:
        def row(name, tok, sha):
            return {"name": name, "kind": "artifact", "target": "onnx", "precision": "fp32", "status": "ok",
                    "cases": [{"batch": 1, "seq": "real", "p50_ms": 1.0, "inputs_sha256": sha, "tokenizer": tok,
                               "plan_sha256": "p" * 64}]}
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({
            "run": folder.name, "profile": {"name": "local"}, "headline": {"batch": 1, "seq": "real"},
            "inputs": {"threads": 2}, "results": [row("pytorch-student", "original", student_sha),
                                                  row("onnx", "shipped", "s" * 64)]}))
        return folder / "results.json"

    a, b = bench(tmp_path / "a" / "bench" / "local", "o" * 64), bench(tmp_path / "b" / "bench" / "local", "o" * 64)
    text = tables.report(a, [b])
    assert "original tokenizer oooo" in text and "shipped tokenizer ssss" in text
    c = bench(tmp_path / "c" / "bench" / "local", "x" * 64)
    with pytest.raises(StageError, match="original tokenizer timed on different inputs"):
        tables.report(a, [c])
