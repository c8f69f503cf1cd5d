"""Every encoder family through export (ONNX, ExecuTorch, TorchScript lite) with parity after pruning and
the ONNX folder served over HTTP by the real app, and `edgekd run` end to end on a ModernBERT and a
DeBERTa-v3 folder. All slow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from encoder_families import FAMILIES, classifier, tiny_family

from edgekd.pruning.encoder import Encoder, load_pruned_model

TARGETS = ["onnx", "executorch", "torchscript-lite"]
# ExecuTorch lowering takes about a minute per model here, so the suite lowers one model of each distinct
# attention design (BERT-style, DeBERTa's disentangled attention, ModernBERT's fused QKV + gated FFN,
# MPNet's relative-position bias); the other families share BERT's graph and are checked by ONNX and
# TorchScript lite here (and by ExecuTorch in the README's support table, measured once).
EXECUTORCH_FAMILIES = {"bert", "deberta-v3", "modernbert", "mpnet"}
# Bounded dynamic shapes (the text task's default) cost about three times the lowering of a fixed-shape
# program (the symbolic shapes split XNNPACK's graph into many more partitions): BERT's graph is lowered
# dynamic here, the other designs at fixed shapes (``export.options.executorch.dynamic: false``, what the
# exporter falls back to when a dynamic program cannot be built).
DYNAMIC_EXECUTORCH = {"bert"}
# Where a runtime cannot take a family: (family, target) -> a word of the recorded reason. Empty: every
# family converts to every target (the README support table says the same).
UNSUPPORTED: dict[tuple[str, str], str] = {}


def pruned_student(family, tmp_path):
    model = classifier(family, layers=2, seed=4)
    enc = Encoder(model)
    enc.remove_neurons({i: list(range(n // 4)) for i, n in enumerate(enc.neurons())})
    if enc.layout.heads_uniform:  # MPNet: the same head from every layer (shared relative-position bias)
        enc.remove_heads({i: [1] for i in range(len(enc.blocks))})
    elif enc.layout.head_removal != "none":
        enc.remove_heads({0: [1]})
    model.save_pretrained(tmp_path / "pruned")
    return load_pruned_model(tmp_path / "pruned")


def text_inputs(tmp_path, n=24, length=16):
    from transformers import BertTokenizerFast

    from edgekd.testing import sentiment_rows, write_vocab

    tok = BertTokenizerFast(vocab_file=str(write_vocab(tmp_path / "vocab.txt")), do_lower_case=True)
    rows = sentiment_rows(n, seed=5)
    enc = tok([t for t, _ in rows], padding="max_length", truncation=True, max_length=length, return_tensors="np")
    tok.save_pretrained(tmp_path / "tok")
    return ({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)},
            np.array([y for _, y in rows]), sorted((tmp_path / "tok").iterdir()))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_family_exports_with_parity_and_serves(family, tmp_path):
    from edgekd.export.stage import export_all, load_artifact
    from edgekd.recipe import ExportConfig
    from edgekd.tasks.text.task import TEXT_IO, SequenceClassifierExport, classification_metrics

    module = SequenceClassifierExport(pruned_student(family, tmp_path))
    inputs, labels, tok_files = text_inputs(tmp_path)
    meta = {"labels": ["negative", "positive"], "max_length": 16, "source_model": family,
            "task": "text-classification"}
    targets = [t for t in TARGETS if t != "executorch" or family in EXECUTORCH_FAMILIES]
    options = {} if family in DYNAMIC_EXECUTORCH or "executorch" not in targets else {"executorch": {"dynamic": False}}
    records = export_all(module, TEXT_IO, targets, tmp_path / "export", ExportConfig(targets=targets, options=options),
                         inputs, labels, classification_metrics, meta, tok_files)
    if "executorch" in targets:
        notes = json.loads((tmp_path / "export" / "executorch" / "artifact.json").read_text())["notes"]
        assert notes["dynamic"] == (family in DYNAMIC_EXECUTORCH), notes
    for target in targets:
        rec = records[target]
        if (family, target) in UNSUPPORTED:
            assert not rec["built"] and UNSUPPORTED[family, target] in rec["reason"], rec
            continue
        assert rec["built"], f"{family} -> {target}: {rec['reason']}"
        assert rec["parity"]["top1_agreement"] == 1.0 and rec["parity"]["max_abs_diff"] < 1e-4, rec["parity"]
    # What the server runs: the ONNX artifact loaded from its folder alone, same logits as the model.
    runner, art_meta = load_artifact(tmp_path / "export" / "onnx")
    with torch.inference_mode():
        want = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].numpy()
    np.testing.assert_allclose(runner.run(inputs)["logits"], want, atol=1e-4)
    assert art_meta["labels"] == ["negative", "positive"]
    served_predictions_match_the_runner(tmp_path / "export" / "onnx", runner, art_meta)


def served_predictions_match_the_runner(folder, runner, meta):
    """POST /predict on the real FastAPI app serving ``folder``: labels and probabilities of two texts
    equal the runner's own output on the same batch (padded to its longest text with [PAD], mask 0),
    and, within float noise of the padding, on each text alone."""
    from fastapi.testclient import TestClient
    from tokenizers import Tokenizer

    from edgekd.serving import ServeSettings, create_app
    from edgekd.serving.codec import softmax

    texts = ["a wonderful and moving film", "dull plot"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(meta["max_length"])
    with TestClient(create_app(ServeSettings(export_dir=folder))) as client:
        r = client.post("/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    got = np.array([[pred["probabilities"][name] for name in meta["labels"]] for pred in preds])
    encoded = [tok.encode(t).ids for t in texts]
    assert len(encoded[0]) > len(encoded[1])  # the batch really pads
    ids = np.full((2, len(encoded[0])), tok.token_to_id("[PAD]"), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, :len(e)], mask[row, :len(e)] = e, 1
    want = softmax(runner.run({"input_ids": ids, "attention_mask": mask})["logits"])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert [p["label"] for p in preds] == [meta["labels"][int(k)] for k in want.argmax(-1)]
    for e, g in zip(encoded, got, strict=True):
        alone = np.asarray([e], dtype=np.int64)
        np.testing.assert_allclose(
            g, softmax(runner.run({"input_ids": alone, "attention_mask": np.ones_like(alone)})["logits"])[0], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["modernbert", "deberta-v3"])
def test_edgekd_run_prunes_quantizes_and_exports_the_family(family, tmp_path):
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.testing import tiny_recipe, write_sentiment_csv

    teacher = tiny_family(family, tmp_path / "teacher", layers=4)
    csv = write_sentiment_csv(tmp_path / "reviews.csv", n=200, seed=1)
    recipe = tiny_recipe(tmp_path, teacher, csv,
                         teacher={"finetune": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0}},
                         distill={"train": {"epochs": 1, "batch_size": 16, "lr": 2e-3}},
                         baseline={"enabled": False},
                         prune={"enabled": True, "method": "heads-ffn", "importance": "taylor", "keep_params": 0.6,
                                "recover_epochs": 0.5, "score_batches": 2},
                         quantize={"enabled": True, "method": "dynamic", "max_accuracy_drop": 0.5},
                         export={"targets": ["onnx"], "parity_examples": 32},
                         bench={"enabled": False})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    assert "from teacher layers [0, 2]" in res.output
    run = tmp_path / "runs" / "tiny"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["distill"]["metrics"]["layers_from_teacher"] == [0, 2]
    pruned = stages["prune"]["metrics"]
    assert pruned["prunable_params_after"] < pruned["prunable_params_before"], pruned
    assert sum(pruned["after"]["heads_per_layer"]) < 2 * 4  # heads really went
    onnx = stages["export"]["metrics"]["targets"]["onnx"]
    assert onnx["built"] and onnx["parity"]["top1_agreement"] == 1.0 and onnx["parity"]["max_abs_diff"] < 1e-4
    assert "quantize" in stages
    reloaded = load_pruned_model(run / "prune" / "model")
    assert Encoder(reloaded).heads() == pruned["after"]["heads_per_layer"]
