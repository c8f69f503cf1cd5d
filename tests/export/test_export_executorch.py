"""ExecuTorch target: XNNPACK-lowered program with bounded dynamic axes, run by the ExecuTorch runtime."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import MAX_LENGTH, TOLERANCE, eigh_inputs, eigh_io, eigh_module, shorter, source_logits

from edgekd.errors import RecipeError, UnsupportedTargetError
from edgekd.export import get_exporter
from edgekd.export.parity import check_parity
from edgekd.tasks.text.task import TEXT_IO, classification_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def et_export(text_module, text_data, tmp_path_factory):
    inputs, _ = text_data
    return get_exporter("executorch").export(text_module, inputs, TEXT_IO, tmp_path_factory.mktemp("et"), max_batch=8)


def test_dynamic_program_matches_source(et_export, text_module, text_data):
    inputs, labels = text_data
    result = et_export
    assert result.notes["dynamic"] is True and result.io is None
    assert result.notes["bounds"] == {"batch": [1, 8], "sequence": [1, MAX_LENGTH]}
    assert result.notes["delegation"]["delegated_nodes"] > 0  # XNNPACK took the linear layers
    assert result.notes["planned_batch_check"] == {"checked": True, "planned_batch": 8}
    runner = get_exporter("executorch").load(result.path)
    assert runner.max_batch == 8
    report = check_parity(runner, text_module, inputs, labels, classification_metrics, batch_size=32)
    assert report.batch_size == 8  # capped at what the program planned memory for
    assert report.top1_agreement == 1.0 and report.max_abs_diff < TOLERANCE
    assert report.artifact_metric == pytest.approx(report.source_metric)
    for rows, length in ((1, 7), (3, 15)):
        small = shorter(inputs, rows, length)
        np.testing.assert_allclose(runner.run(small)["logits"], source_logits(text_module, small), atol=TOLERANCE)


def test_input_beyond_planned_bounds_is_a_clear_error(et_export, text_data):
    inputs, _ = text_data
    runner = get_exporter("executorch").load(et_export.path)
    with pytest.raises(UnsupportedTargetError, match="exceeds the program's planned maximum"):
        runner.run({k: v[:9] for k, v in inputs.items()})


def test_fixed_shape_program_pads_inputs(text_module, text_data, tmp_path):
    inputs, labels = text_data
    ex = get_exporter("executorch")
    result = ex.export(text_module, inputs, TEXT_IO, tmp_path, dynamic=False)
    assert result.notes["dynamic"] is False
    assert result.notes["static_shapes"] == {"input_ids": [1, MAX_LENGTH], "attention_mask": [1, MAX_LENGTH]}
    # The bounds recorded are the program's own, not the max_batch a dynamic program would have had.
    assert result.notes["bounds"] == {"batch": [1, 1], "sequence": [MAX_LENGTH, MAX_LENGTH]}
    assert "requested_bounds" not in result.notes
    assert result.io is not None and result.io.dynamic_axes == {}
    runner = ex.load(result.path)
    assert runner.static
    small = shorter(inputs, 3, 11)  # padded to MAX_LENGTH with masked zeros inside the runner
    np.testing.assert_allclose(runner.run(small)["logits"], source_logits(text_module, small), atol=TOLERANCE)
    report = check_parity(runner, text_module, {k: v[:12] for k, v in inputs.items()}, labels[:12], None, 4)
    assert report.top1_agreement == 1.0 and report.max_abs_diff < TOLERANCE


def test_bound_above_what_the_model_accepts_names_the_option(text_module, text_data, tmp_path):
    # The tiny BERT has 128 position embeddings; torch.export proves the sequence cannot exceed them.
    with pytest.raises(RecipeError, match=r"executorch.max_sequence: the model accepts at most 128"):
        get_exporter("executorch").export(text_module, text_data[0], TEXT_IO, tmp_path, max_sequence=512)


def test_unsupported_operator_is_named(tmp_path):
    with pytest.raises(UnsupportedTargetError) as info:
        get_exporter("executorch").export(eigh_module(), eigh_inputs(), eigh_io(), tmp_path)
    assert "'executorch'" in str(info.value)
    assert info.value.operator == "aten._linalg_eigh.default"


def test_threads_resize_the_runtime_thread_pool(et_export):
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    ex = get_exporter("executorch")
    before = _threadpool_get_thread_count()
    try:
        for n in (1, 3):
            runner = ex.load(et_export.path, threads=n)
            assert runner.threads == n and _threadpool_get_thread_count() == n
        assert ex.load(et_export.path).threads is None
        with pytest.raises(UnsupportedTargetError, match="threads must be a whole number >= 1"):
            ex.load(et_export.path, threads=0)
    finally:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(before)


def test_planned_batch_check_reports_what_it_could_not_check(monkeypatch):
    import sys

    from edgekd.export import executorch as et

    # A program the runtime cannot load is reported, not passed as checked.
    planned, why = et._planned_batch(b"not a program")
    assert planned is None and "could not load the program" in why
    # Without the runtime, the note says the check did not run.
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)
    planned, why = et._planned_batch(b"")
    assert planned is None and "does not import here" in why


def test_a_program_planned_for_the_traced_batch_only_is_exported_again_at_fixed_shapes(
        text_module, text_data, tmp_path, monkeypatch):
    """XNNPACK may keep subgraphs at the traced batch (a detector's convolutions do): the dynamic
    program then runs that batch only, so the exporter lowers it again at fixed shapes and says why.
    Here the lowering is recorded, not run (it takes minutes for a detector; a real fixed-shape
    program is checked by test_fixed_shape_program_pads_inputs), and the check reports batch 1."""
    import edgekd.export.executorch as et

    lowered = []

    def fake_lower(program, artifact_io, notes):
        lowered.append(({n: list(v.shape) for n, v in zip(artifact_io.input_names, program.example_inputs[1].values(),
                                                            strict=True)}, artifact_io.dynamic_axes))
        return f"program {len(lowered)}".encode()

    monkeypatch.setattr(et.ExecuTorchExporter, "_lower", staticmethod(fake_lower))
    monkeypatch.setattr(et, "_planned_batch", lambda buffer: (1, None) if buffer == b"program 1" else (None, "?"))
    result = get_exporter("executorch").export(text_module, text_data[0], TEXT_IO, tmp_path)
    assert len(lowered) == 2 and lowered[0][1] == TEXT_IO.dynamic_axes  # dynamic first ...
    assert lowered[1] == ({"input_ids": [1, MAX_LENGTH], "attention_mask": [1, MAX_LENGTH]}, {})  # ... then fixed
    assert result.notes["dynamic"] is False and "planned for batch 1 only" in result.notes["dynamic_failed"]
    assert result.path.read_bytes() == b"program 2" and result.io is not None and result.io.dynamic_axes == {}
