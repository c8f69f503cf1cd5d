"""Limits that must hold across a whole prune stage, not one round: prune.max_channel_ratio counted
against each layer's original width, and the accuracy budget checked after the final recovery."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from edgekd.pruning import PruneContext, count_params, prune_model
from edgekd.pruning.stage import _target_report
from edgekd.recipe import PruneConfig

ORIGINAL = {"0": 40, "3": 24, "6": 15}  # the convs of net() by module name


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(),
        nn.Conv2d(40, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 15, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(15, 10),
    ).eval()


def conv_widths(m: nn.Module) -> dict[str, int]:
    return {name: mod.out_channels for name, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}


def floor(original: int, ratio: float) -> int:
    """What the channels method documents: ceil((1 - ratio) * original), at least 1."""
    import math

    return max(1, math.ceil(original * (1 - ratio) - 1e-9))


X = torch.randn(1, 3, 16, 16)


@pytest.mark.parametrize("scope", ["per_layer", "global"])
@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_max_channel_ratio_holds_against_the_original_widths_over_every_round(scope, ratio):
    pytest.importorskip("torch_pruning")
    seen = []

    def recover(m, step):
        seen.append(conv_widths(m))
        return m

    pruned, m = prune_model(net(), PruneConfig(enabled=True, method="channels", importance="magnitude", scope=scope,
                                               target_latency_ms=1e-6, latency_step=0.5, max_channel_ratio=ratio),
                            PruneContext(example_inputs=X, latency_fn=lambda mm: 5.0, recover=recover))
    assert len(seen) >= 1 and not m["target_reached"]
    for widths in [*seen, conv_widths(pruned)]:
        for name, width in widths.items():
            assert width >= floor(ORIGINAL[name], ratio), (name, width, widths)
    # The cap, not a round count, stopped the search, and it says so by name.
    assert "nothing left to remove" in m["stopped"] and f"max_channel_ratio={ratio}" in m["stopped"]
    assert m["after"]["channels"]["0"] == floor(40, ratio)  # the widest layer went as far as the cap allows
    assert pruned(X).shape == (1, 10)


def test_max_channel_ratio_holds_over_fixed_steps_too():
    pytest.importorskip("torch_pruning")
    pruned, m = prune_model(net(), PruneConfig(enabled=True, method="channels", importance="magnitude",
                                               keep_params=0.05, steps=4, max_channel_ratio=0.5),
                            PruneContext(example_inputs=X))
    assert all(w >= floor(ORIGINAL[n], 0.5) for n, w in conv_widths(pruned).items())
    assert not m["target_reached"]  # 5% of the parameters is out of the cap's reach, and it is reported


# --- the final recovery against the budget ---------------------------------------------------------

def search(final_acc: float):
    """An accuracy search whose validation falls 0.05 per share of parameters removed, and whose final
    recovery (a stand-in) marks the model's first conv and lands it at ``final_acc``."""
    model = net()
    p0 = count_params(model)

    def recovered(mm) -> bool:
        return bool((mm[0].weight == 7.0).all())

    def recover_final(mm):
        with torch.no_grad():
            mm[0].weight.fill_(7.0)
        return mm

    def evaluate(mm):
        return {"accuracy": final_acc if recovered(mm) else 0.9 - 0.05 * (1 - count_params(mm) / p0)}

    pruned, m = prune_model(model, PruneConfig(enabled=True, method="channels", importance="magnitude",
                                               max_accuracy_drop=0.02, latency_step=0.1, final_recover_epochs=1.0),
                            PruneContext(example_inputs=X, evaluate=evaluate, recover_final=recover_final))
    return pruned, m, evaluate


def test_a_final_recovery_over_the_budget_is_reported_and_not_shipped(caplog):
    pytest.importorskip("torch_pruning")
    with caplog.at_level(logging.WARNING, logger="edgekd.pruning.stage"):
        pruned, m, evaluate = search(final_acc=0.80)  # 10 points under the unpruned 0.9, budget 0.02
    assert m["kept_step"] > 0
    final = m["final_recovery"]
    assert final["metric"] == {"accuracy": 0.80} and final["within_budget"] is False and final["shipped"] is False
    assert final["metric_drop"] == pytest.approx(0.10)
    # What ships is the model from before the final recovery, and the metrics say that one's numbers.
    assert not bool((pruned[0].weight == 7.0).all())
    kept = m["steps"][m["kept_step"] - 1]["metric"]
    assert m["metric_after"] == kept == evaluate(pruned)
    assert m["within_budget"] is True and 0.9 - m["metric_after"]["accuracy"] <= 0.02 and m["target_reached"]
    text = caplog.text
    assert "0.8000" in text and "max_accuracy_drop=0.02" in text and "final_recover_epochs" in text


def test_a_final_recovery_that_helps_ships():
    pytest.importorskip("torch_pruning")
    pruned, m, _ = search(final_acc=0.95)
    final = m["final_recovery"]
    assert final["within_budget"] is True and final["shipped"] is True and "note" not in final
    assert bool((pruned[0].weight == 7.0).all()) and m["metric_after"] == {"accuracy": 0.95}
    assert m["within_budget"] and m["target_reached"]


def test_a_final_recovery_after_a_latency_search_alone_that_lowers_validation_is_not_shipped(caplog):
    """Without max_accuracy_drop too: the model the latency search kept ships when the final recovery makes
    it worse on validation, and the record and the log say so."""
    pytest.importorskip("torch_pruning")
    model = net()
    p0 = count_params(model)

    def recover_final(mm):
        with torch.no_grad():
            mm[0].weight.fill_(7.0)
        return mm

    def evaluate(mm):
        return {"accuracy": 0.5 if bool((mm[0].weight == 7.0).all()) else 0.9 - 0.05 * (1 - count_params(mm) / p0)}

    with caplog.at_level(logging.WARNING, logger="edgekd.pruning.stage"):
        pruned, m = prune_model(model, PruneConfig(enabled=True, method="channels", importance="magnitude",
                                                   target_latency_ms=3.0, latency_step=0.2, final_recover_epochs=1.0),
                                PruneContext(example_inputs=X, evaluate=evaluate, recover_final=recover_final,
                                             latency_fn=lambda mm: 10.0 * count_params(mm) / p0))
    final = m["final_recovery"]
    assert m["kept_step"] > 0 and final["metric"] == {"accuracy": 0.5} and final["shipped"] is False
    assert "within_budget" not in final and "below the" in final["note"]
    assert not bool((pruned[0].weight == 7.0).all()) and m["metric_after"] == evaluate(pruned)
    assert "final_recover_epochs" in caplog.text


@pytest.mark.parametrize("latency", [None, 1.0])
def test_what_ships_out_of_budget_is_never_reported_as_reached(latency):
    cfg = PruneConfig(enabled=True, max_accuracy_drop=0.02, target_latency_ms=2.0 if latency else None)
    metrics = {"kept_step": 3, "within_budget": False, "steps": []}
    assert _target_report(cfg, metrics, latency)[1] is False
    assert _target_report(cfg, {**metrics, "within_budget": True}, latency)[1] is True
