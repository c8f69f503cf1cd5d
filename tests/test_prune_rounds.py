"""A search round (prune.latency_step) removes at least one unit where a layer has room above its
floor: a fraction of a few heads that rounds to none would stop the search as if the floors had
been reached."""

from __future__ import annotations

import pytest

from edgekd.pruning import Encoder, PruneContext, count_params, prune_model
from edgekd.pruning.selection import counts_for_fraction
from edgekd.recipe import PruneConfig

LAYERS, HEADS, HIDDEN, FFN = 2, 4, 32, 64


def test_a_search_round_takes_at_least_one_unit_where_there_is_room():
    assert counts_for_fraction(0.1, [4, 4], [3, 3]) == [0, 0]  # a parameter budget rounds as before
    assert counts_for_fraction(0.1, [4, 4], [3, 3], at_least_one=True) == [1, 1]
    assert counts_for_fraction(0.1, [4, 4], [3, 0], at_least_one=True) == [1, 0]  # a layer at its floor keeps all
    assert counts_for_fraction(0.0, [4, 4], [3, 3], at_least_one=True) == [0, 0]
    assert counts_for_fraction(0.5, [12, 12], [11, 11], at_least_one=True) == [6, 6]


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_a_latency_search_on_four_heads_removes_heads_until_the_floor(tmp_path, scope):
    from transformers import AutoModelForSequenceClassification

    from edgekd.testing import tiny_bert

    src = tiny_bert(tmp_path / "bert", num_layers=LAYERS, hidden=HIDDEN, heads=HEADS, intermediate=FFN, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(src).eval()
    latency = lambda m: count_params(m) / 10_000  # noqa: E731  (proportional to size)
    cfg = PruneConfig(enabled=True, target_latency_ms=1e-9, steps=None, latency_step=0.1, importance="magnitude",
                      min_heads_per_layer=1, scope=scope)
    pruned, m = prune_model(model, cfg, PruneContext(latency_fn=latency))
    heads = Encoder(pruned).heads()
    # 10% of 4 heads rounds to none; every round still removes heads until one is left in each layer.
    assert heads == [1] * LAYERS, (heads, m.get("stopped"))
    assert not m["target_reached"]


def test_the_search_times_on_the_bench_profiles_threads_and_says_where():
    from edgekd.recipe import load_recipe
    from edgekd.stages.prune_common import timing_place

    threads, where = timing_place(load_recipe("default", ["bench.profile=x86-edge-box"]))
    assert threads == 4  # the profile's own threads, as `edgekd bench` would time with
    assert "another device (ssh)" in where and "x86-edge-box" in where
    threads, where = timing_place(load_recipe("default", ["bench.profile=x86-edge-box", "bench.threads=1"]))
    assert threads == 1 and "1 thread(s)" in where
    threads, where = timing_place(load_recipe("default"))
    assert threads >= 1 and where.startswith("this machine (bench profile 'local')")
    # quantize.threads and runtime.threads are not the bench's: the target is met at the threads it times at
    others = load_recipe("default", ["bench.profile=x86-edge-box", "quantize.threads=1", "runtime.threads=1"])
    assert timing_place(others)[0] == 4
    # a remote profile that sets no threads: the search times here, at this machine's cores, and says so
    # (`edgekd bench` reads the device's own count there; a prune round cannot)
    import os

    threads, where = timing_place(load_recipe("default", ["bench.profile=nvidia-datacenter-gpu"]))
    assert threads == (os.cpu_count() or 1) and "this machine's cores" in where and "neither threads nor cores" in where


def test_the_manifest_records_where_the_search_timed(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from edgekd.testing import tiny_bert

    src = tiny_bert(tmp_path / "bert", num_layers=LAYERS, hidden=HIDDEN, heads=HEADS, intermediate=FFN, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(src).eval()

    def latency(m):
        return count_params(m) / 10_000

    latency.where = "this machine, ONNX Runtime on 3 thread(s)"
    cfg = PruneConfig(enabled=True, target_latency_ms=1e-9, steps=1, importance="magnitude")
    _, m = prune_model(model, cfg, PruneContext(latency_fn=latency))
    assert m["latency_timed_on"] == "this machine, ONNX Runtime on 3 thread(s)"


def test_a_searched_prune_stage_is_redone_when_where_it_is_timed_changes():
    from edgekd.recipe import load_recipe
    from edgekd.stages.prune_common import search_timing_settings

    search = ["prune.keep_params=null", "prune.steps=null", "prune.target_latency_ms=1.0"]
    here = search_timing_settings(load_recipe("default", search))
    assert here["timed_at"]["profile"] == "local"
    edge = search_timing_settings(load_recipe("default", [*search, "bench.profile=x86-edge-box"]))
    assert edge["timed_at"] == {"profile": "x86-edge-box", "threads": 4} and edge != here
    assert search_timing_settings(load_recipe("default", ["bench.profile=x86-edge-box"])) == {}  # no search


def test_a_searched_prune_stage_follows_the_onnx_export_options_its_rounds_are_timed_with():
    from edgekd.recipe import load_recipe
    from edgekd.stages.prune_common import search_timing_settings

    search = ["prune.keep_params=null", "prune.max_accuracy_drop=0.01"]
    plain = search_timing_settings(load_recipe("default", search))
    fused = search_timing_settings(load_recipe("default", [*search, "export.options={onnx: {optimize: true}}"]))
    assert fused["timed_as"]["export_options_onnx"] == {"optimize": True} and fused != plain
    assert "export_options_onnx" not in plain["timed_as"]  # unset: the fingerprints recorded before stay
    assert search_timing_settings(load_recipe("default", ["export.options={onnx: {optimize: true}}"])) == {}
