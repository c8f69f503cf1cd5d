"""No documented recipe key is inert: every field of every config class in edgekd/recipe.py is read
somewhere in the code that runs the pipeline, the server or the bench.

A static scan over Python tokens (so a key named only in a comment or docstring does not count): a
field is read where its name follows a ``.`` (``cfg.palette_bits``) or stands alone as a string
(``getattr(cfg, "palette_bits")``, ``dump["palette_bits"]``), in any module but recipe.py itself.
Limitation: a read inside a function nothing calls still counts; the quantize stage's own tests
(tests/export/test_export_coreml.py) cover that its Core ML keys reach the stage.
"""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import edgekd.recipe as recipe

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("edgekd", "export", "serving", "devices")
# Keys read only where the scan does not look, each with its reason.
NOT_SCANNED: dict[str, str] = {
    "Recipe.output_dir": "read by Recipe.run_dir() in recipe.py (skipped: its validators would count as reads); "
                         "run_dir() is how every command finds runs/<name>",
}


def _reads(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in files:
        toks = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
        for i, tok in enumerate(toks):
            if tok.type == tokenize.NAME and i and toks[i - 1].string == ".":
                names.add(tok.string)
            elif tok.type == tokenize.STRING and i and toks[i - 1].type == tokenize.OP and toks[i - 1].string in "([,=:":
                names.add(tok.string.strip("'\""))
    return names


def _fields() -> list[tuple[str, str]]:
    """Every (section class, key) of the recipe, the task families' own sections included."""
    classes, todo = [], [recipe.Recipe]
    while todo:
        c = todo.pop()
        if c in classes:
            continue
        classes.append(c)
        for f in c.model_fields.values():
            for t in (f.annotation, *getattr(f.annotation, "__args__", ())):
                if isinstance(t, type) and issubclass(t, recipe.Section):
                    todo.append(t)
    return [(c.__name__, f) for c in classes for f in c.model_fields]


def inert_keys(files: list[Path], fields: list[tuple[str, str]]) -> list[str]:
    read = _reads(files)
    return [f"{cls}.{name}" for cls, name in fields if name not in read and f"{cls}.{name}" not in NOT_SCANNED]


def _code_files() -> list[Path]:
    return [p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")
            if p.name != "recipe.py" and not (p.name == "settings.py" and p.parent.parent.name == "tasks")]


def test_every_recipe_key_is_read():
    fields = _fields()
    assert len(fields) > 100  # the walk really sees every section
    assert inert_keys(_code_files(), fields) == []


def test_the_scan_finds_a_key_nothing_reads(tmp_path):
    # The scan must be able to fail: a key mentioned only in a comment and a docstring is inert.
    code = tmp_path / "stage.py"
    code.write_text('"""Uses quantize.palette_bits."""\n# palette_bits is documented\nx = cfg.coreml_mode\n'
                    'y = getattr(cfg, "per_channel")\n')
    fields = [("QuantizeConfig", "palette_bits"), ("QuantizeConfig", "coreml_mode"), ("QuantizeConfig", "per_channel")]
    assert inert_keys([code], fields) == ["QuantizeConfig.palette_bits"]
