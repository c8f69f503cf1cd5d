"""prune.target_latency_ms against what ships: the prune search meets it on the form it times (the quantize
section's first setup, on this machine); the file that ships is the quantize stage's choice, timed by the
bench on the bench profile. The bench now says whether the shipped file meets the target, in the console,
the manifest and the summary."""

from __future__ import annotations

import json
from types import SimpleNamespace

from edgekd.report import _bench
from edgekd.runfolder import RunFolder
from edgekd.stages.bench import latency_target_check, target_latency_line


def _ctx(tmp_path, target=1.0, enabled=True, quantize_on=True, budget=None, method="heads-ffn"):
    run = RunFolder(tmp_path / "run")
    for name in ("onnx", "onnx-int8"):
        (run.root / "export" / name).mkdir(parents=True)
        (run.root / "export" / name / "artifact.json").write_text("{}")
    quantize = {"status": "done", "metrics": {"recommended": "quantized",
                                              "recommended_dir": str(run.root / "export" / "onnx-int8")}}
    (run.root / "manifest.json").write_text(json.dumps({"stages": {"quantize": quantize}}))
    prune = SimpleNamespace(enabled=enabled, target_latency_ms=target, method=method, max_accuracy_drop=budget)
    return SimpleNamespace(recipe=SimpleNamespace(prune=prune, quantize=SimpleNamespace(enabled=quantize_on)), run=run)


def _result(p50_int8, batch=1):
    return {"profile": "pi4", "headline": {"batch": batch, "seq": "real"},
            "models": {"onnx": {"status": "ok", "p50_ms": 0.5}, "onnx-int8": {"status": "ok", "p50_ms": p50_int8}}}


def test_the_shipped_file_is_checked_not_the_fastest_one(tmp_path):
    ctx = _ctx(tmp_path)
    check = latency_target_check(ctx, _result(1.4))  # onnx (0.5 ms) is faster, but onnx-int8 ships
    assert check == {"target_ms": 1.0, "shipped": "onnx-int8", "profile": "pi4", "p50_ms": 1.4, "met": False,
                     "seq": "real", "prune_method": "heads-ffn", "max_accuracy_drop": None, "quantize": True}
    line = target_latency_line(check)
    assert line.startswith("prune.target_latency_ms=1: NOT met by the shipped onnx-int8 (p50 1.400 ms at batch 1 "
                           "on pi4;")
    assert line in _bench({**_result(1.4), "target_latency": check}, "accuracy", "accuracy")
    ok = latency_target_check(ctx, _result(0.9))
    assert ok["met"] is True and target_latency_line(ok) == ("prune.target_latency_ms=1: met by the shipped "
                                                             "onnx-int8 (p50 0.900 ms at batch 1 on pi4)")


def test_what_cannot_be_compared_is_said_and_no_target_adds_nothing(tmp_path):
    ctx = _ctx(tmp_path)
    check = latency_target_check(ctx, _result(0.9, batch=8))
    assert check["met"] is None and "first batch size is 8" in check["why_not"]
    assert "not checked against what ships" in target_latency_line(check)
    gone = _result(0.9)
    del gone["models"]["onnx-int8"]
    assert "did not time onnx-int8" in latency_target_check(ctx, gone)["why_not"]
    assert latency_target_check(_ctx(tmp_path / "b", target=None), _result(0.9)) is None
    assert latency_target_check(_ctx(tmp_path / "c", enabled=False), _result(0.9)) is None
    assert "target_latency" not in _bench(_result(0.9), "accuracy", "accuracy")


def test_an_unmet_target_is_told_to_prune_further_or_raise_the_target_as_the_prune_stage_says(tmp_path):
    """The advice matches the prune stage's own (raise the target, prune further: each limit in the direction that
    removes more, max_channel_ratio raised, the heads/neurons floors lowered, the budget loosened; a smaller student), never "lower the target"; a quantize setup is named only where quantize is on."""
    def advice(**kw):
        line = target_latency_line(latency_target_check(_ctx(tmp_path / "_".join(map(str, kw.values())), **kw),
                                                        _result(1.4)))
        return line.split("on this machine): ", 1)[1]

    off = advice(quantize_on=False, method="channels")
    assert off == ("raise the target, or prune further (raise prune.max_channel_ratio), or use a smaller student")
    assert "quantize" not in off and "lower the target" not in off
    on = advice(quantize_on=True, budget=0.02)
    assert on.startswith("raise the target, or prune further (lower prune.min_heads_per_layer or "
                         "min_neurons_fraction, or raise prune.max_accuracy_drop), or use a smaller student; "
                         "the search timed the quantize section's own setup, and the quantize stage's guards may "
                         "ship another form")
    assert "quantize.candidates" in on and "lower the target" not in on
    # a check recorded before the advice's inputs were: the plain advice, no quantize word
    old = {"target_ms": 1.0, "shipped": "onnx", "profile": "local", "p50_ms": 1.4, "met": False}
    assert target_latency_line(old).endswith(": raise the target, or prune further (lower the floors), or use a "
                                             "smaller student")
