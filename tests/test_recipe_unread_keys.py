"""A recipe key set where nothing reads it is refused, naming the key and what would read it.

tests/test_recipe_keys_read.py proves every key is read somewhere; these prove the conditions: a key
that only another setting, another task family or another kind of dataset makes anything read is an
error when that setting, family or dataset is absent, and accepted when it is there.
"""

from __future__ import annotations

import re

import pytest

from edgekd.errors import RecipeError
from edgekd.recipe import QuantizeCandidate, QuantizeConfig, Recipe, keys_set, load_recipe
from edgekd.recipe_check import check_inputs
from edgekd.sections import changed_keys
from edgekd.tasks import get_family


def _refused(base: str, overrides: list[str]) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(base, overrides)
    return str(e.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (["teacher.combine=most_confident"], "combine: chooses how the targets of several teachers become one, and "
                                         "teacher.ensemble is empty"),
    (["teacher.weight=2"], "weight: weighs this teacher against those of teacher.ensemble, which is empty"),
    (["teacher.client.timeout_s=3", "teacher.client.batch_size=8"],
     "client.batch_size, client.timeout_s: how black-box teachers are asked, and every teacher here is a local model"),
    (["teacher.api_key_header=X-API-Key"], "api_key_header: names the header that carries the key of api_key_env"),
    (["teacher.targets=logits"], "targets: a local model (kind 'model') gives its logits either way"),
    (["teacher.unlabelled.max_examples=10"], "max_examples: read the unlabelled texts of dataset, and no dataset"),
    (["teacher.augment.copies=0", "teacher.augment.delete_prob=0.3", "teacher.augment.min_words=6"],
     "teacher.augment.delete_prob, teacher.augment.min_words: shape perturbed copies of the training texts, and none "
     "are made"),
    (["distill.hidden_loss=mse"], "distill.hidden_loss: the loss of hidden-state matching, and none is on"),
    (["eval.ood_dataset=null", "eval.ood_min_abs_score=1.0"], "ood_min_abs_score: filters the out-of-domain set, "
                                                              "and eval.ood_dataset is null"),
    (["bench.min_runs=3"], "min_runs: the fewest runs a time budget may stop at, and bench.time_budget_s is unset"),
])
def test_a_key_that_only_another_setting_makes_read_is_refused_without_it(overrides, message):
    assert message in _refused("default", overrides)


@pytest.mark.parametrize("overrides", [
    # the setting that reads each key above
    ["teacher.ensemble=[{kind: onnx, path: /tmp/t}]", "teacher.combine=most_confident"],
    ["teacher.ensemble=[{kind: onnx, path: /tmp/t}]", "teacher.weight=2"],
    ["teacher.ensemble=[{kind: onnx, path: /tmp/t}]", "teacher.client.batch_size=8"],  # onnx reads the batch size
    ["teacher.ensemble=[{kind: v2, url: 'http://h:1', model_name: m}]", "teacher.client.timeout_s=3"],
    ["teacher.ensemble=[{kind: v2, url: 'http://h:1', model_name: m, api_key_env: K, api_key_header: X-API-Key}]"],
    ["teacher.unlabelled.dataset=tweet-snippets", "teacher.unlabelled.max_examples=10"],
    ["teacher.augment.copies=0", "teacher.augment.delete_prob=0.3", "prune.recover_fresh_copies=1"],
    ["distill.hidden_loss=mse", "prune.recover_hidden_weight=1.0"],
    ["distill.hidden_loss=mse", "distill.hidden_weight=1.0"],
    ["eval.ood_min_abs_score=1.0"],  # the default names amazon-snippets
    ["bench.min_runs=3", "bench.time_budget_s=2"],
])
def test_the_same_key_is_accepted_where_something_reads_it(overrides):
    load_recipe("default", overrides)


def test_client_keys_of_http_alone_are_refused_for_an_onnx_teacher():
    message = _refused("default", ["teacher.ensemble=[{kind: onnx, path: /tmp/t}]", "teacher.client.timeout_s=3",
                                   "teacher.client.batch_size=8"])
    # the batch size, which an onnx teacher reads, is not among the keys refused
    assert "Value error, client.timeout_s: how a server is asked over HTTP, and no teacher here is one (kind edgekd " \
           "or v2; kind onnx reads client.batch_size alone): drop it" in message


def test_a_candidates_own_key_must_be_read_by_its_own_setup():
    with pytest.raises(ValueError, match=re.escape(
            "quantize.candidates[0]: calibration_method: not read by the candidate's own setup (method dynamic): "
            "drop it from the candidate")):
        QuantizeConfig(enabled=True, method="static", candidates=[{"method": "dynamic", "calibration_method": "entropy"}])
    with pytest.raises(ValueError, match=re.escape(
            "quantize.candidates[1]: per_channel, reduce_range: not read by the candidate's own setup (method fp16)")):
        QuantizeConfig(enabled=True, candidates=[{"fuse": "packed"},
                                                 {"method": "fp16", "per_channel": True, "reduce_range": True}])
    with pytest.raises(ValueError, match=re.escape("percentile: not read by the candidate's own setup (method static, "
                                                   "calibration_method minmax)")):
        QuantizeConfig(enabled=True, candidates=[{"method": "static", "percentile": 99.9}])
    # the embedding keys: float rows are read beside 4-bit tables only, embedding_bits by int8 setups only
    with pytest.raises(ValueError, match=re.escape("quantize.candidates[0]: embedding_float_rows: not read by the "
                                                   "candidate's own setup (method dynamic, embedding_bits 8)")):
        QuantizeConfig(enabled=True, embedding_bits=4, candidates=[{"embedding_bits": 8, "embedding_float_rows": 100}])
    with pytest.raises(ValueError, match=re.escape("quantize.candidates[0]: embedding_bits: not read by the "
                                                   "candidate's own setup (method fp16)")):
        QuantizeConfig(enabled=True, candidates=[{"method": "fp16", "embedding_bits": 4}])
    assert QuantizeConfig(enabled=True, candidates=[{"embedding_bits": 4, "embedding_float_rows": 100}]).candidates
    # read by the candidate's own setup: accepted, the section's value inherited where the candidate is silent
    cfg = QuantizeConfig(enabled=True, calibration_method="entropy",
                         candidates=[QuantizeCandidate(method="static", per_channel=True, activation_type="qint8")])
    assert cfg.candidates[0].per_channel


def test_every_candidates_setup_is_checked_when_the_recipe_loads():
    """An fp16 candidate beside the section's 4-bit embeddings, smoothing or unsigned weights is refused when the
    recipe loads, naming the candidate and the key (it failed in the quantize stage, with pydantic's raw
    error); it leaves them out with embedding_bits: 8, smooth_alpha: 0 or unsigned_weights: false, and every
    setup then builds."""
    from edgekd.quantization.onnx_stage import candidate_configs

    message = _refused("default", ["quantize.candidates=[{fuse: packed}, {method: fp16}]"])
    assert ("quantize.candidates[1] (method fp16): embedding_bits: 4 quantizes the embeddings of an int8 method "
            "(dynamic or static); fp16 halves every weight instead (embedding_bits from the section): set "
            "embedding_bits: 8 in the candidate, or give it an int8 method (dynamic or static), or drop the "
            "candidate") in message
    message = _refused("default", ["quantize.smooth_alpha=0.5", "quantize.unsigned_weights=true",
                                   "quantize.candidates=[{method: fp16, embedding_bits: 8}]"])
    assert ("quantize.candidates[0] (method fp16): smooth_alpha narrows the activation ranges of int8 rounding; fp16 "
            "has none to narrow (smooth_alpha from the section): set smooth_alpha: 0 in the candidate") in message
    assert ("quantize.candidates[0] (method fp16): unsigned_weights stores int8 weights as uint8; fp16 has no int8 "
            "weights (unsigned_weights from the section): set unsigned_weights: false in the candidate") in message
    assert "embedding_bits: 4 quantizes" not in message  # the candidate's embedding_bits: 8 left it out
    recipe = load_recipe("default", ["quantize.smooth_alpha=0.5", "quantize.unsigned_weights=true",
                                     "quantize.candidates=[{method: fp16, embedding_bits: 8, smooth_alpha: 0, "
                                     "unsigned_weights: false}]"])
    assert [(c.method, c.embedding_bits, c.smooth_alpha, c.unsigned_weights)
            for _, c in candidate_configs(recipe.quantize)] == [("dynamic", 4, 0.5, True), ("fp16", 8, None, False)]
    # a key the candidate sets itself is named as its own
    message = _refused("default", ["quantize.candidates=[{method: fp16, embedding_bits: 8, smooth_alpha: 0.3}]"])
    assert "(smooth_alpha set in the candidate): drop smooth_alpha from the candidate" in message
    # nothing to switch off: refused
    assert ("quantize.candidates[0]: smooth_alpha: 0 turns the section's smoothing off for the candidate, and "
            "quantize.smooth_alpha is unset: drop it from the candidate") in _refused(
        "default", ["quantize.candidates=[{smooth_alpha: 0}]"])
    # the section's float rows beside its 4-bit tables are not a setup with int8 tables' to read
    recipe = load_recipe("default", ["quantize.embedding_float_rows=0", "quantize.candidates=[{embedding_bits: 8}]"])
    assert [c.embedding_bits for _, c in candidate_configs(recipe.quantize)] == [4, 8]


def test_changed_keys_compare_with_the_default_of_the_enclosing_section():
    # distill.train's default is the section's own (lr 1e-4), not TrainConfig's (5e-5)
    r = Recipe.model_validate({"distill": {"train": {"lr": 1e-4, "epochs": 4}}})
    assert changed_keys(r.distill, prefix="distill.") == ["distill.train.epochs"]
    assert keys_set(r, {"distill.train": "why"}) == ["distill.train.epochs: why: remove it"]
    assert keys_set(r, {"distill.train.lr": "why", "distill.alpha": "why"}) == []
    r = Recipe.model_validate({"detection": {"max_det": 5, "synthetic": {"seed": 2}}, "serve": {"max_images": 3}})
    assert keys_set(r, {"detection": "A", "serve.max_images": "B", "serve.max_items": "B"}) == [
        "detection.synthetic.seed, detection.max_det: A: remove them", "serve.max_images: B: remove it"]


# One value away from the default for every key a family never reads; the table must cover them all.
DETECTION_UNREAD = {
    "data.source": "mirror", "data.hub_config": "plain", "data.text_column": "sentence", "data.label_column": "y",
    "data.max_length": 32, "data.max_train_examples": 100, "data.normalize_labels": True,
    "data.drop_duplicates": False, "distill.alpha": 0.3, "distill.kl": "reverse", "distill.hidden_weight": 1.0,
    "distill.hidden_loss": ("mse", "distill.hidden_weight=1.0"),  # (alone refused on loading: no matching is on)
    "distill.attention_weight": 1.0, "distill.rounds": 2,
    "eval.ood_dataset": "amazon-snippets",
    # (alone it is refused on loading: no out-of-domain set is named)
    "eval.ood_min_abs_score": ("1.0", "eval.ood_dataset=amazon-snippets"),
    "teacher.kind": ("onnx", "teacher.path=/tmp/t"), "teacher.ensemble": ("[{kind: onnx, path: /tmp/t}]",),
    "teacher.targets": ("labels",), "export.first_token_last_layer": False, "serve.max_items": 4,
    "serve.max_length": 16, "serve.overflow": "reject", "bench.seq_lengths": ("[32]",), "bench.inputs": "synthetic",
    "bench.synthetic_vocab_size": 50, "prune.quant_aware": ("true", "quantize.method=dynamic",
                                                          # (dynamic reads no calibration texts)
                                                          "quantize.calibration_samples=128"),
    "teacher.unlabelled.dataset": "movie-snippets", "teacher.augment.copies": 1, "prune.recover_fresh_copies": 1,
    "prune.recover_soft_targets": "unpruned", "prune.recover_alpha": 0.8, "prune.recover_temperature": 4.0,
    "quantize.embedding_bits": 4, "quantize.fuse": "attention", "quantize.smooth_alpha": 0.5,
    # (student.model with it is refused on loading: the detector is then unset, refused too, see below)
    "student.layers": ("[0, 2]", "student.model=null"),
}
TEXT_UNREAD = {"detection": ("{max_det: 5}",), "serve.max_images": 2, "serve.max_image_pixels": 1000}
DETECTORS = ("a preset (edgekd-det-l, edgekd-det-s) or the folder of a detector saved by edgekd (config.json + "
             "model.safetensors)")
NO_STUDENT = ("student.model: a detector student is the one student.model names, and it is unset: set it to "
              f"{DETECTORS}")


@pytest.mark.parametrize(("family", "base", "values"), [
    ("detection", "detect-default", DETECTION_UNREAD), ("text-classification", "default", TEXT_UNREAD)])
def test_each_key_a_family_never_reads_is_refused_before_any_stage(family, base, values):
    assert set(values) == set(get_family(family).unread_keys)
    assert check_inputs(load_recipe(base)) == []
    for key, value in values.items():
        raw, *more = value if isinstance(value, tuple) else (str(value).lower() if isinstance(value, bool) else value,)
        problems = check_inputs(load_recipe(base, [f"{key}={raw}", *more]))
        if key == "student.layers":
            assert problems[1:] == [NO_STUDENT], problems
            problems = problems[:1]
        named = problems[0].split(": ")[0].split(", ") if len(problems) == 1 else []
        assert any(k == key or k.startswith(f"{key}.") for k in named), (key, problems)
        assert problems[0].endswith(("remove it", "remove them")), problems


def test_detection_refuses_the_text_keys_of_one_run_in_one_message_each_and_its_splits_unless_coco(tmp_path):
    problems = check_inputs(load_recipe("detect-default", ["distill.alpha=0.3", "distill.kl=reverse",
                                                           "data.split.seed=3", "data.split.test=0.2"]))
    assert problems == [
        "distill.alpha, distill.kl: only a text student's distillation reads it; a detector distils with "
        "detection.cls_weight, box_weight and feature_weight (at distill.temperature): remove them",
        "data.split.test, data.split.seed: only a COCO annotations file (.json) is cut by data.split; synthetic-shapes "
        "brings its own splits (detection.synthetic sizes the generated set): remove them"]
    coco = tmp_path / "annotations.json"
    coco.write_text("{}")
    assert check_inputs(load_recipe("detect-default", [f"data.dataset={coco}", "data.split.seed=3"])) == []


def test_the_synthetic_sets_sizes_and_seed_are_refused_with_a_dataset_of_its_own(tmp_path):
    sized = ["detection.synthetic.train=64", "detection.synthetic.seed=3"]
    coco = tmp_path / "annotations.json"
    coco.write_text("{}")
    yolo = tmp_path / "data.yaml"
    yolo.write_text("train: images/train\nval: images/val\nnames: [a]\n")
    for dataset in (coco, yolo):
        assert check_inputs(load_recipe("detect-default", [f"data.dataset={dataset}", *sized])) == [
            "detection.synthetic.train, detection.synthetic.seed: only the generated set (data.dataset: "
            f"synthetic-shapes) is sized and seeded by detection.synthetic; {dataset} brings its own images: "
            "remove them"]
        # detect-default spells out the defaults, which are accepted with any dataset
        assert check_inputs(load_recipe("detect-default", [f"data.dataset={dataset}"])) == []
    assert check_inputs(load_recipe("detect-default", sized)) == []  # the generated set reads them


def test_detection_refuses_augmented_copies_without_claiming_an_image_augmentation():
    # no detection stage augments its images (DetectionSplit.collate's flip_seed is passed by none)
    assert check_inputs(load_recipe("detect-default", ["teacher.augment.copies=1"])) == [
        "teacher.augment.copies: perturbed copies of training texts are for text classification; a detector trains "
        "on its training images as they are loaded (no augmented copies): remove it"]


def test_a_detection_student_must_be_a_detector_the_stages_build(tmp_path):
    """The distill stage builds student.model (a preset or a saved detector folder): anything else failed
    only there, after the teacher had trained."""
    from edgekd.tasks.detection.models import build_detector, save_detector
    from edgekd.testing import tiny_detector_config

    assert check_inputs(load_recipe("detect-default", ["student.model=null"])) == [NO_STUDENT]
    for bad in ("edgekd-det-m", "minilm-l6", str(tmp_path)):  # a typo, a text model, a folder without a detector
        assert check_inputs(load_recipe("detect-default", [f"student.model={bad}"])) == [
            f"student.model: '{bad}' is no detector the detection stages build: set it to {DETECTORS}"]
    save_detector(build_detector(tiny_detector_config(), 4, 32), tmp_path / "det")
    for good in ("edgekd-det-l", str(tmp_path / "det")):
        assert check_inputs(load_recipe("detect-default", [f"student.model={good}"])) == []


def test_a_saved_detector_for_other_classes_is_refused_before_anything_trains(tmp_path):
    """A saved teacher or student detector must detect the dataset's classes: the student's count was
    checked only when the distill stage loaded it, after the teacher stage had run. Read without images
    from the generated set, a data.yaml's names and a COCO file's categories."""
    import json

    from edgekd.tasks.detection.models import build_detector, save_detector
    from edgekd.testing import tiny_detector_config

    save_detector(build_detector(tiny_detector_config(), 4, 32), tmp_path / "four")
    save_detector(build_detector(tiny_detector_config(), 2, 32), tmp_path / "two")
    four, two = str(tmp_path / "four"), str(tmp_path / "two")
    shapes = "circle, square, triangle, cross"
    assert check_inputs(load_recipe("detect-default", [f"student.model={four}", f"teacher.model={four}"])) == []
    assert check_inputs(load_recipe("detect-default", [f"student.model={two}", f"teacher.model={two}"])) == [
        f"{key}: {two} detects 2 classes, the dataset has 4 ({shapes}): use a detector trained on this dataset, "
        "or a preset name to train one" for key in ("teacher.model", "student.model")]
    yolo = tmp_path / "data.yaml"
    yolo.write_text("train: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 3, "name": "dog"},
                                                                                {"id": 1, "name": "cat"}]}))
    for dataset in (yolo, coco):
        assert check_inputs(load_recipe("detect-default", [f"data.dataset={dataset}", f"student.model={two}"])) == []
        assert check_inputs(load_recipe("detect-default", [f"data.dataset={dataset}", f"student.model={four}"])) == [
            f"student.model: {four} detects 4 classes, the dataset has 2 (cat, dog): use a detector trained on this "
            "dataset, or a preset name to train one"]


def test_kd_settings_are_refused_where_no_detection_kd_term_reads_them():
    def problems(*overrides):
        return check_inputs(load_recipe("detect-default", list(overrides)))

    off = ["detection.cls_weight=0", "detection.box_weight=0"]
    assert problems("detection.feature_weight=0", "detection.feature_method=mgd") == [
        "detection.feature_method: chooses how the neck features are imitated, and detection.feature_weight is 0 "
        "(no feature imitation): give feature_weight a weight, or remove it"]
    assert problems("detection.feature_method=mgd") == []
    assert problems(*off, "detection.feature_weight=0", "distill.temperature=4") == [
        "distill.temperature: softens the class-score and box KD terms (and cwd feature imitation), and none is on "
        "(detection.cls_weight and box_weight are 0, feature_weight is 0): give cls_weight or box_weight a weight, "
        "or remove it"]
    assert problems(*off, "detection.feature_method=mse", "distill.temperature=4") == [
        "distill.temperature: softens the class-score and box KD terms (and cwd feature imitation), and none is on "
        "(detection.cls_weight and box_weight are 0, feature_method is mse): give cls_weight or box_weight a "
        "weight, or remove it"]
    # each term that reads the temperature: class scores, box distributions, cwd feature imitation (the default)
    for reads in ("detection.cls_weight=0.5", "detection.box_weight=0.5", "detection.feature_method=cwd"):
        assert problems(*off, reads, "distill.temperature=4") == [], reads
    assert problems(*off, "detection.feature_weight=0") == []  # left at its default: nothing to refuse


def test_transformer_only_quantize_settings_are_refused_for_a_detector_section_and_candidates():
    """On a detector's graph fuse finds nothing (packed fails in the quantize stage: no self-attention
    block) and smooth_alpha no MatMul over a float weight: refused before the teacher trains."""
    unread = get_family("detection").unread_keys
    candidates = ("[{fuse: packed}, {method: dynamic, smooth_alpha: 0.5, embedding_bits: 4, embedding_float_rows: 8}, "
                  "{method: dynamic, fuse: multihead}, {method: dynamic, fuse: none}]")
    assert check_inputs(load_recipe("detect-default", ["quantize.fuse=packed", "quantize.smooth_alpha=0.5",
                                                       f"quantize.candidates={candidates}"])) == [
        f"quantize.fuse: {unread['quantize.fuse']}: remove it",
        f"quantize.smooth_alpha: {unread['quantize.smooth_alpha']}: remove it",
        f"quantize.candidates[0].fuse, quantize.candidates[2].fuse: {unread['quantize.fuse']}: remove them",
        f"quantize.candidates[1].embedding_bits, quantize.candidates[1].embedding_float_rows: "
        f"{unread['quantize.embedding_bits']}: remove them",
        f"quantize.candidates[1].smooth_alpha: {unread['quantize.smooth_alpha']}: remove it"]
    # fuse: none fuses nothing, and the other keys of a candidate apply to a detector's convolutions
    assert check_inputs(load_recipe("detect-default", [
        "quantize.candidates=[{method: dynamic, fuse: none, per_channel: true}]"])) == []
    # the text family reads them
    assert check_inputs(load_recipe("default", ["quantize.fuse=packed", "quantize.smooth_alpha=0.5",
                                                "quantize.candidates=[{method: dynamic, fuse: multihead}]"])) == []


def test_the_guard_metric_must_be_one_the_task_computes():
    assert check_inputs(load_recipe("default", ["quantize.guard_metric=map50"])) == [
        "quantize.guard_metric: 'map50' is not a metric of text-classification (its metrics: accuracy, macro_f1): set "
        "one of them"]
    assert check_inputs(load_recipe("default", ["quantize.guard_metric=macro_f1"])) == []
    # a detection recipe that leaves the text default would fail in the quantize stage, after training
    assert check_inputs(load_recipe("detect-default", ["quantize.guard_metric=accuracy"])) == [
        "quantize.guard_metric: 'accuracy' is not a metric of detection (its metrics: map50_95, map50): set one of them"]
    assert check_inputs(load_recipe("detect-default", ["quantize.enabled=false", "quantize.guard_metric=accuracy"])) \
        == []


def test_text_data_keys_that_a_named_dataset_or_a_local_file_does_not_read(tmp_path, tiny_csv):
    assert check_inputs(load_recipe("default", ["data.text_column=sentence", "data.drop_duplicates=false"])) == [
        "data.text_column, data.drop_duplicates: only a local file or a Hugging Face id is read with it, and "
        "'rotten-tomatoes' is a named dataset, read as pinned (its own columns and labels, repeated texts dropped): "
        "remove them"]
    problems = check_inputs(load_recipe("default", [f"data.dataset={tiny_csv}", "data.source=mirror",
                                                    "data.hub_config=plain"]))
    assert problems[0].startswith("data.source: chooses where a named dataset comes from, and ")
    assert problems[1] == f"data.hub_config: names a Hugging Face dataset's configuration, and {tiny_csv} is a local " \
                          "file: remove it"
    # a hub id reads both its columns and its configuration
    assert check_inputs(load_recipe("default", ["data.dataset=owner/name", "data.hub_config=plain",
                                                "data.text_column=sentence"])) == []


def test_the_out_of_domain_set_is_one_load_ood_reads():
    from edgekd import assets
    from edgekd.ood import OOD_SETS

    assert all(assets.get_asset(name, "dataset") for name in OOD_SETS)
    assert check_inputs(load_recipe("default", ["eval.ood_dataset=rotten-tomatoes"])) == [
        "eval.ood_dataset: 'rotten-tomatoes' is not an out-of-domain set (the sets: amazon-snippets, tweet-snippets, "
        "nyt-snippets, movie-snippets): name one, or null for none"]
    assert check_inputs(load_recipe("default", ["eval.ood_dataset=tweet-snippets"])) == []


def test_the_synthetic_vocabulary_is_refused_where_a_run_times_its_real_texts():
    # a run's bench always has the test texts (edgekd.stages.bench passes them): with inputs real, no id is drawn
    assert check_inputs(load_recipe("default", ["bench.synthetic_vocab_size=50"])) == [
        "bench.synthetic_vocab_size: synthetic ids are drawn only with bench.inputs: synthetic, and this run's bench "
        "times its real test texts: remove it, or set bench.inputs: synthetic"]
    assert check_inputs(load_recipe("default", ["bench.synthetic_vocab_size=50", "bench.inputs=synthetic"])) == []


def test_fine_tuning_keys_for_a_teacher_that_has_its_head_stop_the_teacher_stage(tmp_path, tiny_classifier_dir,
                                                                                  tiny_teacher_dir, tiny_csv):
    """The stage fine-tunes only a teacher without a task head; for one with a head the keys would do nothing."""
    from edgekd.pipeline import run_stages
    from edgekd.recipe import parse_recipe
    from edgekd.testing import tiny_recipe

    raw = tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv, teacher={"finetune": {"epochs": 3, "lr": 1e-3}})
    with pytest.raises(RecipeError, match=re.escape(
            f"teacher.finetune.epochs, teacher.finetune.lr: train(s) a teacher that has no task head yet, and "
            f"{tiny_classifier_dir} has one, so the teacher stage trains nothing")):
        run_stages(parse_recipe(raw), ["teacher"])
    assert not (tmp_path / "runs" / "tiny" / "teacher" / "model").exists()
    # a teacher without its head reads them: tiny_recipe gives it fine-tuning keys, and the classifier none
    assert "finetune" in tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv)["teacher"]
    assert "finetune" not in tiny_recipe(tmp_path, tiny_classifier_dir, tiny_csv)["teacher"]


def test_matching_a_black_box_teachers_hidden_states_is_refused_before_it_is_asked():
    black_box = ["teacher.kind=v2", "teacher.url=http://teacher:8000", "teacher.model_name=m",
                 "teacher.augment.copies=0"]
    for key in ("distill.hidden_weight", "distill.attention_weight"):
        assert check_inputs(load_recipe("default", [*black_box, f"{key}=0.5"])) == [
            "distill.hidden_weight / distill.attention_weight: a black-box teacher has no hidden states or attention "
            "maps to match; set them to 0, or use a local teacher (teacher.kind: model)"]
    assert check_inputs(load_recipe("default", black_box)) == []
    assert check_inputs(load_recipe("default", ["distill.hidden_weight=0.5"])) == []  # the local teacher has them
