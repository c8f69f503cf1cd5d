import numpy as np
import pytest
import torch

from edgekd.errors import RecipeError
from edgekd.tasks.text.task import TextClassificationTask, TokenizedSplit


def test_fresh_head_for_a_bare_model_and_kept_head_for_a_classifier(tiny_teacher_dir, tiny_classifier_dir):
    task = TextClassificationTask(["negative", "positive"])
    assert not task.has_task_head(tiny_teacher_dir)
    assert task.has_task_head(tiny_classifier_dir)
    model = task.load_model(tiny_teacher_dir)
    assert model.config.num_labels == 2 and model.config.id2label[1] == "positive"


def test_student_copies_every_other_teacher_layer(tiny_teacher_dir):
    task = TextClassificationTask(["negative", "positive"])
    teacher = task.load_model(tiny_teacher_dir)
    layers = task.default_layers(teacher.config.num_hidden_layers)
    assert layers == [0, 2]
    student = task.build_student(teacher, layers)
    assert student.config.num_hidden_layers == 2
    t, s = teacher.bert.encoder.layer, student.bert.encoder.layer
    for i, tl in enumerate(layers):
        for (name, p_s), (_, p_t) in zip(s[i].named_parameters(), t[tl].named_parameters(), strict=True):
            assert torch.equal(p_s, p_t), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert n_s < n_t


@pytest.mark.parametrize("layers", [[0, 9], [], [1, 1]])
def test_bad_student_layers_are_explained(tiny_teacher_dir, layers):
    task = TextClassificationTask(["negative", "positive"])
    teacher = task.load_model(tiny_teacher_dir)
    with pytest.raises(RecipeError, match="student.layers"):
        task.build_student(teacher, layers)


def test_collate_pads_dynamically_and_batches_cover_every_example():
    split = TokenizedSplit([[2, 5, 3], [2, 3], [2, 6, 7, 8, 3]], np.array([0, 1, 0]), pad_id=0)
    b = split.collate([0, 1])
    assert b["input_ids"].shape == (2, 3)
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["input_ids"][1].tolist() == [2, 3, 0]
    order = np.concatenate(split.train_batches(batch_size=2, seed=0))
    assert sorted(order.tolist()) == [0, 1, 2]
    again = np.concatenate(split.train_batches(batch_size=2, seed=0))
    assert order.tolist() == again.tolist()
