"""``prune.hidden_size``: the residual stream of a BERT-layout encoder narrowed for real. Every weight keeps
exactly the kept dimensions, the folder reloads with plain ``from_pretrained`` to the same answers, the
least important dimensions are the ones removed, the narrowed model exports and packs into ONNX Runtime's
attention kernels with its own answers, and what cannot be narrowed is refused with why."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.errors import RecipeError, StageError
from edgekd.pruning import PruneContext, prune_model
from edgekd.pruning import hidden as hid
from edgekd.pruning.heads_ffn import config_problem
from edgekd.recipe import PruneConfig

LAYERS, HEADS, HIDDEN, FFN = 3, 4, 32, 64
HEAD = HIDDEN // HEADS


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from edgekd.testing import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("hidden-bert"), num_layers=LAYERS, hidden=HIDDEN, heads=HEADS,
                     intermediate=FFN, num_labels=2)


@pytest.fixture
def model(classifier_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():  # LayerNorms that are not all ones and zeros, so a wrong slice shows
        for n in hid.residual_norms(m):
            n.weight.uniform_(0.5, 1.5)
            n.bias.uniform_(-0.2, 0.2)
    return m


def batch(seed: int = 0, rows: int = 6, width: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (rows,), generator=g)}


def logits(m, b) -> torch.Tensor:
    with torch.no_grad():
        return m.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


KEEP = [0, 1, 3, 4, 6, 9, 10, 11, 13, 14, 17, 18, 20, 21, 22, 23, 24, 26, 27, 28, 29, 30, 31, 2]


def test_every_weight_keeps_exactly_the_kept_dimensions(model):
    import copy

    model.prune_heads({0: [1, 3], 1: [0], 2: [2]})  # 2, 3, 3 heads: 3 fit in 24 = 3 heads of 8
    before = copy.deepcopy(model)
    keep = sorted(KEEP)
    hid.remove_hidden(model, keep)
    k = torch.tensor(keep)
    eb, ea = before.bert.embeddings, model.bert.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert torch.equal(getattr(ea, name).weight, getattr(eb, name).weight[:, k])
    assert torch.equal(ea.LayerNorm.weight, eb.LayerNorm.weight[k]) and torch.equal(ea.LayerNorm.bias, eb.LayerNorm.bias[k])
    for la, lb in zip(model.bert.encoder.layer, before.bert.encoder.layer, strict=True):
        for p in ("query", "key", "value"):  # input columns only: the heads stay whole
            a, b = getattr(la.attention.self, p), getattr(lb.attention.self, p)
            assert torch.equal(a.weight, b.weight[:, k]) and torch.equal(a.bias, b.bias)
        assert torch.equal(la.intermediate.dense.weight, lb.intermediate.dense.weight[:, k])
        for a, b in ((la.attention.output, lb.attention.output), (la.output, lb.output)):
            assert torch.equal(a.dense.weight, b.dense.weight[k]) and torch.equal(a.dense.bias, b.dense.bias[k])
            assert torch.equal(a.LayerNorm.weight, b.LayerNorm.weight[k])
            assert torch.equal(a.LayerNorm.bias, b.LayerNorm.bias[k])
    assert torch.equal(model.bert.pooler.dense.weight, before.bert.pooler.dense.weight[k][:, k])
    assert torch.equal(model.bert.pooler.dense.bias, before.bert.pooler.dense.bias[k])
    assert torch.equal(model.classifier.weight, before.classifier.weight[:, k])
    assert torch.equal(model.classifier.bias, before.classifier.bias)
    # the heads kept their own weights and count
    assert [la.attention.self.num_attention_heads for la in model.bert.encoder.layer] == [2, 3, 3]
    assert model.config.hidden_size == 24 and model.config.num_attention_heads == 3
    assert logits(model, batch()).shape == (6, 2)


def test_the_narrowed_folder_reloads_with_from_pretrained_to_the_same_answers(model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model.prune_heads({0: [0, 2], 1: [1, 2], 2: [3]})
    hid.remove_hidden(model, sorted(KEEP))
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    b = batch(1)
    assert torch.allclose(logits(again, b), logits(model, b), atol=1e-6)
    assert [la.attention.self.num_attention_heads for la in again.bert.encoder.layer] == [2, 2, 3]
    # heads can still be removed afterwards, on the live model and the reloaded one alike
    for m in (model, again):
        m.prune_heads({2: [0]})
        assert m.bert.encoder.layer[2].attention.self.num_attention_heads == 2
        assert logits(m, b).shape == (6, 2)


def test_heads_ffn_removes_the_least_important_dimensions(model):
    drop = [3, 7, 12, 19, 25, 30, 1, 16]
    with torch.no_grad():  # those dimensions carry almost nothing anywhere
        for n in hid.residual_norms(model):
            n.weight[drop] = 1e-4
            n.bias[drop] = 0.0
        for e in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            getattr(model.bert.embeddings, e).weight[:, drop] = 0.0
    pruned, metrics = prune_model(model, PruneConfig(enabled=True, keep_params=0.5, hidden_size=24,
                                                     importance="magnitude"), PruneContext())
    step = metrics["steps"][0]["hidden_size"]
    assert step["before"] == 32 and step["after"] == 24 and sorted(step["removed_dims"]) == sorted(drop)
    assert metrics["after"]["hidden_size"] == 24 and hid.width(pruned) == 24
    assert logits(pruned, batch()).shape == (6, 2)


def test_taylor_scores_a_dimension_that_carries_nothing_at_zero(model):
    dead = [5, 11, 27]
    with torch.no_grad():
        for n in hid.residual_norms(model):
            n.weight[dead] = 0.0
            n.bias[dead] = 0.0
    from edgekd.pruning.scoring import default_loss

    scores = hid.taylor_scores(model, [batch(2), batch(3)], default_loss)
    assert scores.shape == (HIDDEN,)
    assert torch.all(scores[dead] == 0)
    alive = [i for i in range(HIDDEN) if i not in dead]
    assert torch.all(scores[alive] > 0)
    per_text = hid.taylor_scores(model, [batch(2)], default_loss, per_example=True)
    assert torch.all(per_text[dead] == 0) and torch.all(per_text[alive] > 0)


def test_a_narrowed_student_exports_and_packs_with_its_own_answers(model, classifier_dir, tmp_path):
    from test_attention_pack import padded, run
    from test_quantize import accuracy, export_folder, qcfg

    from edgekd.quantization import quantize_onnx
    from edgekd.tasks.text.first_token import FirstTokenClassifierExport

    model.prune_heads({0: [1], 1: [0], 2: [2]})
    hid.remove_hidden(model, sorted(KEEP))
    folder = export_folder(FirstTokenClassifierExport(model), classifier_dir, tmp_path / "onnx")
    feed = padded(12)
    want = logits(model, {k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    assert np.abs(run(folder / "model.onnx", feed) - want).max() < 1e-4
    labels = want.argmax(-1)
    report = quantize_onnx(folder, tmp_path / "q", qcfg(method="dynamic", fuse="packed", max_accuracy_drop=1.0),
                           feed, feed, labels, accuracy)
    assert report["fusion"]["fusions"] == {"Attention": 2, "MultiHeadAttention": 1}
    assert report["fusion"]["parity"]["max_abs_diff"] < 1e-4


def test_widths_that_cannot_be_built_are_refused_with_why(model):
    with pytest.raises(StageError, match="not a multiple of the attention head size 8"):
        hid.check_width(model, 20)
    with pytest.raises(StageError, match="room for 3 heads of 8.*would keep 4"):
        hid.check_width(model, 24)  # no head removed yet: 4 heads do not fit in 24
    with pytest.raises(StageError, match="32 wide"):
        hid.check_width(model, 32)
    with pytest.raises(RecipeError, match="32 wide already"):
        prune_model(model, PruneConfig(enabled=True, keep_params=0.5, hidden_size=40, importance="magnitude"),
                    PruneContext())


def test_other_families_are_refused_before_anything_changes(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    m = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, n_heads=4, n_layers=2,
                                                             hidden_dim=64, max_position_embeddings=32))
    with pytest.raises(RecipeError, match="BERT-layout encoders .*'distilbert'"):
        prune_model(m, PruneConfig(enabled=True, keep_params=0.5, hidden_size=24, importance="magnitude"),
                    PruneContext())
    assert m.config.dim == 32


@pytest.mark.parametrize("extra, says", [
    ({"method": "channels", "keep_params": 0.5}, "not 'channels'"),
    ({"keep_params": 0.5, "steps": 2}, "set steps: 1"),
    ({"max_accuracy_drop": 0.01}, "not a search"),
    ({"keep_params": 0.5, "recover_hidden_weight": 1.0}, "one or the other"),
])
def test_recipe_refuses_hidden_size_where_it_would_not_be_read(extra, says):
    with pytest.raises(ValueError, match=says):
        PruneConfig(enabled=True, hidden_size=24, **extra)


def test_the_prune_fingerprint_reads_hidden_size_and_leaves_earlier_runs_valid():
    from edgekd.stages.prune_common import prune_settings

    assert "hidden_size" not in prune_settings(PruneConfig(enabled=True, keep_params=0.5))  # earlier runs stay valid
    assert prune_settings(PruneConfig(enabled=True, keep_params=0.5, hidden_size=24))["hidden_size"] == 24


def test_an_electra_with_embeddings_as_wide_as_the_stream_reloads_narrowed(tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        ElectraConfig,
        ElectraForSequenceClassification,
    )

    torch.manual_seed(0)
    m = ElectraForSequenceClassification(ElectraConfig(
        vocab_size=50, embedding_size=32, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=64, max_position_embeddings=40)).eval()
    m.prune_heads({0: [0], 1: [0]})
    hid.remove_hidden(m, sorted(KEEP))
    assert m.config.embedding_size == 24
    m.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not hasattr(again.electra, "embeddings_project")
    b = batch(4)
    assert torch.allclose(logits(again, b), logits(m, b), atol=1e-6)


def test_a_bare_encoder_is_narrowed_like_a_classifier(classifier_dir, tmp_path):
    from transformers import AutoModel

    m = AutoModel.from_pretrained(classifier_dir).eval()
    m.prune_heads({0: [0], 1: [1], 2: [2]})
    assert hid.why_not(m) is None
    hid.remove_hidden(m, sorted(KEEP))
    m.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    b = batch(5)
    with torch.no_grad():
        want = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output
        got = again(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output
    assert want.shape == (6, 24) and torch.allclose(got, want, atol=1e-6)


def _weights(m) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kw, says", [
    ({"remove_neurons": 10, "hidden_size": 16}, "room for 2 heads of 8, but no head is removed"),  # no head may go
    ({"keep_params": 0.5, "prune_heads": False, "hidden_size": 16}, "room for 2 heads of 8"),
    # heads go, but not enough: what the target's step leaves is counted before anything changes
    ({"keep_params": 0.9, "hidden_size": 16}, "but no head is removed .* a layer keeps 4"),  # 0.9 rounds to none
    ({"keep_params": 0.8, "hidden_size": 16}, r"would keep 3 after the target's step \(heads per layer: "
                                             r"\[4, 4, 4\] -> \[3, 3, 3\]\)"),
    ({"remove_heads": 3, "hidden_size": 16}, "would keep 3 after the target's step"),
    ({"keep_params": 0.5, "min_heads_per_layer": 3, "hidden_size": 16}, "would keep 3 after the target's step"),
    ({"remove_heads": 5, "scope": "global", "hidden_size": 16}, r"would keep 3 at least: with prune.scope global"),
    ({"keep_params": 0.5, "hidden_size": 20}, "not a multiple of the attention head size 8"),
    ({"keep_params": 0.5, "hidden_size": 4}, "from one head"),
])
def test_a_width_no_head_removal_can_fit_is_refused_before_anything_changes(model, kw, says):
    before = _weights(model)
    with pytest.raises(RecipeError, match=says):
        prune_model(model, PruneConfig(enabled=True, importance="magnitude", **kw), PruneContext())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_heads_a_step_leaves_over_the_width_are_refused_before_the_step_removes_anything(model):
    # scope global: importance chose the layers (3, 1 and 2 heads), and 16 holds 2; up front, the 6 heads the
    # target removes could fit (2 from every layer), so only the step, once it has scored, can tell
    cfg = PruneConfig(enabled=True, importance="magnitude", keep_params=0.5, scope="global", hidden_size=16)
    assert config_problem(model.config, cfg) is None
    before = _weights(model)
    with pytest.raises(StageError, match="room for 2 heads of 8.*would keep 3"):
        prune_model(model, cfg, PruneContext())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_target_names_the_width_and_is_reached_only_at_it(model):
    _, metrics = prune_model(model, PruneConfig(enabled=True, importance="magnitude", keep_params=0.5,
                                                hidden_size=24), PruneContext())
    assert metrics["target"] == {"keep_params": 0.5, "hidden_size": 24} and metrics["target_reached"] is True
    from edgekd.pruning.stage import _target_report

    off = {**metrics, "after": {**metrics["after"], "hidden_size": 32}}
    assert _target_report(PruneConfig(enabled=True, keep_params=0.5, hidden_size=24), off, None)[1] is False


@pytest.mark.parametrize("prune, says", [
    ({"keep_params": 0.5, "hidden_size": 20}, "prune.hidden_size 20 is not a multiple of the attention head size 8"),
    ({"keep_params": 0.5, "hidden_size": 32}, "prune.hidden_size 32: the residual stream is 32 wide"),
    ({"remove_neurons": 10, "hidden_size": 16}, "prune.hidden_size 16 leaves room for 2 heads of 8, but no head"),
    ({"keep_params": 0.5, "hidden_size": 16}, None),
    # the student (teacher layers 0 and 2) and the heads the target leaves in each of its layers
    ({"keep_params": 0.9, "hidden_size": 16}, "prune.hidden_size 16 leaves room for 2 heads of 8, but no head"),
    ({"keep_params": 0.8, "hidden_size": 16}, "would keep 3 after the target's step (heads per layer: [4, 4] -> "
                                              "[3, 3])"),
    ({"remove_heads": 3, "hidden_size": 16}, "[4, 4] -> [2, 3]"),  # 3 over the student's 2 layers
    ({"remove_heads": 4, "hidden_size": 16}, None),  # 2 from each of them (over the teacher's 4: 1 each)
])
def test_recipe_check_reads_hidden_size_against_the_students_config(tmp_path, tiny_teacher_dir, tiny_csv, prune,
                                                                    says):
    from edgekd.recipe import parse_recipe
    from edgekd.recipe_check import check_inputs
    from edgekd.testing import tiny_recipe

    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, prune={"enabled": True, **prune}))
    problems = [p for p in check_inputs(recipe) if p.startswith("prune.")]
    if says is None:
        assert problems == []
    else:
        assert len(problems) == 1 and says in problems[0], problems


def test_recipe_check_refuses_hidden_size_for_another_family(tmp_path, tiny_csv):
    from transformers import DistilBertConfig

    from edgekd.recipe import parse_recipe
    from edgekd.recipe_check import check_inputs
    from edgekd.testing import tiny_recipe

    DistilBertConfig(vocab_size=50, dim=32, n_heads=4, n_layers=2, hidden_dim=64).save_pretrained(tmp_path / "db")
    recipe = parse_recipe(tiny_recipe(tmp_path, tmp_path / "db", tiny_csv,
                                      prune={"enabled": True, "keep_params": 0.5, "hidden_size": 16}))
    assert any(p.startswith("prune.hidden_size slices BERT-layout encoders") and "'distilbert'" in p
               for p in check_inputs(recipe))


def test_a_bf16_model_is_narrowed_and_stays_bf16(model):
    model = model.to(torch.bfloat16)
    pruned, _ = prune_model(model, PruneConfig(enabled=True, keep_params=0.5, hidden_size=24),
                            PruneContext(score_batches=[batch(6), batch(7)]))
    assert hid.width(pruned) == 24 and {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(pruned, batch()).float()).all()


def test_the_config_check_counts_the_fullest_layers_heads():
    from transformers import BertConfig

    no_head_goes = PruneConfig(enabled=True, remove_neurons=10, hidden_size=16)
    some = BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=3, pruned_heads={0: [0, 1, 2]})
    assert "a layer keeps 4" in config_problem(some, no_head_goes)  # layers 1 and 2 keep all 4
    every = BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, pruned_heads={0: [0, 1], 1: [2, 3]})
    assert config_problem(every, no_head_goes) is None  # 2 heads of 8 fit in 16
    # remove_heads 2 goes to the fullest layers, those with room: [1, 4, 4] -> [1, 3, 3], over 2
    assert "[1, 4, 4] -> [1, 3, 3]" in config_problem(some, PruneConfig(enabled=True, remove_heads=2,
                                                                          hidden_size=16))
    assert config_problem(some, PruneConfig(enabled=True, remove_heads=4, hidden_size=16)) is None


@pytest.mark.parametrize("kw", [
    {"keep_params": 0.9}, {"keep_params": 0.8}, {"keep_params": 0.5}, {"keep_params": 0.3}, {"remove_heads": 3},
    {"remove_heads": 6}, {"remove_heads": 7, "remove_neurons": 20}, {"keep_params": 0.5, "min_heads_per_layer": 3},
    {"keep_params": 0.7, "prune_neurons": False}, {"keep_params": 0.5, "prune_heads": False},
    {"keep_params": 0.5, "scope": "global"}, {"remove_heads": 5, "scope": "global"},
    {"remove_heads": 6, "scope": "global"}, {"remove_heads": 8, "scope": "global"},
])
@pytest.mark.parametrize("width", [16, 24])
def test_the_up_front_check_agrees_with_what_the_step_does(model, kw, width):
    """What the config check says before any training is what the stage does: refused up front exactly
    when the step would leave a layer more heads than the width holds (scope per_layer); with scope
    global, never refused up front where some choice of layers fits (the step checks its own)."""
    cfg = PruneConfig(enabled=True, importance="magnitude", hidden_size=width, **kw)
    up_front = config_problem(model.config, cfg)
    try:
        pruned, _ = prune_model(model, cfg, PruneContext())
        outcome = None
    except RecipeError as e:
        outcome = "refused before anything"
        assert up_front is not None and up_front in str(e)
    except StageError as e:  # the step's own check, on the layers importance chose
        assert kw.get("scope") == "global" and "would keep" in str(e), e
        outcome = "refused by the step"
    if outcome is None:
        assert up_front is None and hid.width(pruned) == width
    elif outcome == "refused by the step":
        assert up_front is None


def test_a_target_that_leaves_too_many_heads_is_refused_before_any_training(tmp_path, tiny_teacher_dir, tiny_csv):
    """The repro: 4 heads of 8 in a width of 32, keep_params 0.9 removes no head (a layer keeps 4, 16 holds 2).
    `edgekd recipe check` and every stage command refuse it; prune_model refuses it before it evaluates."""
    from transformers import AutoConfig

    from edgekd.recipe import parse_recipe
    from edgekd.recipe_check import check_inputs
    from edgekd.testing import tiny_recipe

    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv,
                                      prune={"enabled": True, "keep_params": 0.9, "hidden_size": 16}))
    assert [p for p in check_inputs(recipe) if p.startswith("prune.")] == [
        "prune.hidden_size 16 leaves room for 2 heads of 8, but no head is removed (prune.prune_heads is false, or "
        "the target or prune.min_heads_per_layer lets none go) and a layer keeps 4: set prune.keep_params or "
        "remove_heads with prune.prune_heads, or leave hidden_size unset"]

    from transformers import AutoModelForSequenceClassification

    cfg = PruneConfig(enabled=True, keep_params=0.9, hidden_size=16, importance="magnitude")
    m = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir, num_labels=2)
    evaluated = []
    with pytest.raises(RecipeError, match="a layer keeps 4"):
        prune_model(m, cfg, PruneContext(evaluate=lambda _m: evaluated.append(1) or {"accuracy": 0.5}))
    assert evaluated == []  # refused before the stage evaluated, let alone trained
    assert "a layer keeps 4" in config_problem(AutoConfig.from_pretrained(tiny_teacher_dir), cfg)
