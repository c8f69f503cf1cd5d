"""The pruning searches: accuracy-budgeted (prune.max_accuracy_drop) and latency (target_latency_ms
looping until met by default), the final recovery, and the recipe checks around them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgekd.errors import StageError
from edgekd.pruning import Encoder, PruneContext, count_params, prune_model
from edgekd.recipe import PruneConfig


@pytest.fixture
def model(tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()


def cfg(**kw) -> PruneConfig:
    return PruneConfig(enabled=True, importance="magnitude", **kw)


def scripted_accuracy(params0: int, per_share: float):
    """Validation accuracy that falls by ``per_share`` for each 1% of the parameters removed."""
    return lambda m: {"accuracy": 0.9 - per_share * 100 * (1 - count_params(m) / params0)}


def test_accuracy_budget_keeps_the_last_round_in_budget_and_undoes_the_first_over_it(model):
    params0 = count_params(model)
    ev = scripted_accuracy(params0, 0.001)
    shapes = []

    def recover(m, step):
        shapes.append((Encoder(m).heads(), Encoder(m).neurons(), count_params(m)))
        return m

    pruned, m = prune_model(model, cfg(max_accuracy_drop=0.03, latency_step=0.2),
                            PruneContext(evaluate=ev, recover=recover, latency_fn=lambda mm: count_params(mm) / 1e4))
    steps = m["steps"]
    assert len(steps) >= 2 and steps[-1]["in_budget"] is False and all(s["in_budget"] for s in steps[:-1])
    assert m["kept_step"] == len(steps) - 1 and "undone" in m["stopped"]
    # The model returned is the one after the last in-budget round, not the over-budget one.
    heads, neurons, params = shapes[m["kept_step"] - 1]
    assert Encoder(pruned).heads() == heads and Encoder(pruned).neurons() == neurons
    assert count_params(pruned) == params == steps[m["kept_step"] - 1]["params"]
    assert 0.9 - ev(pruned)["accuracy"] <= 0.03 < 0.9 - steps[-1]["metric"]["accuracy"]
    assert m["metric_after"] == steps[m["kept_step"] - 1]["metric"] and m["target_reached"]
    assert all("latency_ms" in s for s in steps) and m["latency_ms_after"] == steps[m["kept_step"] - 1]["latency_ms"]


def test_accuracy_budget_exceeded_by_the_first_round_keeps_the_model_unchanged(model):
    params0 = count_params(model)
    before = copy.deepcopy(model.state_dict())
    pruned, m = prune_model(model, cfg(max_accuracy_drop=0.001, latency_step=0.3),
                            PruneContext(evaluate=scripted_accuracy(params0, 0.01)))
    assert m["kept_step"] == 0 and not m["target_reached"] and count_params(pruned) == params0
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in before.items())


def test_accuracy_budget_needs_an_evaluation_with_the_metric(model):
    with pytest.raises(StageError, match="evaluation"):
        prune_model(model, cfg(max_accuracy_drop=0.01), PruneContext())
    with pytest.raises(StageError, match="no 'accuracy'"):
        prune_model(model, cfg(max_accuracy_drop=0.01), PruneContext(evaluate=lambda m: {"f1": 1.0}))


def test_latency_target_loops_until_met_without_a_step_count(model):
    latency = lambda m: count_params(m) / 10_000  # noqa: E731
    target = latency(model) * 0.8  # several 10% rounds away (each also takes a head a layer: about 12%)
    pruned, m = prune_model(model, cfg(target_latency_ms=target), PruneContext(latency_fn=latency))
    assert m["target_reached"] and m["latency_ms_after"] <= target and len(m["steps"]) > 1
    assert "<= prune.target_latency_ms" in m["stopped"]


def test_latency_target_out_of_reach_stops_at_the_floors_and_says_so(model):
    pruned, m = prune_model(model, cfg(target_latency_ms=1e-6, latency_step=0.5),
                            PruneContext(latency_fn=lambda m: 5.0))
    assert not m["target_reached"] and "floors" in m["stopped"]
    enc = Encoder(pruned)
    assert enc.heads() == [1] * len(enc.heads())  # prune.min_heads_per_layer


def test_latency_and_budget_together_stop_at_the_budget_and_fail_the_latency_target(model):
    params0 = count_params(model)
    pruned, m = prune_model(model, cfg(target_latency_ms=1e-6, max_accuracy_drop=0.05, latency_step=0.2),
                            PruneContext(evaluate=scripted_accuracy(params0, 0.003), latency_fn=lambda mm: 5.0))
    assert "max_accuracy_drop" in m["stopped"] and not m["target_reached"]
    assert m["target"] == {"latency_ms": 1e-6, "max_accuracy_drop": 0.05}


def test_final_recovery_runs_once_on_the_kept_model(model):
    params0 = count_params(model)
    calls = []

    def final(m: nn.Module) -> nn.Module:
        calls.append(count_params(m))
        return m

    pruned, m = prune_model(model, cfg(max_accuracy_drop=0.03, latency_step=0.2, final_recover_epochs=1.0),
                            PruneContext(evaluate=scripted_accuracy(params0, 0.001), recover_final=final))
    assert calls == [count_params(pruned)] and m["final_recovery"]["metric"] == m["metric_after"]
    with pytest.raises(StageError, match="recover_final"):
        prune_model(copy.deepcopy(pruned), cfg(max_accuracy_drop=0.5, latency_step=0.1, final_recover_epochs=1.0),
                    PruneContext(evaluate=scripted_accuracy(params0, 0.0)))


def test_fixed_targets_still_take_one_step_by_default(model):
    _, m = prune_model(model, cfg(keep_params=0.7), PruneContext())
    assert len(m["steps"]) == 1 and "stopped" not in m


def test_search_recipe_checks():
    with pytest.raises(ValueError, match="give one pruning target"):
        PruneConfig(enabled=True, keep_params=0.5, max_accuracy_drop=0.01)
    with pytest.raises(ValueError, match="final_recover_epochs follows a search"):
        PruneConfig(enabled=True, keep_params=0.5, final_recover_epochs=1)
    with pytest.raises(ValueError, match="recover_hidden_weight"):
        PruneConfig(enabled=True, method="channels", keep_params=0.5, recover_hidden_weight=1.0)
    with pytest.raises(ValueError, match="not 'unstructured'"):
        PruneConfig(enabled=True, method="unstructured", max_accuracy_drop=0.01)
    PruneConfig(enabled=True, target_latency_ms=2.0, max_accuracy_drop=0.01, final_recover_epochs=1)


def test_the_fingerprinted_settings_of_an_old_recipe_do_not_change():
    from edgekd.stages.prune_common import prune_settings

    d = prune_settings(PruneConfig(enabled=True, keep_params=0.5, recover_epochs=2))
    assert d["steps"] == 1 and not {"trim_vocab", "max_accuracy_drop", "recover_hidden_weight"} & set(d)
    assert prune_settings(PruneConfig(enabled=True, keep_params=0.5, trim_vocab=True))["trim_vocab"] is True
    assert prune_settings(PruneConfig(enabled=True, target_latency_ms=2.0))["steps"] is None


def test_detection_channels_search_with_a_latency_target():
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    x = torch.randn(1, 3, 16, 16)
    latency = lambda m: count_params(m) / 1000  # noqa: E731
    target = latency(net) * 0.6
    pruned, m = prune_model(net, PruneConfig(enabled=True, method="channels", importance="magnitude",
                                             target_latency_ms=target, latency_step=0.2),
                            PruneContext(example_inputs=x, latency_fn=latency))
    assert m["target_reached"] and len(m["steps"]) > 1 and pruned(x).shape == (1, 10)


@pytest.mark.slow
def test_detection_latency_target_runs_on_the_shipped_form_and_says_when_it_is_not_met(tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.recipe import load_recipe

    recipe = load_recipe("detect-default").model_dump(mode="json")
    recipe.update(name="tiny-det", output_dir=str(tmp_path / "runs"))
    recipe["detection"].update(image_size=64, synthetic={"train": 32, "validation": 8, "test": 8, "max_objects": 2,
                                                         "seed": 1})
    recipe["teacher"]["finetune"].update(epochs=1, batch_size=16)
    recipe["distill"]["train"].update(epochs=1, batch_size=16)
    recipe["runtime"]["precision"] = "fp32"
    recipe["baseline"]["enabled"] = False
    recipe["prune"] = {**recipe["prune"], "enabled": True, "keep_params": None, "target_latency_ms": 1e-6,
                       "latency_step": 0.3, "steps": 2, "recover_epochs": 0}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    for stage in ("teacher", "distill"):
        res = runner.invoke(app, [stage, str(path)])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["prune", str(path)])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "runs" / "tiny-det" / "manifest.json").read_text())["stages"]["prune"]["metrics"]
    assert len(m["steps"]) == 2 and all(s["latency_ms"] > 0 for s in m["steps"]) and m["latency_ms_before"] > 0
    assert m["steps"][-1]["params"] < m["params_before"] and not m["target_reached"]
    assert "was NOT met" in " ".join(res.output.split()) and "rounds ran out" in m["stopped"]


def test_a_budget_baseline_the_caller_gives_is_what_the_budget_counts_from(model):
    """PruneContext.budget_baseline (the text stage: the distilled student before its vocabulary trim): every
    round's drop, what ships and the record count from it, and a start already over budget is said."""
    params0 = count_params(model)
    ev = scripted_accuracy(params0, 0.001)  # the model given scores 0.9
    _, m = prune_model(copy.deepcopy(model), cfg(max_accuracy_drop=0.03, latency_step=0.2),
                       PruneContext(evaluate=ev, budget_baseline={"accuracy": 0.91}, budget_baseline_of="the original"))
    assert m["budget_baseline"] == {"counts_from": "the original", "metric": "accuracy", "baseline": 0.91,
                                    "search_start": 0.9, "search_start_drop": 0.01,
                                    "search_start_within_budget": True}
    steps = m["steps"]
    assert all(s["metric_drop"] == pytest.approx(0.91 - s["metric"]["accuracy"], abs=1e-6) for s in steps)
    assert steps[-1]["in_budget"] is False and 0.91 - m["metric_after"]["accuracy"] <= 0.03 and m["target_reached"]
    # Without one: the model given, as before.
    _, m = prune_model(copy.deepcopy(model), cfg(max_accuracy_drop=0.03, latency_step=0.2), PruneContext(evaluate=ev))
    assert m["budget_baseline"]["counts_from"] == "the unpruned model" and m["budget_baseline"]["baseline"] == 0.9
    # A start already over budget: the first round is undone, the start ships out of budget, and both say so.
    _, m = prune_model(copy.deepcopy(model), cfg(max_accuracy_drop=0.03, latency_step=0.2),
                       PruneContext(evaluate=ev, budget_baseline={"accuracy": 0.95}, budget_baseline_of="the original"))
    assert m["budget_baseline"]["search_start_within_budget"] is False and "the original" in m["budget_baseline"]["note"]
    assert m["kept_step"] == 0 and m["within_budget"] is False and not m["target_reached"]
    assert "what ships is the model the search started from, 0.0500 below the original" in m["stopped"]


@pytest.mark.slow
def test_the_text_budget_counts_from_the_distilled_student_before_the_vocabulary_trim(tmp_path, tiny_teacher_dir,
                                                                                      tiny_csv, monkeypatch):
    """prune.max_accuracy_drop with prune.trim_vocab: the budget counts from the distilled student before the
    trim (the recipe reference's 'the unpruned model'), so what the trim costs is spent out of it; the record
    gives both figures, and the console says plainly when the trim alone spent more than the budget."""
    import edgekd.pruning.vocab as vocab
    import edgekd.tasks.text.prune as text_prune
    from edgekd.context import RunContext
    from edgekd.pipeline import run_stages
    from edgekd.recipe import parse_recipe
    from edgekd.testing import tiny_recipe

    real_trim = vocab.trim_vocabulary

    def costly_trim(model, tok, keep):  # a trim that costs: the trimmed student answers the other label
        model, new_tok = real_trim(model, tok, keep)
        with torch.no_grad():
            model.classifier.weight.neg_()
            model.classifier.bias.neg_()
        return model, new_tok

    monkeypatch.setattr(vocab, "trim_vocabulary", costly_trim)
    said: list[str] = []
    monkeypatch.setattr(RunContext, "say", lambda self, msg: said.append(msg))
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, baseline={"enabled": False},
                                      prune={"enabled": True, "max_accuracy_drop": 0.1, "steps": 2,
                                             "latency_step": 0.25, "recover_epochs": 0.5, "trim_vocab": True}))
    run_stages(recipe, ["teacher", "distill"])
    monkeypatch.setattr(text_prune, "train", lambda *a, **kw: None)  # no recovery wins the trim's cost back
    ctx = run_stages(recipe, ["prune"])
    m = ctx.run.stage_record("prune")["metrics"]
    untrimmed = m["vocab"]["before"]["validation"]["accuracy"]
    trimmed = m["vocab"]["after"]["validation"]["accuracy"]
    assert untrimmed - trimmed > 0.1, (untrimmed, trimmed)  # the trim alone costs more than the budget
    assert m["metric_before"]["accuracy"] == trimmed and m["steps"]
    # Every round's drop is counted from the untrimmed student, not from the trimmed model the search starts from.
    for s in m["steps"]:
        assert s["metric_drop"] == pytest.approx(untrimmed - s["metric"]["accuracy"], abs=1e-6), (s, untrimmed)
    assert m["within_budget"] is (untrimmed - m["metric_after"]["accuracy"] <= 0.1) is False
    assert not m["target_reached"]
    b = m["budget_baseline"]
    assert b["counts_from"] == "the distilled student before prune.trim_vocab" and b["metric"] == "accuracy"
    assert b["baseline"] == untrimmed and b["search_start"] == trimmed and b["search_start_within_budget"] is False
    # Round 1 of the reversed student is far below the untrimmed one: undone; the trimmed start ships, out of budget.
    assert m["kept_step"] == 0 and "over the budget" in m["stopped"]
    assert any("vocabulary trim alone" in s and "max_accuracy_drop=0.1" in s for s in said), said
