"""Pruning: heads and FFN neurons physically removed, reload round trips, importance and scope,
floors, schedules and targets, unstructured sparsity, CNN channels through torch-pruning."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from edgekd.errors import RecipeError, StageError
from edgekd.pruning import (
    FFN_SIZES_KEY,
    Encoder,
    PruneContext,
    count_params,
    load_pruned_model,
    prune_model,
    registered_methods,
    weight_sparsity,
)
from edgekd.pruning.scoring import magnitude_scores, taylor_scores
from edgekd.recipe import PruneConfig, parse_recipe

LAYERS, HEADS, HIDDEN, FFN = 3, 4, 32, 64
HEAD_SIZE = HIDDEN // HEADS


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from edgekd.testing import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("prune-bert"), num_layers=LAYERS, hidden=HIDDEN, heads=HEADS,
                     intermediate=FFN, num_labels=2)


@pytest.fixture
def model(classifier_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()


def make_batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{
        "input_ids": torch.randint(5, 40, (8, 12), generator=g),
        "attention_mask": torch.ones(8, 12, dtype=torch.long),
        "labels": torch.randint(0, 2, (8,), generator=g),
    } for _ in range(n)]


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def cfg(**kw) -> PruneConfig:
    return PruneConfig(enabled=True, **kw)


def test_every_recipe_method_is_registered():
    from edgekd.registry import PRUNE_METHODS  # what the recipe validates prune.method against

    assert set(PRUNE_METHODS) == set(registered_methods())


def test_heads_and_neurons_are_physically_removed(model):
    params0 = count_params(model)
    batch = make_batches(1)[0]
    pruned, m = prune_model(model, cfg(remove_heads=6, remove_neurons=96, importance="magnitude"), PruneContext())

    enc = Encoder(pruned)
    assert enc.heads() == [2, 2, 2] and enc.neurons() == [32, 32, 32]
    for block in enc.blocks:
        att = block.attention
        assert att.self.query.weight.shape == (2 * HEAD_SIZE, HIDDEN)
        assert att.self.value.bias.shape == (2 * HEAD_SIZE,)
        assert att.output.dense.weight.shape == (HIDDEN, 2 * HEAD_SIZE)
        assert block.intermediate.dense.weight.shape == (32, HIDDEN)
        assert block.output.dense.weight.shape == (HIDDEN, 32)
    assert sorted(len(v) for v in pruned.config.pruned_heads.values()) == [2, 2, 2]
    assert pruned.config.intermediate_size == 32
    assert m["params_after"] == count_params(pruned) < params0 == m["params_before"]
    assert m["before"]["heads_per_layer"] == [HEADS] * LAYERS
    assert m["after"]["neurons_per_layer"] == [32] * LAYERS and m["target_reached"]
    out = logits(pruned, batch)
    assert out.shape == (8, 2) and torch.isfinite(out).all()


def test_keep_params_target(model):
    pruned, m = prune_model(model, cfg(keep_params=0.5, importance="magnitude"), PruneContext())
    assert m["after"]["encoder_params"] == Encoder(pruned).layer_params() == m["prunable_params_after"]
    assert abs(m["kept_prunable_fraction"] - 0.5) < 0.02 and m["target_reached"]
    assert m["sparsity"] == pytest.approx(1 - m["kept_prunable_fraction"], abs=1e-6)
    assert len(set(Encoder(pruned).neurons())) == 1 and len(set(Encoder(pruned).heads())) == 1


def test_per_layer_result_reloads_with_plain_from_pretrained(model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    batch = make_batches(1)[0]
    pruned, _ = prune_model(model, cfg(keep_params=0.6, steps=2), PruneContext(score_batches=make_batches()))
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not hasattr(reloaded.config, FFN_SIZES_KEY)
    assert Encoder(reloaded).heads() == Encoder(pruned).heads()
    torch.testing.assert_close(logits(reloaded, batch), logits(pruned, batch))
    torch.testing.assert_close(logits(load_pruned_model(tmp_path), batch), logits(pruned, batch))


def _skew_ffn(model: nn.Module, layer: int, strong: int = 8) -> None:
    """Give ``layer`` a few dominant neurons, so that after per-layer normalisation its other
    neurons score lowest of all and global ranking takes more from it."""
    block = Encoder(model).blocks[layer]
    with torch.no_grad():
        block.intermediate.dense.weight[:strong] *= 100
        block.output.dense.weight[:, :strong] *= 100


def test_global_scope_gives_uneven_widths_that_reload(model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _skew_ffn(model, layer=1)
    batch = make_batches(1)[0]
    pruned, m = prune_model(model, cfg(remove_neurons=60, scope="global", importance="magnitude",
                                       prune_heads=False), PruneContext())
    widths = Encoder(pruned).neurons()
    assert sum(widths) == LAYERS * FFN - 60
    assert widths[1] < min(widths[0], widths[2])  # the skewed layer lost the most
    pruned.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch"):  # the plain loader refuses uneven widths loudly
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
    reloaded = load_pruned_model(tmp_path)
    assert Encoder(reloaded).neurons() == widths
    torch.testing.assert_close(logits(reloaded, batch), logits(pruned, batch))


def test_per_layer_scope_removes_the_same_share_everywhere(model):
    _skew_ffn(model, layer=1)
    pruned, _ = prune_model(model, cfg(remove_neurons=60, importance="magnitude", prune_heads=False), PruneContext())
    assert Encoder(pruned).neurons() == [44, 44, 44]


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_every_layer_keeps_a_head(model, scope):
    pruned, m = prune_model(model, cfg(remove_heads=LAYERS * HEADS, scope=scope, prune_neurons=False,
                                       importance="magnitude"), PruneContext())
    assert Encoder(pruned).heads() == [1, 1, 1]
    assert not m["target_reached"]  # 12 heads asked, 9 removable within the floor
    assert torch.isfinite(logits(pruned, make_batches(1)[0])).all()


def test_every_layer_keeps_its_neuron_floor(model):
    pruned, _ = prune_model(model, cfg(remove_neurons=LAYERS * FFN, scope="global", prune_heads=False,
                                       importance="magnitude", min_neurons_fraction=0.25), PruneContext())
    assert Encoder(pruned).neurons() == [16, 16, 16]


def _dead_heavy_head(model: nn.Module, layer: int = 0, head: int = 2) -> None:
    """Head ``head`` of ``layer``: huge q/k/v weights but a zero output projection, so it weighs
    the most yet cannot change the output."""
    att = Encoder(model).blocks[layer].attention
    rows = slice(head * HEAD_SIZE, (head + 1) * HEAD_SIZE)
    with torch.no_grad():
        for lin in (att.self.query, att.self.key, att.self.value):
            lin.weight[rows] *= 10
        att.output.dense.weight[:, rows] = 0


def test_taylor_and_magnitude_rank_differently(classifier_dir):
    from transformers import AutoModelForSequenceClassification

    removed = {}
    for importance in ("taylor", "magnitude"):
        model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
        _dead_heavy_head(model)
        _, m = prune_model(model, cfg(remove_heads=LAYERS, importance=importance, prune_neurons=False),
                           PruneContext(score_batches=make_batches()))
        removed[importance] = m["steps"][0]["removed_head_ids"]["0"]
    assert removed["taylor"] == [2]  # no effect on the loss: its Taylor score is exactly zero
    assert removed["magnitude"] != [2]  # the largest weights: magnitude keeps it


def test_taylor_scores_equal_the_head_mask_gradient(model):
    """Our mask hooks give the gradient Hugging Face's own head_mask gives (Michel et al.)."""
    batch = make_batches(1)[0]
    heads, neurons = taylor_scores(Encoder(model), [batch])
    model.config._attn_implementation = "eager"
    mask = torch.ones(LAYERS, HEADS, requires_grad=True)
    loss = model(**batch, head_mask=mask).loss
    (grad,) = torch.autograd.grad(loss, mask)
    torch.testing.assert_close(torch.stack(heads), grad.abs(), rtol=1e-4, atol=1e-7)
    assert all(n.shape == (FFN,) and (n > 0).any() for n in neurons)
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradients behind


def test_fisher_scores_sum_each_texts_own_squared_mask_gradient(model):
    """fisher: every text's gradient taken as if it ran alone (Hugging Face's head_mask, one text at
    a time), squared and summed; not the square of the batch's summed gradient."""
    batch = make_batches(1)[0]
    heads, neurons = taylor_scores(Encoder(model), [batch], per_example=True)
    model.config._attn_implementation = "eager"
    expected = torch.zeros(LAYERS, HEADS)
    for i in range(batch["labels"].shape[0]):
        mask = torch.ones(LAYERS, HEADS, requires_grad=True)
        loss = model(**{k: v[i:i + 1] for k, v in batch.items()}, head_mask=mask).loss
        (grad,) = torch.autograd.grad(loss, mask)
        expected += grad.square()
    torch.testing.assert_close(torch.stack(heads), expected, rtol=1e-4, atol=1e-9)
    taylor, _ = taylor_scores(Encoder(model), [batch])
    assert not torch.allclose(torch.stack(taylor).square() * batch["labels"].shape[0] ** 2, expected, rtol=0.05)
    assert all(n.shape == (FFN,) and (n > 0).any() for n in neurons)
    assert all(p.grad is None for p in model.parameters())


def test_fisher_prunes_heads_and_neurons_and_is_refused_for_other_methods(model):
    pruned, m = prune_model(model, cfg(remove_heads=LAYERS, remove_neurons=LAYERS * 16, importance="fisher"),
                            PruneContext(score_batches=make_batches()))
    assert m["after"]["heads_per_layer"] == [HEADS - 1] * LAYERS
    assert m["after"]["neurons_per_layer"] == [FFN - 16] * LAYERS
    with pytest.raises(ValueError, match="importance 'fisher' scores the heads and neurons of method 'heads-ffn'"):
        cfg(method="channels", keep_params=0.5, importance="fisher")
    with pytest.raises(StageError, match="prune.importance 'fisher' needs labelled batches"):
        prune_model(model, cfg(keep_params=0.5, importance="fisher"), PruneContext())


def test_magnitude_scores_are_weight_norms(model):
    heads, neurons = magnitude_scores(Encoder(model))
    block = Encoder(model).blocks[0]
    w = block.intermediate.dense
    expected = (w.weight[5].pow(2).sum() + w.bias[5] ** 2 + block.output.dense.weight[:, 5].pow(2).sum()).sqrt()
    torch.testing.assert_close(neurons[0][5], expected.detach())
    assert [h.shape[0] for h in heads] == [HEADS] * LAYERS


def test_steps_call_recover_and_evaluate(model):
    calls: list[tuple[str, int]] = []

    def recover(m, step):
        calls.append(("recover", step))
        return m

    def evaluate(m):
        calls.append(("evaluate", count_params(m)))
        return {"accuracy": 0.5}

    pruned, m = prune_model(model, cfg(keep_params=0.5, steps=3),
                            PruneContext(score_batches=iter(make_batches()), recover=recover, evaluate=evaluate))
    assert [c for c in calls if c[0] == "recover"] == [("recover", 1), ("recover", 2), ("recover", 3)]
    assert len([c for c in calls if c[0] == "evaluate"]) == 4  # before, and after every step
    kept = [s["prunable_params"] for s in m["steps"]]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 3
    assert all(s["recovered"] and s["metric"] == {"accuracy": 0.5} for s in m["steps"])
    assert m["metric_before"] == {"accuracy": 0.5} and m["target_reached"]


def test_trim_vocab_alone_recovers_once_and_removes_nothing(model):
    scores = iter([{"accuracy": 0.6}, {"accuracy": 0.7}])
    steps = []
    params = count_params(model)
    pruned, m = prune_model(model, cfg(trim_vocab=True),
                            PruneContext(recover=lambda mm, step: steps.append(step) or mm,
                                         evaluate=lambda mm: next(scores)))
    assert steps == [1] and count_params(pruned) == params
    assert m["metric_before"] == {"accuracy": 0.6} and m["metric_after"] == {"accuracy": 0.7}
    assert m["steps"][0]["trim_vocab"] and m["steps"][0]["recovered"]
    # Without a recovery the model comes back untouched and unscored twice.
    _, m = prune_model(model, cfg(trim_vocab=True), PruneContext(evaluate=lambda mm: {"accuracy": 0.5}))
    assert m["steps"] == [] and m["metric_after"] == m["metric_before"]


def test_trim_vocab_alone_refuses_the_keys_that_choose_how_heads_and_neurons_are_pruned():
    with pytest.raises(ValueError, match=re.escape(
            "prune.importance, prune.steps, prune.score_batches: choose how heads and neurons are pruned, and no "
            "pruning target is set (prune.trim_vocab alone trims the vocabulary and recovers once): set a target "
            "(prune.keep_params, ...) or drop them")):
        cfg(trim_vocab=True, importance="fisher", steps=3, score_batches=32)
    assert cfg(trim_vocab=True, keep_params=0.5, importance="fisher", steps=3, score_batches=32).steps == 3


def test_recover_may_return_a_new_model(model):
    import copy

    pruned, _ = prune_model(model, cfg(keep_params=0.7, steps=2, importance="magnitude"),
                            PruneContext(recover=lambda m, step: copy.deepcopy(m)))
    assert pruned is not model and Encoder(pruned).heads()[0] < HEADS


def test_latency_target_prunes_until_met(model):
    latency = lambda m: count_params(m) / 10_000  # noqa: E731  (a caller's measurement, proportional to size)
    target = latency(model) * 0.97
    pruned, m = prune_model(model, cfg(target_latency_ms=target, steps=10, latency_step=0.2,
                                       importance="magnitude"), PruneContext(latency_fn=latency))
    assert m["target_reached"] and m["latency_ms_after"] <= target
    assert 1 <= len(m["steps"]) < 10 and all("latency_ms" in s for s in m["steps"])


def test_latency_target_out_of_reach_is_reported(model):
    pruned, m = prune_model(model, cfg(target_latency_ms=1e-6, steps=3, importance="magnitude"),
                            PruneContext(latency_fn=lambda m: 5.0))
    assert not m["target_reached"] and len(m["steps"]) == 3


def test_latency_target_needs_a_latency_function(model):
    with pytest.raises(StageError, match="latency_fn"):
        prune_model(model, cfg(target_latency_ms=1.0), PruneContext())


def test_unreachable_keep_params_is_refused_up_front(model):
    before = count_params(model)
    with pytest.raises(StageError, match="cannot be reached"):
        prune_model(model, cfg(keep_params=0.05, importance="magnitude"), PruneContext())
    assert count_params(model) == before


def test_taylor_without_batches_says_what_to_do(model):
    with pytest.raises(StageError, match="score_batches"):
        prune_model(model, cfg(keep_params=0.5), PruneContext())


def test_non_transformer_is_refused_for_heads_ffn():
    with pytest.raises(StageError, match="no encoder description"):
        prune_model(nn.Sequential(nn.Linear(4, 4)), cfg(keep_params=0.5, importance="magnitude"), PruneContext())


def test_distilbert_heads_and_neurons(tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)).eval()
    batch = make_batches(1)[0]
    pruned, m = prune_model(model, cfg(remove_heads=4, remove_neurons=64), PruneContext(score_batches=make_batches()))
    assert m["after"]["heads_per_layer"] == [2, 2] and m["after"]["neurons_per_layer"] == [32, 32]
    assert pruned.config.hidden_dim == 32
    pruned.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(AutoModelForSequenceClassification.from_pretrained(tmp_path), batch),
                               logits(pruned, batch))


# --- unstructured ------------------------------------------------------------------------------

def test_unstructured_reaches_sparsity_and_shrinks_the_compressed_file(model):
    batch = make_batches(1)[0]
    pruned, m = prune_model(model, cfg(method="unstructured", sparsity=0.6, steps=2), PruneContext())
    assert weight_sparsity(pruned) >= 0.6
    assert m["after"]["sparsity"] == m["sparsity"] >= 0.6 > m["before"]["sparsity"] and m["target_reached"]
    assert m["after"]["gzip_bytes"] < m["before"]["gzip_bytes"]
    assert m["params_after"] == m["params_before"]  # same shapes: dense runtimes do not get faster
    assert not any(n.endswith("_orig") for n, _ in pruned.named_parameters())  # masks folded in
    assert torch.isfinite(logits(pruned, batch)).all()
    assert [s["sparsity"] for s in m["steps"]][0] == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_unstructured_zeroes_the_smallest_weights_in_the_scope_asked_for(model, scope):
    from edgekd.pruning.unstructured import _targets

    first, name = _targets(model)[0]
    with torch.no_grad():
        getattr(first, name).mul_(10)  # one layer of large weights: only a per-layer share reaches into it
    before = {id(m): getattr(m, n).detach().abs().clone() for m, n in _targets(model)}
    pruned, m = prune_model(model, cfg(method="unstructured", sparsity=0.5, scope=scope, steps=2), PruneContext())
    assert (m["importance"], m["scope"]) == ("magnitude", scope)  # what ranked the weights, recorded truly
    layers = [(before[id(mod)], getattr(mod, n).detach()) for mod, n in _targets(pruned)]
    shares = [float((w == 0).float().mean()) for _, w in layers]
    if scope == "per_layer":  # every layer loses its own half, its smallest weights
        assert all(s == pytest.approx(0.5, abs=0.02) for s in shares)
        for w0, w in layers:
            assert float(w0[w == 0].max()) <= float(w0[w != 0].min())
    else:  # one ranking over all layers: no zeroed weight was larger than a kept one anywhere
        assert shares[0] < 0.1
        zeroed = torch.cat([w0[w == 0] for w0, w in layers])
        kept = torch.cat([w0[w != 0] for w0, w in layers])
        assert float(zeroed.max()) <= float(kept.min())
    assert weight_sparsity(pruned) >= 0.5


def test_an_unstructured_folder_pruned_before_the_scope_was_read_is_pruned_again():
    """Its fingerprint changes with the method's reading of prune.scope; heads-ffn's stays as it was."""
    from edgekd.stages.prune_common import prune_settings

    d = prune_settings(cfg(method="unstructured", sparsity=0.5))
    assert d["unstructured_reads_scope"] is True and d["scope"] == "per_layer"
    assert "unstructured_reads_scope" not in prune_settings(cfg(keep_params=0.5))


def test_unstructured_zeros_survive_recovery_training(model):
    batch = make_batches(1)[0]

    def recover(m, step):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m.train()
        m(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        return m.eval()

    pruned, _ = prune_model(model, cfg(method="unstructured", sparsity=0.5), PruneContext(recover=recover))
    assert weight_sparsity(pruned) >= 0.5


# --- channels (torch-pruning) ------------------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_channels_are_removed_and_the_model_runs(importance):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    batches = [{"x": torch.randn(4, 3, 16, 16), "labels": torch.randint(0, 10, (4,))} for _ in range(2)]
    params0 = count_params(model)
    pruned, m = prune_model(model, cfg(method="channels", keep_params=0.5, importance=importance, steps=2),
                            PruneContext(example_inputs=x, score_batches=batches))
    assert count_params(pruned) <= 0.5 * params0 * 1.05 and m["target_reached"]
    convs = [mod for mod in pruned.modules() if isinstance(mod, nn.Conv2d)]
    assert convs[0].out_channels < 16 and convs[1].out_channels < 32
    assert convs[1].in_channels == convs[0].out_channels  # coupled layers shrink together
    assert pruned.head.out_features == 10  # the output layer keeps its width
    out = pruned(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert all(p.grad is None for p in pruned.parameters())


def test_channels_need_example_inputs():
    pytest.importorskip("torch_pruning")
    with pytest.raises(StageError, match="example_inputs"):
        prune_model(SmallCNN(), cfg(method="channels", keep_params=0.5, importance="magnitude"), PruneContext())


# --- recipe ------------------------------------------------------------------------------------

def test_recipe_reports_every_prune_problem_at_once():
    with pytest.raises(RecipeError) as e:
        parse_recipe({"prune": {"enabled": True, "keep_params": 0.5, "sparsity": 0.5, "remove_heads": 2,
                                "method": "channels"}})
    text = str(e.value)
    assert "give one pruning target" in text and "need method 'heads-ffn'" in text
    assert "sparsity is the target of method 'unstructured'" in text


def test_recipe_needs_a_target_when_enabled():
    with pytest.raises(RecipeError, match="no target"):
        parse_recipe({"prune": {"enabled": True}})
    assert parse_recipe({"prune": {"enabled": True, "method": "unstructured", "sparsity": 0.5}}).prune.sparsity == 0.5


@pytest.mark.parametrize("importance", ["taylor", "fisher", "magnitude"])
def test_a_bf16_model_stays_bf16_and_runs_after_pruning(model, importance):
    """transformers' prune_linear_layer builds float32 layers; the pruned model keeps its own precision."""
    model = model.to(torch.bfloat16)
    ctx = PruneContext(score_batches=make_batches()) if importance != "magnitude" else PruneContext()
    pruned, _ = prune_model(model, cfg(keep_params=0.5, importance=importance), ctx)
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    out = logits(pruned, make_batches(1)[0])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
