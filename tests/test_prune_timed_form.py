"""The prune search times each round as an ONNX file in ONNX Runtime (edgekd.stages.prune_common): a latency
target where the run ships no ONNX is refused before any stage runs, for both task families, and the record
and the console say which form the search timed (float, or the quantize section's own setup, which the
quantize stage's guards may still not ship)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgekd.errors import RecipeError
from edgekd.recipe import PruneConfig, load_recipe
from edgekd.recipe_check import check_inputs

# A latency target on each family's built-in recipe (its quantize stage off: it needs onnx or coreml).
SEARCH = {"default": ["prune.keep_params=null", "prune.steps=null", "prune.target_latency_ms=0.6",
                      "quantize.enabled=false", "prune.quant_aware=false"],
          "detect-default": ["prune.keep_params=null", "prune.steps=null", "prune.target_latency_ms=0.6",
                             "quantize.enabled=false"]}
REFUSED = "prune.target_latency_ms: the prune search times each round as an ONNX file in ONNX Runtime"


@pytest.mark.parametrize("recipe", ["default", "detect-default"])
@pytest.mark.parametrize("targets", ["[torchscript-lite]", "[executorch]", "[coreml]", "[executorch, coreml]"])
def test_a_latency_target_without_an_onnx_target_is_refused_before_any_stage(recipe, targets):
    from edgekd.api import check_up_front

    r = load_recipe(recipe, [*SEARCH[recipe], f"export.targets={targets}"])
    problems = check_inputs(r)
    assert [p for p in problems if p.startswith("prune.target_latency_ms")] == [
        f"{REFUSED}, and onnx is not in export.targets, so the search would meet the target on a file that does "
        "not ship: add onnx to export.targets, or drop prune.target_latency_ms (prune to prune.keep_params, or "
        "within prune.max_accuracy_drop) and check the shipped file's latency with `edgekd bench`"]
    with pytest.raises(RecipeError, match="prune.target_latency_ms"):
        check_up_front(r)  # what every stage command runs before the first stage


@pytest.mark.parametrize("recipe", ["default", "detect-default"])
def test_a_latency_target_is_accepted_where_onnx_ships_or_the_search_is_an_accuracy_budget(recipe):
    def refused(*extra: str, one_off: list[str] | None = None) -> bool:
        r = load_recipe(recipe, [*SEARCH[recipe], *extra], one_off)
        return any(p.startswith("prune.target_latency_ms") for p in check_inputs(r))

    assert not refused("export.targets=[onnx]")
    assert not refused("export.targets=[onnx, torchscript-lite]")
    # a one-off `edgekd export RUN --to coreml` exports coreml for once: the run still ships its own onnx
    assert not refused("export.targets=[onnx]", one_off=["export.targets=[coreml]"])
    # no latency target: an accuracy budget alone stops on validation, which every target honours
    assert not refused("export.targets=[torchscript-lite]", "prune.target_latency_ms=null",
                       "prune.max_accuracy_drop=0.02")
    # prune off: nothing searches
    trim = ["prune.trim_vocab=false", "prune.vocab_keep_first=0"] if recipe == "default" else []
    assert not refused("export.targets=[torchscript-lite]", "prune.enabled=false", *trim)


def test_the_refusal_is_the_recipes_not_a_one_off_flags():
    """The recipe alone is refused for the same reason, so a one-off --to is not blamed for it."""
    alone = check_inputs(load_recipe("detect-default", [*SEARCH["detect-default"], "export.targets=[executorch]"]))
    with_flag = check_inputs(load_recipe("detect-default", [*SEARCH["detect-default"], "export.targets=[executorch]"],
                                         ["export.targets=[coreml]"]))
    refusal = [p for p in with_flag if p.startswith("prune.target_latency_ms")]
    assert refusal and refusal[0] in alone


def _latency_fn(recipe):
    from edgekd.stages.prune_common import shipped_latency_fn

    return shipped_latency_fn(SimpleNamespace(recipe=recipe, task=SimpleNamespace(model_io=lambda: None)), {"images": np.zeros((2, 3, 8, 8))})


def test_the_search_records_and_says_which_form_it_times():
    base = ["prune.keep_params=null", "prune.steps=null", "prune.target_latency_ms=0.6", "export.targets=[onnx]"]
    quantized = _latency_fn(load_recipe("detect-default", [*base, "quantize.method=static"]))
    assert quantized.form.startswith("the ONNX export quantized with the quantize section's own setup (static/")
    assert "guards may still not ship" in quantized.form
    assert quantized.where.startswith("this machine (bench profile 'local')")
    plain = _latency_fn(load_recipe("detect-default", [*base, "quantize.enabled=false"]))
    assert plain.form == "the fp32 ONNX export"
    budget = _latency_fn(load_recipe("detect-default", [
        "prune.keep_params=null", "prune.steps=null", "prune.max_accuracy_drop=0.02", "quantize.enabled=false",
        "export.targets=[torchscript-lite]"]))
    assert budget.form == ("the fp32 ONNX export; onnx is not in export.targets, so these times are not the "
                           "shipped file's")


def test_the_prune_record_and_console_line_name_the_timed_form(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from edgekd.pruning import PruneContext, count_params, prune_model
    from edgekd.stages.prune_common import say_search
    from edgekd.testing import tiny_bert

    def latency(m):
        return count_params(m) / 1e9

    latency.where = "this machine (bench profile 'local'), ONNX Runtime on 1 thread(s)"
    latency.form = "the ONNX export quantized with the quantize section's own setup (static/minmax)"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert(tmp_path / "bert", num_labels=2)).eval()
    cfg = PruneConfig(enabled=True, target_latency_ms=1e-12, steps=1, importance="magnitude")
    _, m = prune_model(model, cfg, PruneContext(latency_fn=latency))
    assert m["latency_timed_form"] == latency.form and m["latency_timed_on"] == latency.where
    said: list[str] = []
    say_search(SimpleNamespace(say=said.append), cfg, m)
    line = " ".join(said)
    assert ("Rounds timed as the ONNX export quantized with the quantize section's own setup (static/minmax), on "
            "this machine (bench profile 'local'), ONNX Runtime on 1 thread(s)") in line
    assert "NOT met" in line and "(timed form:" in line and "shipped form" not in line
