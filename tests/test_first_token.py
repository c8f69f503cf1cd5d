"""The exported classifier's last block over the first position only gives the model's own logits, where
the family allows it, and says why not where it does not; every export target captures it, and parity
compares the artifacts with the model's own forward (a wrong first-position block fails parity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from encoder_families import FAMILIES, classifier

from edgekd.errors import RecipeError, StageError
from edgekd.tasks.text.first_token import (
    FirstTokenClassifierExport,
    first_token_support,
    shipped_text_module,
)
from edgekd.tasks.text.task import SequenceClassifierExport

SUPPORTED = ("bert", "minilm", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet")


def _padded_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Five texts of lengths 3..11 padded to 11: every row but one has padded keys."""
    g = torch.Generator().manual_seed(seed)
    lengths = [11, 3, 7, 5, 9]
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", SUPPORTED)
def test_first_position_block_gives_the_models_own_logits(family):
    model = classifier(family, layers=3)
    assert first_token_support(model) is None
    batch = _padded_batch(model.config.vocab_size)
    with torch.no_grad():
        want = SequenceClassifierExport(model)(**batch)[0]
        got = FirstTokenClassifierExport(model)(**batch)[0]
        # the module computes every block itself: the last layer's own full-width forward never runs
        seen = []
        blocks = model.base_model.transformer.layer if family == "distilbert" else model.base_model.encoder.layer
        hook = blocks[-1].register_forward_hook(lambda *a: seen.append(1))
        FirstTokenClassifierExport(model)(**batch)
        hook.remove()
    assert want.shape == got.shape == (5, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not seen


def test_pruned_heads_and_one_layer_models_are_handled():
    model = classifier("bert", layers=1)
    model.prune_heads({0: [1, 3]})
    batch = _padded_batch(model.config.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(FirstTokenClassifierExport(model)(**batch)[0],
                                   SequenceClassifierExport(model)(**batch)[0], atol=1e-5, rtol=1e-5)


def test_mpnet_with_heads_removed_uniformly_keeps_its_logits():
    """edgekd removes MPNet's heads from every layer and its relative-position bias columns alike; the
    first-position block adds the first row of that (sliced) bias."""
    from edgekd.pruning.encoder import Encoder

    model = classifier("mpnet", layers=3, seed=5)
    Encoder(model).remove_heads({i: [1, 3] for i in range(3)})
    assert model.mpnet.encoder.relative_attention_bias.weight.shape[1] == 2
    batch = _padded_batch(model.config.vocab_size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(FirstTokenClassifierExport(model)(**batch)[0],
                                   SequenceClassifierExport(model)(**batch)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(SUPPORTED)))
def test_other_families_say_why_and_keep_the_full_block(family):
    model = classifier(family, layers=2)
    why = first_token_support(model)
    assert why and type(model).__name__ in why
    with pytest.raises(StageError, match="first position alone"):
        FirstTokenClassifierExport(model)
    inputs = {k: v.numpy() for k, v in _padded_batch(model.config.vocab_size).items()}
    ref = SequenceClassifierExport(model)
    module, notes = shipped_text_module(model, None, ref, inputs)
    assert module is ref and notes == {"applied": False, "why": why}
    with pytest.raises(StageError, match="export.first_token_last_layer is true"):
        shipped_text_module(model, True, ref, inputs)


def test_the_setting_is_read():
    model = classifier("bert", layers=2)
    inputs = {k: v.numpy() for k, v in _padded_batch(model.config.vocab_size).items()}
    ref = SequenceClassifierExport(model)
    off, notes = shipped_text_module(model, False, ref, inputs)
    assert off is ref and notes["applied"] is False and "false" in notes["why"]
    for setting in (None, True):
        on, notes = shipped_text_module(model, setting, ref, inputs)
        assert isinstance(on, FirstTokenClassifierExport) and notes["applied"] is True
        assert notes["max_abs_diff_vs_full"] < 1e-4


def test_relative_position_bert_is_refused():
    import transformers as T

    cfg = T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, position_embedding_type="relative_key")
    why = first_token_support(T.BertForSequenceClassification(cfg))
    assert why and "relative_key" in why


def test_a_wrong_first_position_block_is_caught_before_export():
    model = classifier("bert", layers=2)
    inputs = {k: v.numpy() for k, v in _padded_batch(model.config.vocab_size).items()}

    class Wrong(FirstTokenClassifierExport):
        def forward(self, input_ids, attention_mask):
            return (super().forward(input_ids, attention_mask)[0] + 0.1,)

    from edgekd.tasks.text.first_token import check_same_logits

    with pytest.raises(StageError, match="away from the model's own forward"):
        check_same_logits(Wrong(model), SequenceClassifierExport(model), inputs)


def test_onnx_artifact_runs_the_first_position_block_and_parity_reads_the_full_model(tmp_path):
    """The exported graph is the first-position one (fewer multiply-adds: its last FFN MatMul has a
    one-row input), its logits equal the model's, and parity's reference is the model's own forward:
    a module that differs from it fails parity even though it equals itself."""
    import onnx

    from edgekd.export.stage import export_all
    from edgekd.recipe import ExportConfig
    from edgekd.tasks.text.task import TEXT_IO, classification_metrics

    model = classifier("bert", layers=2)
    inputs = {k: v.numpy() for k, v in _padded_batch(model.config.vocab_size).items()}
    labels = np.zeros(5, dtype=np.int64)
    cfg = ExportConfig(targets=["onnx"], parity_examples=5)
    ref = SequenceClassifierExport(model)
    module, notes = shipped_text_module(model, None, ref, inputs)
    rec = export_all(module, TEXT_IO, ["onnx"], tmp_path / "ok", cfg, inputs, labels, classification_metrics,
                     {"first_token_last_layer": notes}, [], reference=ref)["onnx"]
    assert rec["parity"]["passed"] and rec["parity"]["max_abs_diff"] < 1e-4
    import json

    art = json.loads((tmp_path / "ok" / "onnx" / "artifact.json").read_text())
    assert art["first_token_last_layer"]["applied"] is True

    # The exporter's shapes: every FFN activation but the last spans the sequence, the last one row.
    g = onnx.load(str(tmp_path / "ok" / "onnx" / "model.onnx")).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in g.value_info}
    ffn = [shapes[n.output[0]][1] for n in g.node if n.op_type == "Gelu"]
    assert ffn == ["sequence", 1], ffn

    class Shifted(FirstTokenClassifierExport):
        def forward(self, input_ids, attention_mask):
            return (super().forward(input_ids, attention_mask)[0] * -1.0,)

    cfg_strict = ExportConfig(targets=["onnx"], parity_examples=5, min_top1_agreement=0.99)
    from edgekd.errors import ParityError

    with pytest.raises(ParityError):
        export_all(Shifted(model), TEXT_IO, ["onnx"], tmp_path / "bad", cfg_strict, inputs, labels,
                   classification_metrics, {}, [], reference=ref)


def test_detection_refuses_the_text_only_setting():
    from edgekd.recipe import ExportConfig
    from edgekd.tasks.detection.task import DetectionTask

    task = DetectionTask.__new__(DetectionTask)
    with pytest.raises(RecipeError, match="text classifiers only"):
        task.shipped_module(None, ExportConfig(first_token_last_layer=True), {})


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_the_padding_mask_survives_an_fp16_core_ml_conversion(family):
    """Core ML's fp16 conversion (the default recipe's coreml precision) turns float32 constants beyond fp16's
    range into infinities: the mask's -3.4e38 became -inf, and a real key's 0 * -inf is NaN in every logit
    (on a Mac; Core ML predicts nowhere else, so parity could not see it). The converted program must hold
    no infinite constant."""
    ct = pytest.importorskip("coremltools")
    model = classifier(family, layers=2)
    batch = _padded_batch(model.config.vocab_size)
    with torch.no_grad():
        traced = torch.jit.trace(FirstTokenClassifierExport(model).eval(),
                                 (batch["input_ids"], batch["attention_mask"]), strict=False)
    inputs = [ct.TensorType(name=k, shape=tuple(v.shape), dtype=np.int32) for k, v in batch.items()]
    converted = ct.convert(traced, inputs=inputs, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                           minimum_deployment_target=ct.target.iOS16)
    program = str(converted._mil_program)
    assert "cast_fp16" in program  # the program did go to fp16
    assert not [line for line in program.splitlines() if "inf" in line.replace("info", "")], "an infinite constant"
