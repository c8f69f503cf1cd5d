"""A student copied from a teacher whose heads (and FFN neurons) were pruned: what the teacher's config records
per layer (``pruned_heads``, ``edgekd_pruned_heads``, ``ffn_sizes_per_layer``) is keyed by teacher layer, and the
student gets each copied layer's entry under its own index. Copying layers [0, 2] of a teacher pruned in layer 2
raised a bare IndexError (Hugging Face pruned student layer 2, which does not exist)."""

from __future__ import annotations

import pytest
import torch
from encoder_families import FAMILIES, batch, classifier

from edgekd.encoders import SLICED_HEADS_KEY, blocks, family_of
from edgekd.pruning.encoder import FFN_SIZES_KEY, Encoder, load_pruned_model
from edgekd.students import build_student

COPYABLE = [f for f in FAMILIES if f != "albert"]


def tensors(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def same_block(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return set(ta) == set(tb) and all(ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta)


def logits(model, b):
    with torch.no_grad():
        return model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def pruned_teacher(family: str):
    """A 4-layer teacher with heads removed from layers 2 and 3 (MPNet: head 1 everywhere, its rule) and FFN
    neurons from layers 1 and 2 (unequal widths)."""
    teacher = classifier(family, seed=3)
    enc = Encoder(teacher)
    if family == "mpnet":
        enc.remove_heads({i: [1] for i in range(4)})
    else:
        enc.remove_heads({2: [1, 3], 3: [0]})
    enc.remove_neurons({1: [5], 2: [0, 1, 2]})
    return teacher


@pytest.mark.parametrize("family", COPYABLE)
def test_student_of_a_pruned_teacher_copies_the_pruned_layers(family, tmp_path):
    teacher = pruned_teacher(family)
    student = build_student(teacher, [0, 2])  # raised IndexError / a size mismatch before
    t, s = blocks(teacher), blocks(student)
    assert len(s) == 2 and same_block(s[0], t[0]) and same_block(s[1], t[2])
    assert Encoder(student).heads() == [Encoder(teacher).heads()[i] for i in (0, 2)]
    assert Encoder(student).neurons() == [64, 61]
    cfg = student.config
    if family_of(teacher).heads_sliced:
        want = {"0": [1], "1": [1]} if family == "mpnet" else {"1": [1, 3]}
        assert getattr(cfg, SLICED_HEADS_KEY) == want and not cfg.pruned_heads
    else:
        assert {k: sorted(v) for k, v in cfg.pruned_heads.items()} == {1: [1, 3]}
    assert getattr(cfg, FFN_SIZES_KEY) == [64, 61] and getattr(cfg, family_of(teacher).ffn_key) == 64
    # the teacher's own config is left as it was
    assert getattr(teacher.config, family_of(teacher).layers_key) == 4
    # and the student's folder reloads as the model it is
    b = batch()
    out = logits(student, b)
    student.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(load_pruned_model(tmp_path), b), out)


def test_student_of_layers_with_equal_ffn_widths_drops_the_per_layer_record():
    teacher = pruned_teacher("bert")
    student = build_student(teacher, [0, 3])  # layers 0 and 3 keep all 64 neurons
    assert not hasattr(student.config, FFN_SIZES_KEY) and student.config.intermediate_size == 64
    assert {k: sorted(v) for k, v in student.config.pruned_heads.items()} == {1: [0]}
    assert same_block(blocks(student)[1], blocks(teacher)[3])
