"""Parity: figures from real runs, and thresholds that turn a disagreement into ParityError."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import TOLERANCE

from edgekd.errors import ParityError
from edgekd.export import get_exporter
from edgekd.export.parity import check_parity
from edgekd.tasks.text.task import TEXT_IO, classification_metrics


class SourceRunner:
    """The source module behind the Runner interface, optionally distorted."""

    input_names = ["input_ids", "attention_mask"]
    output_names = ["logits"]

    def __init__(self, module, shift=0.0, flip=False, max_batch=None, nan=False):
        self.module, self.shift, self.flip, self.max_batch, self.nan = module, shift, flip, max_batch, nan
        self.batches: list[int] = []

    def run(self, inputs):
        import torch

        self.batches.append(len(inputs["input_ids"]))
        with torch.inference_mode():
            logits = self.module(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].numpy().copy()
        logits = logits + self.shift
        if self.flip:
            logits = logits[:, ::-1]
        if self.nan:
            logits[0, 0] = np.nan
        return {"logits": logits}


def test_identical_runner_has_zero_difference(text_module, text_data):
    inputs, labels = text_data
    report = check_parity(SourceRunner(text_module), text_module, inputs, labels, classification_metrics, 16,
                          min_top1_agreement=1.0, max_abs_diff=0.0)
    assert report.max_abs_diff == 0.0 and report.top1_agreement == 1.0
    assert report.artifact_metric == report.source_metric
    assert set(report.source_metric) == {"accuracy", "macro_f1"}


def test_batches_respect_the_runners_max_batch(text_module, text_data):
    inputs, labels = text_data
    runner = SourceRunner(text_module, max_batch=5)
    report = check_parity(runner, text_module, inputs, labels, None, 16)
    assert max(runner.batches) == 5 and sum(runner.batches) == len(labels)
    assert report.batch_size == 5 and report.artifact_metric is None


def test_offset_outputs_fail_the_abs_diff_threshold(text_module, text_data):
    inputs, labels = text_data
    runner = SourceRunner(text_module, shift=0.01)
    report = check_parity(runner, text_module, inputs, labels, None, 16, min_top1_agreement=1.0)
    assert report.max_abs_diff == pytest.approx(0.01, rel=1e-3) and report.top1_agreement == 1.0
    with pytest.raises(ParityError, match=r"'shifted' fails parity: max abs diff 0.01 > allowed 0.001") as info:
        check_parity(runner, text_module, inputs, labels, None, 16, target="shifted", max_abs_diff=1e-3)
    assert info.value.report.examples == len(labels)


def test_nan_output_fails_parity_whatever_the_thresholds(text_module, text_data):
    """A NaN fails with a max_abs_diff threshold, with a top-1 threshold alone (argmax reads a NaN row as class
    0, so agreement could pass it), and with none set (the schema's default)."""
    inputs, labels = text_data
    for thresholds in ({"max_abs_diff": 1.0}, {"min_top1_agreement": 0.5}, {}):
        with pytest.raises(ParityError, match="outputs that are not finite numbers") as info:
            check_parity(SourceRunner(text_module, nan=True), text_module, inputs, labels, None, 16, **thresholds)
        assert "max abs diff nan > allowed" not in str(info.value)  # said once


@pytest.mark.slow
def test_perturbed_onnx_artifact_raises_parity_error(text_module, text_data, tmp_path):
    """Overwrite the exported classifier weights with noise: the figures must show it."""
    import onnx
    from onnx import numpy_helper

    inputs, labels = text_data
    ex = get_exporter("onnx")
    result = ex.export(text_module, inputs, TEXT_IO, tmp_path)
    baseline = check_parity(ex.load(result.path), text_module, inputs, labels, None, 16)
    assert baseline.top1_agreement == 1.0 and baseline.max_abs_diff < TOLERANCE

    model = onnx.load(str(result.path))
    weight = next(t for t in model.graph.initializer if "classifier" in t.name and "weight" in t.name)
    values = numpy_helper.to_array(weight)
    noise = np.random.default_rng(0).standard_normal(values.shape).astype(values.dtype) * 10 * values.std()
    weight.CopyFrom(numpy_helper.from_array(values + noise, weight.name))
    onnx.save(model, str(result.path))

    with pytest.raises(ParityError) as info:
        check_parity(ex.load(result.path), text_module, inputs, labels, classification_metrics, 16,
                     target="onnx", min_top1_agreement=0.99)
    msg = str(info.value)
    assert "Export target 'onnx' fails parity: top-1 agreement" in msg and "< required 0.99" in msg
    assert "max abs diff" in msg and "accuracy" in msg
    assert info.value.report.top1_agreement < 0.99


def test_output_shape_mismatch_is_a_parity_error(text_module, text_data):
    inputs, labels = text_data

    class Wrong(SourceRunner):
        def run(self, inputs):
            return {"logits": super().run(inputs)["logits"][:, :1]}

    with pytest.raises(ParityError, match="output 'logits' has shape"):
        check_parity(Wrong(text_module), text_module, inputs, labels, None, 16)


def test_the_source_runs_each_parity_batch_once_for_every_target(text_module, text_data, tokenizer_files, tmp_path,
                                                                 monkeypatch):
    """Several targets are compared with one run of the source model: each batch of the batched check and
    each row of the real-length check runs through it once, and every target's parity is against those
    outputs, the ones the model gives."""
    import torch

    import edgekd.export.stage as stage
    from edgekd.export.parity import SourceOnce
    from edgekd.recipe import ExportConfig

    made = []

    class Counted(SourceOnce):
        def __init__(self, module):
            super().__init__(module)
            made.append(self)

    monkeypatch.setattr(stage, "SourceOnce", Counted)
    inputs, labels = text_data
    targets = ["onnx", "torchscript-lite"]
    before = {k: v.clone() for k, v in text_module.state_dict().items()}
    cfg = ExportConfig(targets=targets, parity_batch_size=8, min_top1_agreement=1.0, max_abs_diff=TOLERANCE)
    records = stage.export_all(text_module, TEXT_IO, targets, tmp_path, cfg, inputs, labels, classification_metrics,
                               {"labels": ["negative", "positive"], "max_length": inputs["input_ids"].shape[1],
                                "source_model": "tiny", "task": "text-classification"}, tokenizer_files)
    n = len(labels)
    real_rows = records["onnx"]["parity"]["real_lengths"]["examples"]
    assert len(made) == 1 and made[0].module is text_module
    # Exporting leaves the model as it was, so the outputs of the first check stand for every target.
    after = text_module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert made[0].calls == -(-n // 8) + real_rows  # one target's worth, not two
    for t in targets:
        assert records[t]["parity"]["passed"] and records[t]["parity"]["examples"] == n
        assert records[t]["parity"]["source_metric"] == records["onnx"]["parity"]["source_metric"]

    once = SourceOnce(text_module)
    batch = {k: torch.from_numpy(np.ascontiguousarray(v[:4])) for k, v in inputs.items()}
    first = once(**batch)
    assert once(**{k: v.clone() for k, v in batch.items()}) is first and once.calls == 1  # the same inputs
    other = {**batch, "attention_mask": batch["attention_mask"].clone()}
    other["attention_mask"][0, 1:] = 0
    assert once(**other) is not first and once.calls == 2  # other inputs run the model
    with torch.inference_mode():
        want = text_module(**other)
    torch.testing.assert_close(once(**other)[0], want[0])
    # Past its memory bound it keeps nothing more: the model runs again, with the same answers.
    bounded = SourceOnce(text_module, max_bytes=0)
    torch.testing.assert_close(bounded(**batch)[0], bounded(**batch)[0])
    assert bounded.calls == 2
    # Outputs nested in dicts and lists (a detector's heads) count at their full size against the bound.
    nested = SourceOnce(lambda **kw: {"heads": [torch.zeros(8, 4), (torch.zeros(2),)]}, max_bytes=127)
    nested(**batch)
    nested(**batch)
    assert nested.calls == 2  # 136 bytes > 127: not kept
