"""Every encoder family through its description: student building (verified block by block), the
states distillation matches, heads/FFN pruning that makes the model smaller and reloads."""

from __future__ import annotations

import pytest
import torch
from encoder_families import FAMILIES, batch, classifier

from edgekd.encoders import blocks, family_of, verify_student
from edgekd.errors import RecipeError, StageError
from edgekd.pruning.encoder import Encoder, load_pruned_model
from edgekd.recipe import PruneConfig
from edgekd.students import build_student

COPYABLE = [f for f in FAMILIES if f != "albert"]


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def tensors(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def same_block(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("family", COPYABLE)
def test_student_blocks_are_the_requested_teacher_blocks(family):
    teacher = classifier(family)
    student = build_student(teacher, [0, 2])
    t, s = blocks(teacher), blocks(student)
    assert len(s) == 2 and student.config.num_hidden_layers == 2
    assert same_block(s[0], t[0]) and same_block(s[1], t[2])
    assert not same_block(s[1], t[1])  # the old bug: ModernBERT's model.layers.N got layers 0 and 1
    assert logits(student, batch()).shape == (4, 2)


@pytest.mark.parametrize("family", ["bert", "modernbert", "deberta-v3"])
def test_a_wrong_copy_is_caught(family):
    teacher = classifier(family)
    student = build_student(teacher, [0, 2])
    with torch.no_grad():
        next(blocks(student)[1].parameters()).add_(1e-3)
    with pytest.raises(StageError, match=r"student block 1 differs from teacher block 2"):
        verify_student(teacher, student, [0, 2])
    with pytest.raises(StageError, match=r"student block 0 (differs from|and) teacher block 1"):
        verify_student(teacher, build_student(teacher, [0, 2]), [1, 2])


def test_modernbert_layers_keep_their_attention_kind():
    teacher = classifier("modernbert")  # global attention in layers 0 and 3, local in 1 and 2
    with pytest.raises(RecipeError, match="student layer 1 would be local attention but teacher layer 3 is global"):
        build_student(teacher, [0, 3])
    with pytest.raises(RecipeError, match="student layer 0 would be global attention, no attention norm but "
                       "teacher layer 3 is global attention"):
        build_student(teacher, [3])


def test_a_deberta_v2_convolution_stays_after_the_block_it_follows():
    """deberta-v2-xlarge/xxlarge run the encoder's convolution after block 0 only: a student whose first block
    is another teacher block ran that block, then a convolution trained to follow block 0."""
    import transformers as T
    from encoder_families import config

    cfg = config("deberta-v2", 45)
    cfg.conv_kernel_size, cfg.conv_act, cfg.num_labels = 3, "gelu", 2
    torch.manual_seed(0)
    teacher = T.AutoModelForSequenceClassification.from_config(cfg).eval()
    assert teacher.deberta.encoder.conv is not None
    with pytest.raises(RecipeError, match=r"student layer 0 would be followed by the encoder's convolution "
                       r"\(encoder.conv\) but teacher layer 1 is \. "):
        build_student(teacher, [1, 3])
    student = build_student(teacher, [0, 2])  # block 0 keeps its place before the convolution
    assert same_block(blocks(student)[0], blocks(teacher)[0]) and student.deberta.encoder.conv is not None


def test_albert_layer_copy_is_refused_with_the_reason():
    with pytest.raises(RecipeError, match="shares one set of block weights"):
        build_student(classifier("albert"), [0, 2])


def test_an_unknown_family_names_what_a_description_needs():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(StageError, match="model_type 'gpt2'") as e:
        family_of(model)
    assert "list of blocks" in str(e.value) and "fused QKV" in str(e.value) and "intermediate size" in str(e.value)
    with pytest.raises(StageError, match="model_type 'gpt2'"):
        build_student(model, [0])


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_states_exist_for_every_block(family):
    model = classifier(family)
    model.set_attn_implementation("eager")
    b = batch()
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                output_attentions=family_of(model).attention_maps)
    n = model.config.num_hidden_layers
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n
    assert out.attentions[0].shape == (4, 4 if family != "minilm" else 8, 10, 10)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_and_ffn_pruning_shrinks_the_model_and_it_reloads(family, tmp_path):
    model = classifier(family, seed=1)
    enc = Encoder(model)
    before = sum(p.numel() for p in model.parameters())
    heads0, neurons0 = enc.heads(), enc.neurons()
    h_scores, n_scores = enc.magnitude_scores()
    assert [len(s) for s in h_scores] == heads0 and [len(s) for s in n_scores] == neurons0
    enc.remove_neurons({i: list(range(0, n, 2)) for i, n in enumerate(neurons0)})
    assert enc.neurons() == [n // 2 for n in neurons0]
    if family == "mpnet":  # heads go uniformly (shared relative-position bias): see the MPNet tests below
        enc.remove_heads({i: [1] for i in range(len(heads0))})
        assert enc.heads() == [h - 1 for h in heads0]
    else:
        last = len(heads0) - 1  # ALBERT: one shared block, so 0
        enc.remove_heads({0: [1], last: [0, 2]} if last else {0: [1]})
        assert enc.heads()[0] == heads0[0] - 1 and (not last or enc.heads()[-1] == heads0[-1] - 2)
        assert enc.original_head_ids(0) == [h for h in range(heads0[0]) if h != 1]
    b = batch()
    out = logits(model, b)
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) < before
    model.save_pretrained(tmp_path)
    reloaded = load_pruned_model(tmp_path)
    assert Encoder(reloaded).heads() == enc.heads() and Encoder(reloaded).neurons() == enc.neurons()
    torch.testing.assert_close(logits(reloaded, b), out)


@pytest.mark.parametrize("family", ["deberta-v3", "modernbert"])
def test_unequal_widths_and_sliced_heads_reload(family, tmp_path):
    model = classifier(family, seed=2)
    enc = Encoder(model)
    enc.remove_neurons({0: [1, 2, 3], 2: [0]})
    enc.remove_heads({1: [0]})
    enc.remove_heads({1: [0]})  # a second step: current index 0 is now original head 1
    assert enc.original_head_ids(1) == [2, 3]
    model.save_pretrained(tmp_path)
    b = batch()
    torch.testing.assert_close(logits(load_pruned_model(tmp_path), b), logits(model, b))


@pytest.mark.parametrize("family", ["bert", "distilbert", "deberta-v2", "modernbert", "albert"])
def test_pruning_a_head_removes_what_its_mask_removes(family):
    """Zeroing a head's context (what taylor scoring masks) and removing it give the same logits."""
    from edgekd.encoders import get

    model = classifier(family, seed=3)
    enc = Encoder(model)
    b = batch()
    d = enc.head_size(0)
    handle = get(enc.blocks[0], enc.layout.attn_out).register_forward_pre_hook(
        lambda _m, a: (torch.cat([a[0][..., :d], torch.zeros_like(a[0][..., d:2 * d]), a[0][..., 2 * d:]], -1),))
    masked = logits(model, b)
    handle.remove()
    enc.remove_heads({0: [1]})
    torch.testing.assert_close(logits(model, b), masked, atol=1e-5, rtol=1e-4)


# --- MPNet: heads removed uniformly (one relative-position bias table, one column per head, for all layers)

def masked_logits(model, b, head_mask):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], head_mask=head_mask).logits


def test_mpnet_uniform_head_pruning_equals_the_head_mask_and_reloads(tmp_path):
    """Removing heads from every layer (and their bias columns) gives what MPNet's own head_mask gives."""
    model = classifier("mpnet", seed=5)
    enc = Encoder(model)
    b = batch()
    mask = torch.ones(4, 4)
    mask[:, [1, 3]] = 0
    want = masked_logits(model, b, mask)
    assert not torch.allclose(want, logits(model, b), atol=1e-6, rtol=0)  # the masked heads matter
    assert enc.remove_heads({i: [1, 3] for i in range(4)}) == {i: [1, 3] for i in range(4)}
    assert enc.heads() == [2, 2, 2, 2] and model.mpnet.encoder.relative_attention_bias.weight.shape == (32, 2)
    torch.testing.assert_close(logits(model, b), want, atol=1e-6, rtol=1e-5)
    # a second step by current index: current 0 is original head 0
    mask[:, 0] = 0
    assert enc.remove_heads({i: [0] for i in range(4)}) == {i: [0] for i in range(4)}
    assert enc.original_head_ids(3) == [2] and model.config.edgekd_pruned_heads == {str(i): [0, 1, 3] for i in range(4)}
    out = logits(model, b)
    model.save_pretrained(tmp_path)
    reloaded = load_pruned_model(tmp_path)
    assert reloaded.mpnet.encoder.relative_attention_bias.weight.shape == (32, 1)
    torch.testing.assert_close(logits(reloaded, b), out)
    torch.testing.assert_close(out, masked_logits(classifier("mpnet", seed=5), b, mask), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("remove", [{0: [1]}, {0: [1], 1: [1], 2: [1], 3: [2]}, {0: [1, 2], 1: [1], 2: [1], 3: [1]}])
def test_mpnet_heads_that_differ_between_layers_are_refused(remove):
    model = classifier("mpnet")
    enc = Encoder(model)
    b = batch()
    before = logits(model, b)
    with pytest.raises(StageError, match=r"the same heads in every layer \(MPNet adds one relative-position bias") as e:
        enc.remove_heads(remove)
    assert "prune.prune_heads: false" in str(e.value) and "layer 0: [1" in str(e.value)
    assert enc.heads() == [4, 4, 4, 4] and model.mpnet.encoder.relative_attention_bias.weight.shape == (32, 4)
    torch.testing.assert_close(logits(model, b), before)  # refused before anything changed


def test_mpnet_folder_with_heads_that_differ_between_layers_does_not_load(tmp_path):
    import json

    model = classifier("mpnet")
    Encoder(model).remove_heads({i: [1] for i in range(4)})
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["edgekd_pruned_heads"]["3"] = [2]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StageError, match="does not describe a model edgekd pruned.*layer 3: \\[2\\]"):
        load_pruned_model(tmp_path)


def scale_head(enc, layer, head, factor):
    from edgekd.encoders import get, head_projections

    d = enc.head_size(layer)
    block = enc.blocks[layer]
    with torch.no_grad():
        for p in head_projections(block, enc.layout):
            p.weight[head * d:(head + 1) * d] *= factor
            p.bias[head * d:(head + 1) * d] *= factor
        get(block, enc.layout.attn_out).weight[:, head * d:(head + 1) * d] *= factor


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_heads_ffn_removes_the_same_mpnet_heads_everywhere_by_summed_importance(scope, tmp_path):
    """Head 2 is weak in three layers, head 0 the weakest of all but in layer 3 only: summed over
    layers head 2 goes (a per-layer choice would have taken head 0 from layer 3)."""
    from edgekd.pruning import PruneContext, prune_model

    model = classifier("mpnet", seed=6)
    enc = Encoder(model)
    for layer in range(3):
        scale_head(enc, layer, 2, 0.5)
    scale_head(enc, 3, 0, 0.05)
    cfg = PruneConfig(enabled=True, method="heads-ffn", importance="magnitude", scope=scope, remove_heads=4,
                      prune_neurons=False)
    pruned, m = prune_model(model, cfg, PruneContext())
    assert m["steps"][0]["removed_head_ids"] == {str(i): [2] for i in range(4)}
    assert Encoder(pruned).heads() == [3, 3, 3, 3] and m["target_reached"]
    # a count rounds up to whole head indices: 5 heads asked of 4 layers -> 2 per layer
    pruned, m = prune_model(classifier("mpnet", seed=6), cfg.model_copy(update={"remove_heads": 5}), PruneContext())
    assert Encoder(pruned).heads() == [2, 2, 2, 2] and m["target_reached"]
    pruned.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(load_pruned_model(tmp_path), batch()), logits(pruned, batch()))


def test_heads_ffn_prunes_mpnet_heads_and_neurons_with_taylor_scores():
    from edgekd.pruning import PruneContext, prune_model

    cfg = PruneConfig(enabled=True, method="heads-ffn", importance="taylor", keep_params=0.6, score_batches=1,
                      min_heads_per_layer=2)
    pruned, m = prune_model(classifier("mpnet", seed=7), cfg, PruneContext(score_batches=[batch()]))
    heads = Encoder(pruned).heads()
    assert len(set(heads)) == 1 and heads[0] < 4 and m["prunable_params_after"] < m["prunable_params_before"]
    ids = m["steps"][0]["removed_head_ids"]
    assert len(ids) == 4 and len({tuple(v) for v in ids.values()}) == 1
    assert torch.isfinite(logits(pruned, batch())).all()


def test_family_table_says_mpnet_heads_go_uniformly():
    from edgekd.encoders import describe_families

    row = {r["family"]: r for r in describe_families()}["mpnet"]
    assert row["head pruning"] == "yes, the same heads in every layer (edgekd slicing)"


@pytest.mark.parametrize("per_example", [False, True], ids=["taylor", "fisher"])
@pytest.mark.parametrize("family", ["modernbert", "deberta-v3", "mpnet", "albert"])
def test_taylor_scores_run_for_the_family(family, per_example):
    from edgekd.pruning.scoring import taylor_scores

    model = classifier(family)
    heads, neurons = taylor_scores(Encoder(model), [batch()], per_example=per_example)
    assert [len(h) for h in heads] == Encoder(model).heads()
    assert all(float(n.sum()) > 0 for n in neurons)


@pytest.mark.parametrize("family", ["bert", "deberta-v3", "modernbert"])
def test_attention_matching_puts_back_the_attention_the_model_had(family):
    """After attention matching each model runs the attention it had (never one forced on it)."""
    from edgekd.tasks.text.distill import _use_attention

    model = classifier(family, layers=1)
    before = model.config._attn_implementation
    assert _use_attention(model, "eager") == before  # (transformers 4.57 may decline the switch; maps come anyway)
    _use_attention(model, before)
    assert model.config._attn_implementation == before
