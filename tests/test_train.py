"""The training loop: it learns, checkpoints each epoch, and resumes where it stopped."""

import numpy as np
import torch

from edgekd.losses import soft_hard_loss
from edgekd.recipe import TrainConfig
from edgekd.tasks.text import TextClassificationTask, TokenizedSplit
from edgekd.testing import sentiment_rows
from edgekd.train import predict, train


def _data(model_dir, n=96):
    task = TextClassificationTask(["negative", "positive"], max_length=16)
    tok = task.load_tokenizer(model_dir)
    rows = sentiment_rows(n, seed=3)
    return task, TokenizedSplit(task.tokenize(tok, [r[0] for r in rows]), np.array([r[1] for r in rows]), 0)


def _model(task, model_dir):
    torch.manual_seed(0)  # the fresh classification head is random: the same for every run
    return task.load_model(model_dir)


def _loss(m, batch):
    out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return soft_hard_loss(out.logits, None, batch["labels"], 0.0, 1.0)


def test_interrupted_training_resumes_to_the_same_weights(tiny_teacher_dir, tmp_path):
    task, data = _data(tiny_teacher_dir)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-3)

    full = _model(task, tiny_teacher_dir)
    res_full = train(full, data, cfg, _loss, seed=7, precision="fp32", ckpt_root=tmp_path / "a", description="t")
    assert res_full.epochs_run == [1, 2, 3] and res_full.resumed_from_epoch is None

    # Same run, stopped after the first epoch, then started again from scratch objects.
    part = _model(task, tiny_teacher_dir)
    r1 = train(part, data, cfg, _loss, seed=7, precision="fp32", ckpt_root=tmp_path / "b", description="t",
               stop_after_epochs=1)
    assert r1.epochs_run == [1]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["epoch-1"]
    resumed = _model(task, tiny_teacher_dir)
    r2 = train(resumed, data, cfg, _loss, seed=7, precision="fp32", ckpt_root=tmp_path / "b", description="t")
    assert r2.resumed_from_epoch == 1 and r2.epochs_run == [2, 3]
    assert len(r2.history) == 3
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_training_reduces_loss_and_predict_keeps_order(tiny_teacher_dir, tmp_path):
    task, data = _data(tiny_teacher_dir, n=128)
    model = _model(task, tiny_teacher_dir)
    res = train(model, data, TrainConfig(epochs=4, batch_size=16, lr=2e-3, warmup_ratio=0.0), _loss, seed=1,
                precision="fp32", ckpt_root=tmp_path, description="t")
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    logits = predict(model, data, batch_size=7, description="p")
    with torch.inference_mode():
        b = data.collate(np.arange(5))
        direct = model(input_ids=torch.from_numpy(b["input_ids"]),
                       attention_mask=torch.from_numpy(b["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(logits[:5], direct, atol=1e-4)
