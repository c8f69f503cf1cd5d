from pathlib import Path

import pytest
import yaml

from edgekd.errors import RecipeError
from edgekd.recipe import BUILTIN_RECIPES, Recipe, load_recipe


@pytest.mark.parametrize("name", BUILTIN_RECIPES)
def test_every_builtin_recipe_loads_and_round_trips(name, tmp_path):
    r = load_recipe(name)
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    assert load_recipe(path) == r


def test_every_shipped_yaml_is_a_valid_recipe():
    folder = Path(__file__).parents[1] / "edgekd" / "recipes"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for f in files:
        load_recipe(f)


def test_unknown_keys_and_wrong_types_are_all_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "distill": {"temprature": 3, "alpha": 2},
        "data": {"max_length": "long"},
        "bogus": 1,
    }))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "distill.temprature: unknown key. Did you mean 'temperature'?" in msg
    assert "distill.alpha" in msg and "less than or equal to 1" in msg
    assert "data.max_length" in msg and "'long'" in msg
    assert "bogus: unknown key" in msg and "Allowed keys here:" in msg
    assert len(e.value.problems) == 4


def test_literal_errors_name_the_allowed_values():
    with pytest.raises(RecipeError, match="'forward' or 'reverse'"):
        load_recipe(overrides=["distill.kl=sideways"])


def test_overrides_apply_and_bad_override_is_explained():
    r = load_recipe(overrides=["distill.temperature=4", "student.layers=[1, 3, 5]"])
    assert r.distill.temperature == 4 and r.student.layers == [1, 3, 5]
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(overrides=["distill.temperature"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_student_model_and_layers_are_exclusive():
    with pytest.raises(RecipeError, match="either student.model or student.layers"):
        load_recipe(overrides=["student.model=some/model", "student.layers=[0]"])


def test_defaults_match_the_embedded_default():
    r = Recipe()
    assert r.teacher.model == "minilm-l6" and r.data.dataset == "rotten-tomatoes"


def test_readme_recipe_reference_is_current():
    """The README's reference is `edgekd recipe reference`; regenerate it when a key changes."""
    from edgekd.recipe import reference_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert reference_markdown().strip() in readme


def test_a_removed_key_at_its_old_default_still_loads_and_any_other_value_is_an_error(tmp_path):
    import warnings

    from edgekd.recipe import load_recipe

    saved = tmp_path / "recipe.yaml"
    saved.write_text("name: old\nexport: {targets: [onnx]}\nquantize: {enabled: true, torch_method: int8-dynamic}\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        recipe = load_recipe(saved)
    assert recipe.quantize.enabled and not hasattr(recipe.quantize, "torch_method")
    assert any("quantize.torch_method was removed" in str(w.message) for w in seen)
    saved.write_text("name: old\nexport: {targets: [onnx]}\nquantize: {enabled: true, torch_method: pt2e-xnnpack}\n")
    with pytest.raises(RecipeError, match=r"quantize.torch_method: removed .*delete it"):
        load_recipe(saved)
