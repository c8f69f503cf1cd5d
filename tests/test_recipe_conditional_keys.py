"""Keys that one setting of the same recipe switches off are refused, naming the key and that setting; the
same keys are accepted where the setting lets something read them. And the recipe reference documents the
defaults a recipe really gets.

tests/test_recipe_unread_keys.py covers keys that need another setting to be read at all; these cover
settings that stop something reading keys (a loss weight of 0, one attempt, one augmentation op, a dataset
that brings its own splits, an export target left out).
"""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest

from edgekd.errors import DataError, RecipeError
from edgekd.recipe import AugmentConfig, QuantizeConfig, Recipe, load_recipe, reference_markdown
from edgekd.recipe_check import check_inputs
from edgekd.sections import changed_keys

NO_QUANT_AWARE = "prune.quant_aware=false"  # the default's int8-aware recovery reads quantize keys of its own
NO_PRUNE = ["prune.enabled=false", "prune.keep_params=null", "prune.trim_vocab=false", "prune.vocab_keep_first=0",
            NO_QUANT_AWARE]


def _refused(base: str, overrides: list[str]) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(base, overrides)
    return str(e.value)


# --- a soft-target term weighed by 0 (edgekd.losses.soft_hard_loss is plain cross-entropy at alpha 0) -----


def test_at_alpha_0_the_loss_reads_no_temperature_and_no_kl_direction():
    import torch

    from edgekd.losses import soft_hard_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    labels = torch.randint(0, 3, (8,), generator=g)
    losses = {float(soft_hard_loss(student, teacher, labels, 0.0, t, kind)[0])
              for t in (1.0, 4.0) for kind in ("forward", "reverse")}
    assert len(losses) == 1  # the same loss whatever the temperature and the direction
    assert len({float(soft_hard_loss(student, teacher, labels, 0.5, t)[0]) for t in (1.0, 4.0)}) == 2


DISTILL_SOFT = ("shape(s) the soft-target term of the distillation loss, and distill.alpha is 0 (the student learns "
                "the labels alone, plain cross-entropy)")
RECOVERY_SOFT = "shape(s) the soft-target term of the recovery's loss, and its weight is 0"


@pytest.mark.parametrize(("overrides", "message"), [
    (["distill.alpha=0", "distill.temperature=4", "distill.kl=reverse"],
     f"distill.temperature, distill.kl: {DISTILL_SOFT}"),
    # the recovery weighs its soft targets, at its own temperature: it reads the KL direction alone
    (["distill.alpha=0", "distill.temperature=4", "distill.kl=reverse", "prune.recover_alpha=0.5",
      "prune.recover_temperature=3"], f"distill.temperature: {DISTILL_SOFT}"),
    # the prune stage is off: its recovery's weight reads nothing
    (["distill.alpha=0", "distill.temperature=4", "prune.recover_alpha=0.5", *NO_PRUNE],
     f"distill.temperature: {DISTILL_SOFT}"),
    (["distill.alpha=0", "distill.rounds=2"],
     "distill.rounds: 2 born-again rounds each learn the previous round's soft targets, and distill.alpha is 0"),
    (["prune.recover_alpha=0", "prune.recover_temperature=3", "prune.recover_soft_targets=unpruned"],
     f"prune.recover_temperature, prune.recover_soft_targets: {RECOVERY_SOFT} (prune.recover_alpha is 0: "),
    (["distill.alpha=0", "prune.recover_temperature=3"],
     f"prune.recover_temperature: {RECOVERY_SOFT} (prune.recover_alpha is unset and distill.alpha is 0: "),
])
def test_soft_target_keys_are_refused_where_their_loss_weighs_soft_targets_by_0(overrides, message):
    assert message in _refused("default", overrides)


@pytest.mark.parametrize("overrides", [
    # a recovery with soft targets reads distill.kl, and distill.temperature while recover_temperature is unset
    ["distill.alpha=0", "distill.temperature=4", "distill.kl=reverse", "prune.recover_alpha=0.5"],
    # ... and so does one that only scores importance with the recovery's loss
    ["distill.alpha=0", "distill.temperature=4", "prune.recover_alpha=0.5", "prune.recover_epochs=0",
     "prune.score_loss=recovery", NO_QUANT_AWARE],
    # matching reads no alpha: each born-again round matches the previous student's hidden states or attention
    ["distill.alpha=0", "distill.rounds=2", "distill.hidden_weight=1.0"],
    ["distill.alpha=0", "distill.rounds=2", "distill.attention_weight=0.5"],
    ["distill.alpha=0", "distill.hidden_weight=1.0", "distill.attention_weight=0.5", "distill.hidden_loss=mse"],
    ["prune.recover_alpha=0", "prune.recover_hidden_weight=1.0"],
    # a weight above 0 reads them all
    ["distill.alpha=0.3", "distill.temperature=4", "distill.kl=reverse", "distill.rounds=2"],
    ["prune.recover_alpha=0.2", "prune.recover_temperature=3", "prune.recover_soft_targets=unpruned"],
    ["distill.alpha=0", "prune.recover_alpha=0.2", "prune.recover_temperature=3"],
])
def test_the_same_keys_are_accepted_where_a_loss_reads_them(overrides):
    load_recipe("default", overrides)


def test_a_detector_reads_the_temperature_whatever_distill_alpha_says():
    # its KD terms take distill.temperature; distill.alpha itself is the key it refuses
    recipe = load_recipe("detect-default", ["distill.alpha=0", "distill.temperature=4"])
    assert [p.split(":")[0] for p in check_inputs(recipe)] == ["distill.alpha"]


# --- the quantize section against export.targets ----------------------------------------------------------


SEARCH = ["prune.keep_params=null", "prune.max_accuracy_drop=0.01"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["export.targets=[coreml]", "quantize.method=static", "quantize.per_channel=true", "quantize.speed_runs=9",
      "quantize.embedding_bits=8", "quantize.candidates=[]", NO_QUANT_AWARE],
     "quantize.method, quantize.per_channel, quantize.speed_runs: shape(s) the ONNX quantization of export/onnx, and "
     "onnx is not in export.targets, so the quantize stage only compresses the Core ML export: add onnx to "
     "export.targets or remove them"),
    # a prune search times the section's own setup: only what the quantize stage alone reads is refused
    (["export.targets=[coreml]", *SEARCH, "quantize.per_channel=true", "quantize.max_attempts=2", NO_QUANT_AWARE],
     "quantize.candidates, quantize.max_attempts: shape(s) the ONNX quantization of export/onnx, and onnx is not in "
     "export.targets, so the quantize stage only compresses the Core ML export, and the prune search's timed form, "
     "quantized as the section says, does without them"),
    (["export.targets=[onnx]", "quantize.coreml_mode=palettize", "quantize.palette_bits=4"],
     "quantize.coreml_mode, quantize.palette_bits: shape(s) the Core ML compression of export/coreml, and coreml is "
     "not in export.targets"),
])
def test_quantize_keys_of_a_target_not_exported_are_refused(overrides, message):
    assert message in _refused("default", overrides)


CORE_ML_ONLY = ["export.targets=[coreml]", "quantize.candidates=[]", "quantize.embedding_bits=8"]  # (the default's
# other quantize keys shape the ONNX quantization)


@pytest.mark.parametrize("targets", ["[coreml]", "[torchscript-lite, executorch]", "[]"])
def test_int8_aware_recovery_is_refused_without_an_onnx_export(targets):
    """prune.quant_aware trains for the dynamic int8 file the quantize stage makes of export/onnx; Core ML's
    compression, TensorRT's int8 (from a static Q/DQ model) and a prune search's timed form are not it."""
    assert ("prune.quant_aware: it trains for the int8 file the quantize stage makes of the ONNX export, and onnx is "
            "not in export.targets, so no such file is made (add onnx to export.targets), or turn it off") in _refused(
        "default", [*CORE_ML_ONLY, f"export.targets={targets}"])
    assert ("prune.quant_aware" in _refused("default", [*CORE_ML_ONLY, f"export.targets={targets}", *SEARCH]))
    load_recipe("default", [*CORE_ML_ONLY, f"export.targets={targets}", NO_QUANT_AWARE,
                            *(["quantize.enabled=false"] if "coreml" not in targets else [])])
    load_recipe("default", [f"export.targets=[onnx, {targets.strip('[]') or 'coreml'}]"])


def test_an_enabled_quantize_stage_is_refused_with_neither_an_onnx_nor_a_core_ml_export():
    """The quantize stage quantizes export/onnx and compresses export/coreml; with neither it stopped with an
    error only when it ran, after every stage before it."""
    for targets in ("[executorch, tensorrt]", "[]"):
        assert ("quantize.enabled: the quantize stage quantizes the ONNX export (export/onnx) and compresses the Core "
                "ML one (export/coreml), and neither onnx nor coreml is in export.targets, so it has nothing to "
                "quantize: add onnx (or coreml) to export.targets, or set quantize.enabled: false") in _refused(
            "default", [*CORE_ML_ONLY, f"export.targets={targets}", NO_QUANT_AWARE])
        load_recipe("default", [*CORE_ML_ONLY, f"export.targets={targets}", NO_QUANT_AWARE, "quantize.enabled=false"])
    load_recipe("default", [*CORE_ML_ONLY, NO_QUANT_AWARE])  # coreml alone: compressed
    load_recipe("default", ["export.targets=[onnx]"])


@pytest.mark.parametrize("targets", ["[torchscript-lite]", "[coreml]", "[executorch, tensorrt]"])
def test_a_one_off_set_of_targets_is_checked_with_the_recipes_own(targets):
    """`edgekd export RUN --to ...` exports other targets for one command: the run still makes its int8 file of
    export/onnx, so quant_aware, the quantize stage and its ONNX keys stay read (the default sets all three)."""
    recipe = load_recipe("default", [], [f"export.targets={targets}"])
    assert recipe.export.targets == targets.strip("[]").split(", ")
    assert "onnx" in recipe.exported_targets() and recipe.prune.quant_aware
    assert load_recipe("default").exported_targets() == load_recipe("default").export.targets
    # a one-off ONNX export makes the file (the recipe alone is refused: saving it, edgekd.run_recipe loads it so)
    assert load_recipe("default", CORE_ML_ONLY, ["export.targets=[onnx]"]).exported_targets() == ["onnx", "coreml"]
    # a one-off key is checked like any other
    with pytest.raises(RecipeError, match=re.escape("prune.quant_aware: it trains for the int8 file")):
        load_recipe("default", [*CORE_ML_ONLY, NO_QUANT_AWARE], ["prune.quant_aware=true"])
    with pytest.raises(RecipeError, match=re.escape("quantize.coreml_mode: shape(s) the Core ML compression")):
        load_recipe("default", ["export.targets=[onnx]"], ["quantize.coreml_mode=palettize"])


@pytest.mark.parametrize("overrides", [
    ["export.targets=[coreml]", *SEARCH, "quantize.per_channel=true", "quantize.candidates=[]", NO_QUANT_AWARE],
    ["export.targets=[onnx, coreml]", "quantize.coreml_mode=palettize", "quantize.palette_bits=4",
     "quantize.speed_runs=9"],
    ["export.targets=[coreml]", "quantize.coreml_mode=palettize", "quantize.candidates=[]", "quantize.embedding_bits=8",
     NO_QUANT_AWARE],
    # a disabled quantize section keeps its keys
    ["export.targets=[executorch]", "quantize.enabled=false", "quantize.coreml_mode=palettize", NO_QUANT_AWARE],
])
def test_quantize_keys_of_an_exported_target_are_accepted(overrides):
    load_recipe("default", overrides)


def test_the_keys_a_search_reads_include_every_one_it_fingerprints():
    from edgekd.recipe import _ONNX_STAGE_ONLY
    from edgekd.stages.prune_common import TIMED_FORM_KEYS

    assert set(_ONNX_STAGE_ONLY) <= set(QuantizeConfig.model_fields)
    assert not set(_ONNX_STAGE_ONLY) & set(TIMED_FORM_KEYS)


def test_onnx_export_options_need_the_onnx_target_or_a_prune_search():
    options = {"targets": ["torchscript-lite"], "options": {"onnx": {"optimize": True}}}
    with pytest.raises(ValueError, match=re.escape(
            "export.options.onnx: 'onnx' is not in export.targets, and no prune search (prune.target_latency_ms or "
            "max_accuracy_drop) exports ONNX with them, so nothing would read these options")):
        Recipe.model_validate({"export": options})
    with pytest.raises(ValueError, match="export.options.onnx"):  # a search of a disabled prune stage reads nothing
        Recipe.model_validate({"export": options, "prune": {"max_accuracy_drop": 0.01}})
    Recipe.model_validate({"export": options, "prune": {"enabled": True, "max_accuracy_drop": 0.01}})
    Recipe.model_validate({"export": options, "prune": {"enabled": True, "target_latency_ms": 3.0}})
    Recipe.model_validate({"export": {**options, "targets": ["onnx"]}})


# --- the accuracy guard's retries --------------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "message"), [
    ({"max_attempts": 1, "max_float_nodes": 4, "sensitivity_examples": 10},
     "quantize.max_float_nodes, quantize.sensitivity_examples shape(s) the accuracy guard's retries"),
    ({"max_attempts": 1, "sensitivity_examples": 10}, "quantize.sensitivity_examples shape(s) the accuracy guard's"),
    ({"max_float_nodes": 0, "max_attempts": 6, "sensitivity_examples": 10},
     "quantize.max_attempts, quantize.sensitivity_examples shape(s) the accuracy guard's retries"),
    ({"max_attempts": 1, "max_float_nodes": 0}, "quantize.max_float_nodes shape(s)"),
])
def test_the_guards_retry_keys_are_refused_where_it_never_retries(keys, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantizeConfig(enabled=True, **keys)


@pytest.mark.parametrize("keys", [
    {"max_attempts": 1}, {"max_float_nodes": 0}, {"max_attempts": 2, "max_float_nodes": 3, "sensitivity_examples": 10},
])
def test_the_guards_retry_keys_are_accepted_where_it_retries(keys):
    QuantizeConfig(enabled=True, **keys)


# --- one augmentation op, one client try -------------------------------------------------------------------


def test_an_augmentation_setting_of_an_op_not_used_is_refused():
    with pytest.raises(ValueError, match=re.escape("delete_prob: sets how op delete perturbs a copy, and ops has no "
                                                   "delete (crop), so nothing reads it")):
        AugmentConfig(copies=1, ops=["crop"], delete_prob=0.5)
    with pytest.raises(ValueError, match=re.escape("crop: sets how op crop perturbs a copy, and ops has no crop")):
        AugmentConfig(copies=1, ops=["delete"], crop=(0.2, 0.3))
    AugmentConfig(copies=1, ops=["crop"], crop=(0.2, 0.3))
    AugmentConfig(copies=1, ops=["delete"], delete_prob=0.5)
    AugmentConfig(copies=1, ops=["crop", "delete"], crop=(0.2, 0.3), delete_prob=0.5)


V2 = ["teacher.kind=v2", "teacher.url=http://teacher:8000", "teacher.model_name=m", "teacher.augment.copies=0"]


def test_the_waits_between_tries_are_refused_with_one_try():
    assert ("client.backoff_s, client.max_backoff_s: the wait(s) between tries of a request, and "
            "client.max_attempts is 1 (no request is retried)") in _refused(
        "default", [*V2, "teacher.client.max_attempts=1", "teacher.client.backoff_s=3",
                    "teacher.client.max_backoff_s=9"])
    load_recipe("default", [*V2, "teacher.client.max_attempts=2", "teacher.client.backoff_s=3"])
    load_recipe("default", [*V2, "teacher.client.max_attempts=1", "teacher.client.timeout_s=5"])


# --- a dataset that brings its own splits ------------------------------------------------------------------


def _examples(splits: tuple[str, ...]):
    from edgekd.examples import Examples

    n = 60
    rows = np.arange(n)
    parts = dict(zip(("train", "validation", "test"), np.array_split(rows, 3), strict=True))
    return Examples([f"text {i}" for i in range(n)], rows % 2, ["neg", "pos"], source="hf-dataset:owner/name@abc",
                    predefined_splits={k: v for k, v in parts.items() if k in splits})


def test_the_share_of_a_split_the_dataset_brings_is_refused():
    from edgekd.recipe import SplitConfig
    from edgekd.splits import split_examples

    with pytest.raises(DataError, match=re.escape(
            "data.split.validation, data.split.test: the share(s) of a split carved out of the training rows, and "
            "hf-dataset:owner/name@abc brings its own validation and test split(s), kept as they are")):
        split_examples(_examples(("train", "validation", "test")), SplitConfig(validation=0.2, test=0.3))
    with pytest.raises(DataError, match=re.escape("data.split.validation: ")):
        split_examples(_examples(("train", "validation")), SplitConfig(validation=0.2, test=0.3))
    # the fraction of a split it lacks is read: that split is carved out of train
    s = split_examples(_examples(("train", "validation")), SplitConfig(test=0.3, seed=5))
    assert len(s.test) == 6 and "test carved from train" in s.method
    # at their defaults, and the seed (the quantize stage's calibration sample draws with it), nothing refused
    split_examples(_examples(("train", "validation", "test")), SplitConfig(seed=5))


def test_the_seed_is_refused_where_the_dataset_brings_every_split_and_nothing_else_draws_with_it():
    """With train, validation and test of its own and no cut of the training split, the splitter draws nothing
    with data.split.seed; only a calibration sample still could (``calibrates``, which the run says)."""
    from edgekd.recipe import SplitConfig
    from edgekd.splits import split_examples

    every = ("train", "validation", "test")
    with pytest.raises(DataError, match=re.escape(
            "data.split.seed: the seed of the shuffle that carves splits out of the training rows, and "
            "hf-dataset:owner/name@abc brings its own validation and test split(s), kept as they are (and no "
            "data.max_train_examples or calibration sample draws with the seed), so nothing reads it: remove it")):
        split_examples(_examples(every), SplitConfig(seed=5), calibrates=False)
    with pytest.raises(DataError, match=re.escape("data.split.test, data.split.seed: the share(s) of a split carved "
                                                  "out of the training rows and the seed of that shuffle, and ")):
        split_examples(_examples(every), SplitConfig(test=0.3, seed=5), calibrates=False)
    # read: by a calibration sample, by a cut of the training split, by a split carved out of train; unknown: kept
    split_examples(_examples(every), SplitConfig(seed=5), calibrates=True)
    split_examples(_examples(every), SplitConfig(seed=5), calibrates=None)
    s = split_examples(_examples(every), SplitConfig(seed=5), max_train_examples=10, calibrates=False)
    assert len(s.train) == 10
    split_examples(_examples(("train", "validation")), SplitConfig(seed=5), calibrates=False)
    split_examples(_examples(every), SplitConfig(), calibrates=False)  # at its default


def test_a_run_refuses_the_seed_of_a_hub_dataset_with_every_split_unless_it_calibrates(tmp_path):
    """The run context tells the splitter whether the quantize stage draws a calibration sample (static or
    smooth_alpha over the ONNX export, the recipe's own targets counting where one command exports others)."""
    from edgekd.pipeline import create_context

    def splits(overrides, one_off=None):
        recipe = load_recipe("default", [f"output_dir={tmp_path}", *overrides], one_off)
        ctx = create_context(recipe)
        ctx.__dict__["examples"] = _examples(("train", "validation", "test"))  # what the hub id brought
        return ctx.splits

    hub = ["data.dataset=owner/name", "data.split.seed=5"]
    with pytest.raises(DataError, match=re.escape("data.split.seed: the seed of the shuffle")):
        splits(hub)  # the default quantizes dynamic: no calibration sample
    splits([*hub, "quantize.smooth_alpha=0.5"])  # its calibration sample draws with the seed
    splits([*hub, "data.max_train_examples=10"])
    # a one-off export of other targets leaves the run's ONNX quantization (and its calibration) in place
    splits([*hub, "quantize.smooth_alpha=0.5"], ["export.targets=[executorch]"])
    # a named dataset read with data.source auto may fall back to its mirror, whose split reads the seed
    splits(["data.split.seed=5"])


def test_the_hub_copy_of_a_named_dataset_refuses_the_split_keys_up_front():
    hub = ["data.source=hub", "data.split.validation=0.2", "data.split.seed=3"]
    assert check_inputs(load_recipe("default", hub)) == [
        "data.split.validation, data.split.seed: cut(s) splits out of the training rows, and 'rotten-tomatoes' from "
        "the hub (data.source: hub) brings its own validation and test split(s), kept as they are (and no "
        "data.max_train_examples or calibration sample draws with the seed): remove them, or set data.source: mirror "
        "(the pinned copy, which has no splits)"]
    # the seed draws the quantize stage's calibration sample (smooth_alpha), or a cut of the training split
    for reads_seed in ("quantize.smooth_alpha=0.5", "data.max_train_examples=100"):
        assert [p.split(":")[0] for p in check_inputs(load_recipe("default", [*hub, reads_seed]))] == [
            "data.split.validation"]
    # the mirror has no splits of its own; auto may fall back to it (the split stage refuses them then)
    for source in ("mirror", "auto"):
        assert check_inputs(load_recipe("default", [f"data.source={source}", *hub[1:]])) == []


# --- the reference's defaults ------------------------------------------------------------------------------


def _documented_defaults() -> dict[str, object]:
    rows = re.findall(r"^\| `([^`]+)` \| `(.*?)` \| ", reference_markdown(), flags=re.M)
    return {key: ast.literal_eval(value) for key, value in rows}


def test_every_documented_default_is_the_one_a_recipe_gets():
    documented = _documented_defaults()
    assert len(documented) > 100
    recipe, dumped = Recipe(), Recipe().model_dump()
    for key, value in documented.items():
        node, dump = recipe, dumped
        for part in key.split("."):
            node = getattr(node, part)
            dump = dump.get(part) if isinstance(dump, dict) else None
        assert node == value, key
        if key != "distill.train.ema_decay" and not key.endswith("finetune.ema_decay"):  # left out while unset
            assert dump == value, key
    # the nested sections whose enclosing field sets its own defaults
    assert documented["teacher.finetune.epochs"] == 2.0 and documented["distill.train.lr"] == 1e-4
    assert documented["distill.train.epochs"] == 3


def test_a_recipe_that_writes_every_documented_default_sets_nothing():
    data: dict = {}
    for key, value in _documented_defaults().items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    recipe = Recipe.model_validate(data)
    assert changed_keys(recipe) == []
    assert recipe.model_dump() == Recipe().model_dump()
