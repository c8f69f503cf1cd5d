"""The text prune stage's recovery: whose soft targets it matches (prune.recover_soft_targets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.recipe import PruneConfig, parse_recipe
from edgekd.testing import tiny_recipe


def _spy_recovery(monkeypatch):
    """Record every recovery batch and the soft targets its loss was given, in order."""
    import edgekd.tasks.text.prune as text_prune

    seen: list[tuple[dict, torch.Tensor]] = []
    real_train, real_loss = text_prune.train, text_prune.soft_hard_loss
    current: dict = {}

    def train(model, data, tc, loss_fn, *a, **kw):
        def wrapped(m, batch):
            current["batch"] = {k: v.detach().clone() for k, v in batch.items()}
            return loss_fn(m, batch)

        return real_train(model, data, tc, wrapped, *a, **kw)

    def loss(student_logits, targets, labels, *a, **kw):
        seen.append((current["batch"], targets.detach().float().clone()))
        return real_loss(student_logits, targets, labels, *a, **kw)

    monkeypatch.setattr(text_prune, "train", train)
    monkeypatch.setattr(text_prune, "soft_hard_loss", loss)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("source", ["teacher", "unpruned", "teacher+unpruned"])
def test_recovery_matches_the_soft_targets_the_recipe_names(tmp_path, tiny_classifier_dir, tiny_csv, monkeypatch,
                                                             source):
    from edgekd.pipeline import run_stages
    from edgekd.stages.base import load_stage_model

    seen = _spy_recovery(monkeypatch)
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv,
                                      prune={"enabled": True, "keep_params": 0.6, "recover_epochs": 0.5,
                                             "recover_soft_targets": source}))
    ctx = run_stages(recipe, ["teacher", "distill", "prune"])
    assert seen, "the recovery never computed its loss"
    teacher_rows = torch.from_numpy(np.load(ctx.run.stage_dir("teacher") / "train_logits.npy")).float()
    unpruned = load_stage_model(ctx, "distill").eval()
    for batch, targets in seen[:3]:
        from_teacher = teacher_rows[batch["index"]]
        with torch.no_grad():
            from_unpruned = unpruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # the ensemble by hand: the mean of the two softmaxes at the distillation temperature
        t = recipe.distill.temperature
        mean = (torch.softmax(from_teacher.float() / t, -1) + torch.softmax(from_unpruned.float() / t, -1)) / 2
        candidates = {"teacher": from_teacher.float(), "unpruned": from_unpruned.float(),
                      "teacher+unpruned": t * torch.log(mean)}
        torch.testing.assert_close(torch.softmax(targets / t, -1), torch.softmax(candidates[source] / t, -1),
                                   atol=1e-5, rtol=1e-5)
        for name, other in candidates.items():  # the sources differ: the key was read
            if name != source:
                assert not torch.allclose(torch.softmax(targets / t, -1), torch.softmax(other / t, -1), atol=1e-3)
    assert ctx.run.stage_record("prune")["metrics"]["recover_soft_targets"] == source


def test_unpruned_soft_targets_are_refused_where_nothing_reads_them():
    with pytest.raises(ValueError, match="recover_soft_targets"):
        PruneConfig(enabled=True, method="channels", keep_params=0.5, recover_soft_targets="unpruned")
    with pytest.raises(ValueError, match="'teacher\\+unpruned' is read by method 'heads-ffn' only"):
        PruneConfig(enabled=True, method="channels", keep_params=0.5, recover_soft_targets="teacher+unpruned")
    with pytest.raises(ValueError, match="recover_soft_targets"):
        PruneConfig(enabled=True, keep_params=0.5, recover_soft_targets="student")  # not a choice


def test_ensemble_logits_soften_to_the_mean_of_the_models_distributions():
    from edgekd.losses import ensemble_logits, kd_kl

    a, b = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[-0.5, 3.0, 0.0]])
    for t in (1.0, 2.0, 4.0):
        want = (torch.softmax(a / t, -1) + torch.softmax(b / t, -1)) / 2
        torch.testing.assert_close(torch.softmax(ensemble_logits([a, b], t) / t, -1), want)
    # one model is its own ensemble (up to a constant the softmax ignores)
    torch.testing.assert_close(torch.softmax(ensemble_logits([a], 2.0) / 2.0, -1), torch.softmax(a / 2.0, -1))
    assert float(kd_kl(a, ensemble_logits([a, a], 2.0), 2.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        ensemble_logits([], 2.0)


def test_the_default_leaves_the_fingerprint_of_earlier_runs_alone():
    from edgekd.stages.prune_common import prune_settings

    assert "recover_soft_targets" not in prune_settings(PruneConfig(enabled=True, keep_params=0.5))
    assert prune_settings(PruneConfig(enabled=True, keep_params=0.5, recover_soft_targets="unpruned"))[
        "recover_soft_targets"] == "unpruned"


@pytest.mark.slow
def test_recovery_soup_ends_on_the_mean_of_copies_trained_from_the_same_weights(tmp_path, tiny_classifier_dir,
                                                                                tiny_csv, monkeypatch):
    import edgekd.tasks.text.prune as text_prune
    from edgekd.pipeline import run_stages
    from edgekd.stages.base import load_stage_model

    calls: list[dict] = []
    real_train = text_prune.train

    def train(model, data, tc, loss_fn, *a, seed, **kw):
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        orders = []

        def wrapped(m, batch):
            orders.append(batch["index"].tolist())
            return loss_fn(m, batch)

        out = real_train(model, data, tc, wrapped, *a, seed=seed, **kw)
        calls.append({"seed": seed, "start": start, "orders": orders,
                      "end": {k: v.detach().clone() for k, v in model.state_dict().items()}})
        return out

    monkeypatch.setattr(text_prune, "train", train)
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv,
                                      prune={"enabled": True, "keep_params": 0.6, "recover_epochs": 0.5,
                                             "recover_soup": 3}))
    ctx = run_stages(recipe, ["teacher", "distill", "prune"])
    assert len(calls) == 3, "one training per copy"
    # every copy starts from the pruned weights, not from the previous copy's result
    for c in calls[1:]:
        for k, v in calls[0]["start"].items():
            torch.testing.assert_close(c["start"][k], v, rtol=0, atol=0)
    assert len({c["seed"] for c in calls}) == 3
    assert len({str(c["orders"]) for c in calls}) == 3, "each copy reads its own batch order"
    saved = load_stage_model(ctx, "prune").state_dict()
    moved = 0
    for k, v in saved.items():
        if not v.is_floating_point():
            continue
        ends = [c["end"][k].float() for c in calls]
        torch.testing.assert_close(v.float(), torch.stack(ends).mean(0), rtol=1e-5, atol=1e-6)
        moved += not torch.allclose(ends[0], ends[1])
    assert moved, "the copies trained apart, so the mean is not any one of them"


def test_soup_averages_floats_keeps_agreeing_integers_and_refuses_others():
    from edgekd.errors import StageError
    from edgekd.tasks.text.prune import soup

    a = {"w": torch.tensor([1.0, 3.0]), "ids": torch.tensor([0, 1])}
    b = {"w": torch.tensor([3.0, 5.0]), "ids": torch.tensor([0, 1])}
    out = soup([a, b])
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(out["ids"], a["ids"])
    with pytest.raises(StageError, match="disagree on integer tensor 'ids'"):
        soup([a, {"w": b["w"], "ids": torch.tensor([1, 0])}])
    with pytest.raises(ValueError, match="recover_soup: 2 is read by method 'heads-ffn' only"):
        PruneConfig(enabled=True, method="channels", keep_params=0.5, recover_soup=2)
    from edgekd.stages.prune_common import prune_settings

    assert "recover_soup" not in prune_settings(PruneConfig(enabled=True, keep_params=0.5))  # earlier runs stay valid
    assert prune_settings(PruneConfig(enabled=True, keep_params=0.5, recover_soup=2))["recover_soup"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("score_loss", ["labels", "recovery"])
def test_heads_and_neurons_are_scored_on_the_loss_the_recipe_names(tmp_path, tiny_classifier_dir, tiny_csv,
                                                                   monkeypatch, score_loss):
    import edgekd.pruning.heads_ffn as heads_ffn
    from edgekd.losses import soft_hard_loss
    from edgekd.pipeline import run_stages
    from edgekd.pruning.scoring import default_loss
    from edgekd.stages.base import load_stage_model

    seen: list[tuple] = []
    real = heads_ffn.taylor_scores

    def spy(enc, batches, loss_fn=None, per_example=False):
        seen.append((loss_fn, list(batches)))
        return real(enc, batches, loss_fn, per_example)

    monkeypatch.setattr(heads_ffn, "taylor_scores", spy)
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv,
                                      prune={"enabled": True, "keep_params": 0.6, "recover_epochs": 0.5,
                                             "score_loss": score_loss}))
    ctx = run_stages(recipe, ["teacher", "distill", "prune"])
    assert len(seen) == 1, "one pruning step scores once"
    loss_fn, batches = seen[0]
    if score_loss == "labels":  # the model's own loss, on batches of model inputs and labels
        assert loss_fn is None and all("index" not in b for b in batches)
        return
    model = load_stage_model(ctx, "distill").eval()  # the model as it was scored (the tiny run trims no vocabulary)
    teacher_rows = torch.from_numpy(np.load(ctx.run.stage_dir("teacher") / "train_logits.npy")).float()
    d = recipe.distill
    with torch.no_grad():
        for batch in batches[:2]:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            want, _ = soft_hard_loss(logits, teacher_rows[batch["index"]], batch["labels"], d.alpha, d.temperature,
                                     d.kl)
            got = loss_fn(model, batch)
            torch.testing.assert_close(got, want)
            labels_only = default_loss(model, {k: v for k, v in batch.items() if k != "index"})
            assert abs(float(got) - float(labels_only)) > 1e-4, "the recovery's loss, not the labels' alone"


def test_score_loss_is_refused_where_nothing_reads_it():
    from edgekd.stages.prune_common import prune_settings

    with pytest.raises(ValueError, match="score_loss: 'recovery' is read by method 'heads-ffn'"):
        PruneConfig(enabled=True, method="channels", keep_params=0.5, score_loss="recovery")
    with pytest.raises(ValueError, match="magnitude takes no loss"):
        PruneConfig(enabled=True, keep_params=0.5, importance="magnitude", score_loss="recovery")
    PruneConfig(enabled=True, keep_params=0.5, importance="fisher", score_loss="recovery")
    assert "score_loss" not in prune_settings(PruneConfig(enabled=True, keep_params=0.5))  # earlier runs stay valid
    assert prune_settings(PruneConfig(enabled=True, keep_params=0.5, score_loss="recovery"))["score_loss"] == "recovery"
