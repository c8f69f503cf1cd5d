"""`edgekd serve RUN` and `edgekd.load(RUN)` serve the same export with the same settings, through one function
(``edgekd.api.serve_setup``): arguments, then (the server only) EDGEKD_SERVE_* variables, then the run's recipe
``serve`` section, then the defaults; the export named (``--target``/``target=``, ``serve.target``) or else what the
run ships, and an export named that is not what the run ships is said to be, naming both. Predictions carry what
POST /predict answers (``truncated``)."""

from __future__ import annotations

import shutil
import warnings

import pytest
from serve_helpers import LABELS, serve_cli

import edgekd
from edgekd.errors import ArgumentError, EdgeKDError
from edgekd.export.base import read_artifact_meta, write_artifact_meta
from edgekd.runfolder import RunFolder

LONG = " ".join(["good film and a fine plot"] * 20)  # far more tokens than the export's max_length


_cli = serve_cli


def _with_int8(run, recommended="quantized"):
    """export/onnx-int8 beside export/onnx, the quantize stage recommending ``recommended``."""
    int8 = shutil.copytree(run / "export" / "onnx", run / "export" / "onnx-int8")
    meta = read_artifact_meta(int8)
    meta["target"] = "onnx-int8"
    write_artifact_meta(int8, meta)
    chosen = int8 if recommended == "quantized" else run / "export" / "onnx"
    RunFolder(run).record("quantize", "fp", {"recommended": recommended, "recommended_dir": str(chosen)}, [int8])
    return int8


def test_load_reads_the_runs_serve_section_as_serve_does(monkeypatch, capsys, run_copy):
    """serve.max_length and serve.overflow of the run's recipe: `edgekd serve RUN` read them, edgekd.load(RUN)
    did not (it truncated a text the server refuses)."""
    (run_copy / "recipe.yaml").write_text("name: tiny\nserve:\n  max_length: 8\n  overflow: reject\n")
    code, out, started = _cli(monkeypatch, capsys, run_copy)
    assert code == 0, out
    served = started[0][1]
    model = edgekd.load(run_copy)
    assert (served.max_length, served.overflow) == (8, "reject")
    assert (model.served.codec.max_length, model.served.codec.overflow) == (8, "reject")
    with pytest.raises(EdgeKDError, match=r"longer than 8 tokens and this server rejects long texts \(overflow=reject\)"):
        model.predict(LONG)
    # The arguments come first, as the flags do for the server.
    model = edgekd.load(run_copy, max_length=16, overflow="truncate")
    assert (model.served.codec.max_length, model.served.codec.overflow) == (16, "truncate")
    assert model.predict(LONG)[0].truncated


def test_a_run_whose_recipe_a_later_check_refuses_is_still_served(monkeypatch, capsys, run_copy):
    """Serving reads the serve section alone: a run made before edgekd refused another key of its recipe (here
    prune.quant_aware with no onnx target) is still served by `edgekd serve` and edgekd.load (they validated
    the whole recipe, and refused it); a bad serve key is still named."""
    (run_copy / "recipe.yaml").write_text("name: tiny\nexport:\n  targets: [torchscript-lite]\nquantize:\n  enabled: "
                                          "true\nprune:\n  quant_aware: true\nserve:\n  max_length: 8\n")
    code, out, started = _cli(monkeypatch, capsys, run_copy)
    assert code == 0, out
    assert started[0][1].max_length == 8
    assert edgekd.load(run_copy).served.codec.max_length == 8
    (run_copy / "recipe.yaml").write_text("name: tiny\nserve:\n  max_lenght: 8\n")
    with pytest.raises(EdgeKDError, match=r"serve\.max_lenght"):
        edgekd.load(run_copy)


def test_load_reads_no_serve_variables(monkeypatch, capsys, run_copy):
    """EDGEKD_SERVE_* configure a server: `edgekd serve` reads them, edgekd.load reads none (it read
    EDGEKD_SERVE_OVERFLOW and not EDGEKD_SERVE_MAX_LENGTH)."""
    monkeypatch.setenv("EDGEKD_SERVE_OVERFLOW", "reject")
    monkeypatch.setenv("EDGEKD_SERVE_MAX_LENGTH", "8")
    code, out, started = _cli(monkeypatch, capsys, run_copy)
    assert code == 0 and (started[0][1].overflow, started[0][1].max_length) == ("reject", 8)
    model = edgekd.load(run_copy)
    assert (model.served.codec.overflow, model.served.codec.max_length) == ("truncate", 32)
    assert model.predict(LONG)[0].truncated


def test_load_names_a_bad_argument(run_copy):
    for kwargs, message in [({"threads": 0}, r"threads: Input should be greater than or equal to 1 \(got 0\)"),
                            ({"overflow": "drop"}, r"overflow: Input should be 'truncate' or 'reject' \(got 'drop'\)"),
                            ({"max_length": "8"}, r"max_length: Input should be a valid integer \(got '8'\)")]:
        with pytest.raises(ArgumentError, match=message) as e:
            edgekd.load(run_copy, **kwargs)
        assert "ServeSettings" not in str(e.value) and "validation error" not in str(e.value)
    model = edgekd.load(run_copy)
    with pytest.raises(ArgumentError, match=r"batch_size: Input should be a valid integer \(got '2'\)"):
        model.predict("fine", batch_size="2")


def test_predictions_say_whether_a_text_was_truncated_as_the_server_does(run_copy, make_client):
    texts = [LONG, "a fine film"]
    mine = edgekd.load(run_copy).predict(texts)
    served = make_client(export_dir=run_copy / "export" / "onnx").post("/predict", json={"texts": texts}).json()
    assert [p.truncated for p in mine] == [p["truncated"] for p in served["predictions"]] == [True, False]
    assert [p.label for p in mine] == [p["label"] for p in served["predictions"]] and set(LABELS) >= {mine[0].label}


def test_without_a_target_both_serve_what_the_run_ships_and_say_nothing_more(monkeypatch, capsys, run_copy):
    int8 = _with_int8(run_copy)
    code, out, started = _cli(monkeypatch, capsys, run_copy)
    assert code == 0 and started[0][0] == int8 and "not what the run ships" not in out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert edgekd.load(run_copy).folder == int8


def test_serve_target_in_the_recipe_is_a_named_export_said_to_differ_from_what_ships(monkeypatch, capsys, run_copy):
    """serve.target overrode the shipping rule in `edgekd serve RUN` silently, and edgekd.load ignored it: both
    now serve it, as a target the user named, and say that the run ships another export, naming both."""
    _with_int8(run_copy)
    (run_copy / "recipe.yaml").write_text("name: tiny\nserve:\n  target: onnx\n")
    code, out, started = _cli(monkeypatch, capsys, run_copy)
    assert code == 0 and started[0][0] == run_copy / "export" / "onnx"
    assert (f"serving onnx (serve.target: onnx in {run_copy / 'recipe.yaml'}), not what the run ships: onnx-int8 "
            "(the quantize stage's recommendation (quantized))") in out
    with pytest.warns(UserWarning, match=r"serving onnx \(serve\.target: onnx in .*recipe\.yaml\), not what the run "
                                         r"ships: onnx-int8"):
        model = edgekd.load(run_copy)
    assert model.target == "onnx"
    # A target given names it too, over the recipe's.
    code, out, started = _cli(monkeypatch, capsys, run_copy, "--target", "onnx-int8")
    assert started[0][0] == run_copy / "export" / "onnx-int8" and "not what the run ships" not in out
    code, out, _ = _cli(monkeypatch, capsys, run_copy, "--target", "onnx")
    assert "serving onnx (--target onnx), not what the run ships: onnx-int8" in out
    with pytest.warns(UserWarning, match=r"serving onnx \(target='onnx'\), not what the run ships: onnx-int8"):
        edgekd.load(run_copy, "onnx")


def test_several_exports_and_no_recommendation_each_caller_is_told_its_own_way_to_choose(monkeypatch, capsys,
                                                                                         run_copy):
    """Nothing ships on its own where a run holds two exports and no quantize recommendation: `edgekd serve`
    says to choose with --target, edgekd.load with target= (it said --target, a flag load has not)."""
    int8 = shutil.copytree(run_copy / "export" / "onnx", run_copy / "export" / "onnx-int8")
    meta = read_artifact_meta(int8)
    meta["target"] = "onnx-int8"
    write_artifact_meta(int8, meta)
    code, out, started = _cli(monkeypatch, capsys, run_copy)
    assert code != 0 and not started and "choose one with --target" in " ".join(out.split())
    with pytest.raises(EdgeKDError, match=r"choose one with target=") as e:
        edgekd.load(run_copy)
    assert "--target" not in str(e.value)
    assert edgekd.load(run_copy, "onnx-int8").folder == int8


def test_a_serve_target_the_run_lacks_names_the_recipe_key(run_copy):
    (run_copy / "recipe.yaml").write_text("name: tiny\nserve:\n  target: tflite\n")
    with pytest.raises(EdgeKDError, match=r"has no export 'tflite'; exports there: onnx \(serve\.target: tflite in "
                                          r".*recipe\.yaml\): set serve\.target to one of them, or remove it"):
        edgekd.load(run_copy)


def test_the_detection_default_recipe_names_no_serve_target():
    """It named onnx, from before serving had a shipping rule (several exports were an error then): with a
    quantize stage that ships int8, `edgekd serve runs/detect-default` served the float file."""
    from edgekd.recipe import load_recipe

    assert load_recipe("detect-default").serve.target is None
