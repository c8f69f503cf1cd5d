"""Prune keys that the chosen method, importance or target would never read are refused with the
reason, not accepted and ignored."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from edgekd.recipe import PruneConfig


@pytest.mark.parametrize(("keys", "why"), [
    ({"keep_params": 0.5, "latency_step": 0.2}, "latency_step is the share a search round removes"),
    ({"keep_params": 0.5, "max_channel_ratio": 0.5}, "max_channel_ratio caps method 'channels', not 'heads-ffn'"),
    ({"method": "channels", "keep_params": 0.5, "min_heads_per_layer": 2}, "min_heads_per_layer"),
    ({"method": "channels", "keep_params": 0.5, "min_neurons_fraction": 0.2}, "min_neurons_fraction"),
    ({"method": "channels", "keep_params": 0.5, "prune_heads": False}, "prune.prune_heads"),
    ({"method": "unstructured", "sparsity": 0.5, "min_heads_per_layer": 2}, "not 'unstructured'"),
    ({"keep_params": 0.5, "importance": "magnitude", "score_batches": 16}, "prune.score_batches"),
    ({"method": "unstructured", "sparsity": 0.5, "score_batches": 16}, "prune.score_batches"),
])
def test_a_key_nothing_would_read_is_refused(keys, why):
    with pytest.raises(ValidationError, match=why):
        PruneConfig(enabled=True, **keys)


@pytest.mark.parametrize("keys", [
    {"target_latency_ms": 1.0, "latency_step": 0.2},
    {"max_accuracy_drop": 0.01, "latency_step": 0.2},
    {"method": "channels", "keep_params": 0.5, "max_channel_ratio": 0.5},
    {"keep_params": 0.5, "min_heads_per_layer": 2, "min_neurons_fraction": 0.2},
    {"keep_params": 0.5, "min_neurons_fraction": 0.2, "prune_heads": False},
    {"keep_params": 0.5, "min_heads_per_layer": 2, "prune_neurons": False},
    {"keep_params": 0.5, "importance": "taylor", "score_batches": 32},
    {"method": "channels", "keep_params": 0.5, "importance": "taylor", "score_batches": 4},
])
def test_the_same_keys_where_they_are_read_are_accepted(keys):
    PruneConfig(enabled=True, **keys)


NO_RECOVERY = {"keep_params": 0.5, "recover_epochs": 0}  # a fixed target: no final recovery either
TRAINS = "shape(s) how every recovery trains, and no recovery trains (prune.recover_epochs is 0"
LOSS = "shape(s) the recovery's loss, and nothing uses that loss"


@pytest.mark.parametrize(("keys", "why"), [
    # the floor of a kind of unit that is not removed
    ({"keep_params": 0.5, "prune_heads": False, "min_heads_per_layer": 2},
     "prune.min_heads_per_layer is the floor of every layer's heads when they are removed, and prune.prune_heads "
     "is false"),
    ({"keep_params": 0.5, "prune_neurons": False, "min_neurons_fraction": 0.2},
     "prune.min_neurons_fraction is the floor of every layer's FFN neurons when they are removed, and "
     "prune.prune_neurons is false"),
    # how the recovery trains, where none trains (text and detection: every recovery reads these alone)
    ({**NO_RECOVERY, "recover_lr": 1e-3}, "prune.recover_lr " + TRAINS),
    ({**NO_RECOVERY, "recover_ema_decay": 0.99}, "prune.recover_ema_decay " + TRAINS),
    ({**NO_RECOVERY, "recover_soup": 2}, "prune.recover_soup " + TRAINS),
    ({**NO_RECOVERY, "recover_lr": 1e-3, "recover_soup": 3}, "prune.recover_lr, prune.recover_soup " + TRAINS),
    ({**NO_RECOVERY, "score_loss": "recovery", "recover_lr": 1e-3}, "prune.recover_lr " + TRAINS),  # scoring: no lr
    ({"method": "channels", "keep_params": 0.5, "recover_epochs": 0, "recover_lr": 1e-3}, "prune.recover_lr " + TRAINS),
    ({"trim_vocab": True, "recover_epochs": 0, "recover_ema_decay": 0.9}, "prune.recover_ema_decay " + TRAINS),
    ({"sparsity": 0.5, "method": "unstructured", "recover_epochs": 0, "recover_lr": 1e-3}, "prune.recover_lr"),
    # the recovery's loss, where none trains and importance is not scored with it
    ({**NO_RECOVERY, "recover_soft_targets": "unpruned"}, "prune.recover_soft_targets " + LOSS),
    ({**NO_RECOVERY, "recover_alpha": 0.3}, "prune.recover_alpha " + LOSS),
    ({**NO_RECOVERY, "recover_temperature": 4.0}, "prune.recover_temperature " + LOSS),
    ({**NO_RECOVERY, "recover_hidden_weight": 1.0}, "prune.recover_hidden_weight " + LOSS),
    ({**NO_RECOVERY, "importance": "magnitude", "recover_alpha": 0.3}, "prune.recover_alpha " + LOSS),
    ({"sparsity": 0.5, "method": "unstructured", "recover_epochs": 0, "recover_temperature": 3.0},
     "prune.recover_temperature " + LOSS),
])
def test_a_key_read_only_by_what_is_off_is_refused(keys, why):
    with pytest.raises(ValidationError, match=re.escape(why)):
        PruneConfig(enabled=True, **keys)


@pytest.mark.parametrize("keys", [
    # a recovery trains after every step
    {"keep_params": 0.5, "recover_epochs": 1, "recover_lr": 1e-3, "recover_ema_decay": 0.99, "recover_soup": 2,
     "recover_soft_targets": "unpruned", "recover_alpha": 0.3, "recover_temperature": 4.0,
     "recover_hidden_weight": 1.0},
    {"method": "channels", "keep_params": 0.5, "recover_epochs": 0.5, "recover_lr": 1e-3, "recover_ema_decay": 0.9},
    {"trim_vocab": True, "recover_epochs": 1, "recover_lr": 1e-3},
    # none after each round, but the search's final recovery trains
    {"max_accuracy_drop": 0.01, "recover_epochs": 0, "final_recover_epochs": 1, "recover_lr": 1e-3,
     "recover_soup": 2, "recover_alpha": 0.3},
    # no recovery, but score_loss: recovery scores importance with the recovery's loss (and these shape it)
    {**NO_RECOVERY, "score_loss": "recovery", "recover_soft_targets": "teacher+unpruned", "recover_alpha": 0.3,
     "recover_temperature": 4.0, "recover_hidden_weight": 1.0},
    {**NO_RECOVERY, "score_loss": "recovery", "importance": "fisher", "recover_alpha": 0.8},
    # no recovery, and nothing set that only a recovery reads
    {**NO_RECOVERY},
])
def test_the_same_keys_where_something_reads_them_are_accepted(keys):
    PruneConfig(enabled=True, **keys)


def test_a_recipe_refuses_the_recovery_keys_where_no_recovery_trains():
    from edgekd.errors import RecipeError
    from edgekd.recipe import load_recipe

    with pytest.raises(RecipeError, match=re.escape("prune.recover_lr " + TRAINS)):
        load_recipe("detect-default", ["prune.recover_epochs=0", "prune.recover_lr=0.001"])
    with pytest.raises(RecipeError, match=re.escape("prune.recover_alpha " + LOSS)):
        load_recipe("default", ["prune.recover_epochs=0", "prune.quant_aware=false", "prune.recover_alpha=0.5"])
    load_recipe("default", ["prune.recover_epochs=0", "prune.quant_aware=false", "prune.score_loss=recovery",
                            "prune.recover_alpha=0.5"])


def test_every_built_in_recipe_still_parses():
    from edgekd.recipe import BUILTIN_RECIPES, load_recipe

    for name in BUILTIN_RECIPES:
        load_recipe(name)
