"""Prune keys that the chosen method, importance or target would never read are refused with the
reason, not accepted and ignored."""

from __future__ import annotations

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
    {"keep_params": 0.5, "min_heads_per_layer": 2, "min_neurons_fraction": 0.2, "prune_heads": False},
    {"keep_params": 0.5, "importance": "taylor", "score_batches": 32},
    {"method": "channels", "keep_params": 0.5, "importance": "taylor", "score_batches": 4},
])
def test_the_same_keys_where_they_are_read_are_accepted(keys):
    PruneConfig(enabled=True, **keys)


def test_every_built_in_recipe_still_parses():
    from edgekd.recipe import BUILTIN_RECIPES, load_recipe

    for name in BUILTIN_RECIPES:
        load_recipe(name)
