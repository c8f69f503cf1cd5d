"""The text prune stage's recovery: whose soft targets it matches (prune.recover_soft_targets), how
much they weigh against the hard labels (prune.recover_alpha) and at what temperature
(prune.recover_temperature)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgekd.recipe import PruneConfig, parse_recipe
from edgekd.recipe_check import check_inputs
from edgekd.testing import tiny_recipe


def _spy_recovery(monkeypatch):
    """Record every recovery batch, the soft targets its loss was given, their weight and temperature, in order."""
    import edgekd.tasks.text.prune as text_prune

    seen: list[tuple[dict, torch.Tensor, float, float]] = []
    real_train, real_loss = text_prune.train, text_prune.soft_hard_loss
    current: dict = {}

    def train(model, data, tc, loss_fn, *a, **kw):
        def wrapped(m, batch):
            current["batch"] = {k: v.detach().clone() for k, v in batch.items()}
            return loss_fn(m, batch)

        return real_train(model, data, tc, wrapped, *a, **kw)

    def loss(student_logits, targets, labels, alpha, temperature, *a, **kw):
        seen.append((current["batch"], targets.detach().float().clone(), alpha, temperature))
        return real_loss(student_logits, targets, labels, alpha, temperature, *a, **kw)

    monkeypatch.setattr(text_prune, "train", train)
    monkeypatch.setattr(text_prune, "soft_hard_loss", loss)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(("source", "alpha", "temperature", "method"), [
    ("teacher", None, None, "heads-ffn"), ("unpruned", 0.8, None, "heads-ffn"),
    ("teacher+unpruned", None, 4.0, "heads-ffn"),  # the ensemble too is taken at the recovery's temperature
    ("unpruned", None, 1.0, "unstructured"),  # with hidden-state matching: every text recovery reads the keys
])
def test_recovery_matches_the_soft_targets_the_recipe_names(tmp_path, tiny_classifier_dir, tiny_csv, monkeypatch,
                                                             source, alpha, temperature, method):
    import edgekd.tasks.text.prune as text_prune
    from edgekd.pipeline import run_stages
    from edgekd.stages.base import load_stage_model

    seen = _spy_recovery(monkeypatch)
    hidden_calls = []
    real_hidden = text_prune.hidden_state_loss

    def hidden_loss(student, target, *a, **kw):
        hidden_calls.append((student.shape, target.shape))
        return real_hidden(student, target, *a, **kw)

    monkeypatch.setattr(text_prune, "hidden_state_loss", hidden_loss)
    ensemble_temperatures = []
    real_ensemble = text_prune.ensemble_logits

    def ensemble(sources, t):
        ensemble_temperatures.append(t)
        return real_ensemble(sources, t)

    monkeypatch.setattr(text_prune, "ensemble_logits", ensemble)
    target = {"sparsity": 0.5, "recover_hidden_weight": 1.0} if method == "unstructured" else {"keep_params": 0.6}
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv,
                                      prune={"enabled": True, "method": method, **target, "recover_epochs": 0.5,
                                             "recover_soft_targets": source, "recover_alpha": alpha,
                                             "recover_temperature": temperature}))
    ctx = run_stages(recipe, ["teacher", "distill", "prune"])
    assert seen, "the recovery never computed its loss"
    # every layer of the student matched against the unpruned model's, on every recovery batch
    layers = load_stage_model(ctx, "distill").config.num_hidden_layers
    assert len(hidden_calls) == (layers * len(seen) if method == "unstructured" else 0)
    assert all(s == t for s, t in hidden_calls)
    if method == "unstructured":
        assert ctx.run.stage_record("prune")["metrics"]["sparsity"] >= 0.5 - 1e-3
    # prune.recover_alpha weighs every recovery loss; unset, the distill stage's weight does
    want_alpha = alpha if alpha is not None else recipe.distill.alpha
    assert recipe.distill.alpha != 0.8  # the key's value and its default differ, so this reads the key
    assert {a for _, _, a, _ in seen} == {want_alpha}
    assert ctx.run.stage_record("prune")["metrics"]["recover_alpha"] == want_alpha
    # and prune.recover_temperature softens them; unset, the distill stage's temperature does
    want_t = temperature if temperature is not None else recipe.distill.temperature
    assert recipe.distill.temperature not in (1.0, 4.0)
    assert {t for _, _, _, t in seen} == {want_t}
    assert set(ensemble_temperatures) == ({want_t} if source == "teacher+unpruned" else set())
    assert ctx.run.stage_record("prune")["metrics"]["recover_temperature"] == want_t
    teacher_rows = torch.from_numpy(np.load(ctx.run.stage_dir("teacher") / "train_logits.npy")).float()
    unpruned = load_stage_model(ctx, "distill").eval()
    for batch, targets, _, _ in seen[:3]:
        from_teacher = teacher_rows[batch["index"]]
        with torch.no_grad():
            from_unpruned = unpruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # the ensemble by hand: the mean of the two softmaxes at the recovery's temperature
        t = want_t
        mean = (torch.softmax(from_teacher.float() / t, -1) + torch.softmax(from_unpruned.float() / t, -1)) / 2
        candidates = {"teacher": from_teacher.float(), "unpruned": from_unpruned.float(),
                      "teacher+unpruned": t * torch.log(mean)}
        torch.testing.assert_close(torch.softmax(targets / t, -1), torch.softmax(candidates[source] / t, -1),
                                   atol=1e-5, rtol=1e-5)
        for name, other in candidates.items():  # the sources differ: the key was read
            if name != source:
                assert not torch.allclose(torch.log_softmax(targets, -1), torch.log_softmax(other, -1), atol=1e-3)
    assert ctx.run.stage_record("prune")["metrics"]["recover_soft_targets"] == source


def test_unpruned_soft_targets_are_refused_where_nothing_reads_them(tmp_path, tiny_classifier_dir, tiny_csv):
    from edgekd.tasks import get_family

    with pytest.raises(ValueError, match="recover_soft_targets"):
        PruneConfig(enabled=True, keep_params=0.5, recover_soft_targets="student")  # not a choice
    # every text recovery reads them, unstructured too (the test above); a detector's does not
    for source in ("unpruned", "teacher+unpruned"):
        assert check_inputs(_detector_recipe(tmp_path, recover_soft_targets=source)) == [
            "prune.recover_soft_targets: it chooses a text recovery's soft targets; a detector recovers against its "
            "teacher: remove it"]
        text = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv,
                                        prune={"enabled": True, "method": "unstructured", "sparsity": 0.5,
                                               "recover_soft_targets": source, "recover_hidden_weight": 1.0}))
        assert get_family("text-classification").check_inputs(text) == []


def test_each_family_refuses_the_pruning_method_of_the_other(tmp_path, tiny_classifier_dir, tiny_csv):
    """Before any stage trains: the prune stage would otherwise fail after the teacher and the student."""
    from edgekd.tasks import get_family

    text = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv,
                                    prune={"enabled": True, "method": "channels", "keep_params": 0.5}))
    assert get_family("text-classification").check_inputs(text) == [
        "prune.method: 'channels' removes a CNN's conv channels; a text encoder is pruned with 'heads-ffn' "
        "(attention heads and FFN neurons) or 'unstructured' (the smallest weights)"]
    for method, target in (("heads-ffn", {"keep_params": 0.5}), ("unstructured", {"sparsity": 0.5})):
        detection = _detector_recipe(tmp_path, **{"method": method, "keep_params": None, **target})
        assert get_family("detection").check_inputs(detection) == [
            f"prune.method: '{method}' prunes a transformer encoder; a detector is pruned with 'channels'"]
    assert get_family("detection").check_inputs(_detector_recipe(tmp_path)) == []


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
    assert "recover_alpha" not in prune_settings(PruneConfig(enabled=True, keep_params=0.5))
    assert "recover_temperature" not in prune_settings(PruneConfig(enabled=True, keep_params=0.5))
    assert prune_settings(PruneConfig(enabled=True, keep_params=0.5, recover_temperature=4.0))[
        "recover_temperature"] == 4.0
    assert prune_settings(PruneConfig(enabled=True, keep_params=0.5, recover_alpha=0.9))["recover_alpha"] == 0.9
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


@pytest.mark.slow
def test_fresh_copies_are_new_texts_with_the_teachers_targets(tmp_path, tiny_classifier_dir, tiny_csv, monkeypatch):
    """prune.recover_fresh_copies: the recovery also reads perturbed copies that nothing labelled before,
    each with the teacher's own soft targets and its top label."""
    import edgekd.tasks.text.prune as text_prune
    from edgekd.pipeline import run_stages
    from edgekd.stages.base import load_stage_model
    from edgekd.teachers.unlabelled import normal_text

    seen = _spy_recovery(monkeypatch)
    datasets: list = []
    real_train = text_prune.train

    def train(model, data, *a, **kw):
        datasets.append(data)
        return real_train(model, data, *a, **kw)

    monkeypatch.setattr(text_prune, "train", train)
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv,
                                      teacher={"augment": {"copies": 1}},
                                      prune={"enabled": True, "keep_params": 0.6, "recover_epochs": 1,
                                             "recover_fresh_copies": 1}))
    ctx = run_stages(recipe, ["teacher", "distill", "prune"])
    m = ctx.run.stage_record("prune")["metrics"]
    n_train = len(ctx.splits.train)
    first_copies = json.loads((ctx.run.stage_dir("teacher") / "unlabelled.json").read_text())["texts"]
    n_fresh = m["recover_fresh_copies"]["texts"]
    assert n_fresh > 0 and m["recover_examples"] == n_train + len(first_copies) + n_fresh
    assert len(datasets[0]) == m["recover_examples"]
    # the fresh copies are none of the labelled texts and none of the teacher stage's copies
    from edgekd.tasks.text.prune import fresh_copies
    from edgekd.tasks.text.teacher import load_teacher_outputs
    from edgekd.teachers.stage import load_targets

    teacher, cached = load_teacher_outputs(ctx)
    targets, info = fresh_copies(ctx, teacher, load_targets(ctx, cached))
    fresh = targets.unlabelled_texts[len(first_copies):]
    assert len(fresh) == n_fresh and info == m["recover_fresh_copies"]
    known = {normal_text(t) for t in [*ctx.examples.texts, *first_copies]}
    assert not known & {normal_text(t) for t in fresh}
    # each fresh row's soft targets are the teacher's on that text, and its label the teacher's top one
    enc = ctx.tokenizer(fresh, truncation=True, max_length=recipe.data.max_length, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        want = torch.log_softmax(teacher(**enc).logits.float(), -1)
    rows = torch.from_numpy(targets.logits[-n_fresh:]).float()
    torch.testing.assert_close(rows, want, atol=1e-4, rtol=1e-4)
    checked = 0
    for batch, got, _, _ in seen:
        for j, i in enumerate(batch["index"].tolist()):
            if i >= n_train + len(first_copies):
                torch.testing.assert_close(got[j], want[i - n_train - len(first_copies)], atol=1e-4, rtol=1e-4)
                assert int(batch["labels"][j]) == int(want[i - n_train - len(first_copies)].argmax())
                checked += 1
    assert checked, "no recovery batch held a fresh copy"
    assert load_stage_model(ctx, "prune") is not None


def test_fresh_copies_are_refused_where_no_one_teacher_can_label_them(tmp_path, tiny_classifier_dir, tiny_csv):
    from edgekd.stages.prune_common import prune_settings
    from edgekd.tasks.text.checks import check_inputs

    def problems(teacher: dict, prune: dict) -> list[str]:
        raw = tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv, teacher=teacher,
                          prune={"enabled": True, "keep_params": 0.6, "recover_fresh_copies": 1, **prune})
        return [p for p in check_inputs(parse_recipe(raw)) if p.startswith("prune.recover_fresh_copies")]

    assert problems({}, {}) == []
    assert "a teacher giving labels only" in problems({"targets": "labels"}, {})[0]
    assert "an ensemble of teachers" in problems({"ensemble": [{"model": str(tiny_classifier_dir)}]}, {})[0]
    assert "no recovery trains on the copies" in problems({}, {"recover_epochs": 0})[0]
    assert "recover_fresh_copies" not in prune_settings(PruneConfig(enabled=True, keep_params=0.5))
    assert prune_settings(PruneConfig(enabled=True, keep_params=0.5, recover_fresh_copies=2))[
        "recover_fresh_copies"] == 2


def _detector_recipe(tmp_path, **prune):
    """A detection recipe pruning channels with one recovery epoch, plus ``prune``'s keys."""
    return parse_recipe({"task": "detection", "output_dir": str(tmp_path), "eval": {"ood_dataset": None},
                         "student": {"model": "edgekd-det-s"},
                         "prune": {"enabled": True, "method": "channels", "keep_params": 0.5, "recover_epochs": 1,
                                   **prune}})


def test_a_black_box_teacher_or_a_detector_cannot_have_fresh_copies(tmp_path, tiny_classifier_dir, tiny_csv):
    from edgekd.tasks import get_family

    raw = tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv, teacher={"kind": "onnx", "path": str(tmp_path)},
                      prune={"enabled": True, "keep_params": 0.6, "recover_fresh_copies": 1})
    problems = get_family("text-classification").check_inputs(parse_recipe(raw))
    assert any(p.startswith("prune.recover_fresh_copies") and "a black-box teacher" in p for p in problems)
    detection = _detector_recipe(tmp_path, recover_fresh_copies=1)
    assert check_inputs(detection) == [
        "prune.recover_fresh_copies: perturbed copies of training texts are for text classification; a detector "
        "recovers on its own training images: remove it"]


def test_recover_alpha_and_temperature_are_refused_only_where_no_recovery_reads_them(tmp_path, tiny_classifier_dir,
                                                                                    tiny_csv):
    from edgekd.tasks import get_family

    with pytest.raises(ValueError, match="recover_alpha"):
        PruneConfig(enabled=True, keep_params=0.5, recover_alpha=1.5)  # a weight in [0, 1]
    with pytest.raises(ValueError, match="recover_temperature"):
        PruneConfig(enabled=True, keep_params=0.5, recover_temperature=0)  # a temperature above 0
    # every text recovery reads them (unstructured too); a detector's does not
    assert check_inputs(_detector_recipe(tmp_path, recover_temperature=4.0)) == [
        "prune.recover_temperature: it softens a text recovery's soft targets; a detector recovers with its own "
        "detection and distillation losses (at distill.temperature): remove it"]
    detection = _detector_recipe(tmp_path, recover_alpha=0.8)
    assert check_inputs(detection) == [
        "prune.recover_alpha: it weighs a text recovery's soft targets against its labels; a detector recovers "
        "with its own detection and distillation losses: remove it"]
    text = parse_recipe(tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv,
                                    prune={"enabled": True, "method": "unstructured", "sparsity": 0.5,
                                           "recover_alpha": 0.8}))
    assert not [p for p in get_family("text-classification").check_inputs(text) if "recover_alpha" in p]


@pytest.mark.slow
def test_a_labels_only_teachers_recovery_learns_its_labels_with_cross_entropy(tmp_path, tiny_classifier_dir, tiny_csv,
                                                                              monkeypatch):
    """Every teacher gives labels only: the distill stage learns them with α·CE(teacher's labels) + (1−α)·CE;
    the recovery took the stored one-hot rows as soft targets at T²·KL (about T times the distill stage's term).
    Now it learns them as the distill stage did: no temperature, no KL."""
    import torch.nn.functional as F

    import edgekd.tasks.text.prune as text_prune
    from edgekd.pipeline import run_stages

    seen = _spy_recovery(monkeypatch)  # soft_hard_loss: must not be what the recovery calls
    calls = []
    from edgekd.losses import teacher_labels_loss as real

    def spy(logits, teacher_labels, labels, alpha):
        loss, logs = real(logits, teacher_labels, labels, alpha)
        want = alpha * F.cross_entropy(logits.float(), teacher_labels) + (1 - alpha) * F.cross_entropy(logits.float(),
                                                                                                       labels)
        torch.testing.assert_close(loss, want)
        calls.append((teacher_labels.clone(), alpha))
        return loss, logs

    monkeypatch.setattr(text_prune, "teacher_labels_loss", spy, raising=False)
    data = tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv, teacher={"targets": "labels"},
                       prune={"enabled": True, "keep_params": 0.6, "recover_epochs": 0.5})
    recipe = parse_recipe(data)
    ctx = run_stages(recipe, ["teacher", "distill", "prune"])
    assert calls and not seen
    rows = np.load(ctx.run.stage_dir("teacher") / "train_logits.npy")
    assert {a for _, a in calls} == {recipe.distill.alpha}
    assert all(set(lab.tolist()) <= set(rows.argmax(1).tolist()) for lab, _ in calls)


def test_soft_target_keys_are_refused_where_a_labels_only_teacher_leaves_nothing_reading_them(tmp_path,
                                                                                            tiny_classifier_dir,
                                                                                            tiny_csv):
    from edgekd.errors import RecipeError

    def parse(distill: dict, prune: dict | None = None):
        raw = tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv, teacher={"targets": "labels"}, distill=distill,
                          prune=prune or {})
        return parse_recipe(raw)

    with pytest.raises(RecipeError, match=r"distill.temperature, distill.kl: every teacher gives labels only"):
        parse({"temperature": 4.0, "kl": "reverse"})
    with pytest.raises(RecipeError, match=r"prune.recover_temperature: every teacher gives labels only"):
        parse({}, {"enabled": True, "keep_params": 0.6, "recover_temperature": 3.0})
    parse({"temperature": 4.0, "kl": "reverse", "rounds": 2})  # born-again rounds learn a student's soft targets
    parse({"temperature": 4.0, "kl": "reverse"}, {"enabled": True, "keep_params": 0.6,
                                                   "recover_soft_targets": "unpruned"})
