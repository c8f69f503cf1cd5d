"""The layout's promises, checked: no import ring among the package's modules, both task families
satisfy the interfaces of edgekd/tasks/base.py and give every stage, and the registries the recipe
validates against agree with what registers itself."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from edgekd.errors import StageError

ROOT = Path(__file__).parents[1]
# The source folders and the package each installs as (pyproject's package-dir).
PACKAGES = {"edgekd": "edgekd", "export": "edgekd.export", "serving": "edgekd.serving", "devices": "edgekd.devices"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only; never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at the top or inside functions alike. Imports under
    ``if TYPE_CHECKING:`` are left out: they are for annotations and never execute. A module's
    import of its own parent package, or a package's of its own submodules, is not an edge."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        tree = ast.parse(f.read_text(), str(f))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not (is_pkg and n.startswith(m + ".")) and not m.startswith(n + "."):
                    graph[m].add(n)
    return graph


def rings(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_ring_finder_finds_a_ring():
    assert rings({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert rings({"a": {"b"}, "b": set()}) == []


def test_no_import_ring_among_the_package_modules():
    graph = import_graph()
    assert "edgekd.context" in graph and "edgekd.export.base" in graph and len(graph) > 100
    found = rings(graph)
    assert not found, "import rings (each a group of modules that import each other):\n" + "\n".join(
        ", ".join(r) for r in found)


def test_the_shared_context_imports_no_stage_and_no_task():
    deps = import_graph()["edgekd.context"]
    bad = sorted(d for d in deps if d.startswith(("edgekd.stages", "edgekd.tasks", "edgekd.pipeline")))
    assert not bad, f"edgekd/context.py imports {bad}"


# --- task families -----------------------------------------------------------------------------


def _signature_fits(impl, proto) -> bool:
    """The implementation takes every parameter the protocol names (extra ones need defaults)."""
    want = [p for p in inspect.signature(proto).parameters.values() if p.name != "self"]
    got = inspect.signature(impl).parameters
    if any(p.name not in got for p in want):
        return False
    extra = [p for name, p in got.items() if name != "self" and name not in {w.name for w in want}]
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in extra)


def _protocol_methods(proto) -> list[str]:
    return [n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")]


@pytest.fixture(scope="module")
def families():
    from edgekd.registry import TASKS
    from edgekd.tasks import get_family

    return {name: get_family(name) for name in TASKS}


def test_every_registered_family_is_a_task_family(families):
    from edgekd.tasks.base import TaskFamily

    assert set(families) == {"text-classification", "detection"}
    for name, fam in families.items():
        assert isinstance(fam, TaskFamily), name
        assert fam.name == name
        for meth in _protocol_methods(TaskFamily):
            assert _signature_fits(getattr(fam, meth), getattr(TaskFamily, meth)), f"{name}.{meth}"


def test_every_registered_family_serves_and_reports_itself():
    """Each family's serving side (serve.py) and summary side (summary.py) are found through its one
    registry line and say the task they are registered under; a family without one is a clear error."""
    from edgekd.errors import StageError
    from edgekd.registry import TASKS
    from edgekd.report import FamilySummary, family_summary
    from edgekd.serving.family import ServeFamily, serve_family

    for name in TASKS:
        served = serve_family(name)
        assert isinstance(served, ServeFamily) and served.task == name
        assert isinstance(family_summary(name), FamilySummary)
    with pytest.raises(StageError, match="not a registered task family"):
        serve_family("segmentation")


def test_both_tasks_and_their_splits_satisfy_the_protocols():
    """The classes the families build: their Task (what export, quantize and bench call) and their
    Split (what edgekd.train reads), checked attribute by attribute and signature by signature."""
    import numpy as np

    from edgekd.tasks.base import Split, Task
    from edgekd.tasks.detection.data import DetectionSplit
    from edgekd.tasks.detection.task import DetectionTask
    from edgekd.tasks.text.task import TextClassificationTask, TokenizedSplit

    tasks = [TextClassificationTask(["negative", "positive"], 16), DetectionTask(["circle", "square"], 32)]
    for task in tasks:
        assert isinstance(task, Task), type(task).__name__
        for meth in _protocol_methods(Task):
            assert _signature_fits(getattr(task, meth), getattr(Task, meth)), f"{type(task).__name__}.{meth}"
    for cls in (TokenizedSplit, DetectionSplit):
        for meth in [*_protocol_methods(Split), "__len__"]:
            assert _signature_fits(getattr(cls, meth), getattr(Split, meth)), f"{cls.__name__}.{meth}"
    assert isinstance(TokenizedSplit([[2, 3]], np.array([0]), 0), Split)


def test_a_class_missing_a_method_is_not_a_task():
    from edgekd.tasks.base import Task

    class NoMetrics:
        name, label_names, primary_metric, agreement = "x", [], "accuracy", None

        def load_model(self, source): ...
        def model_io(self): ...
        def export_module(self, model): ...
        def export_meta(self): ...

    assert not isinstance(NoMetrics(), Task)


def test_every_family_gives_every_task_stage_or_says_it_does_not(families):
    from edgekd.pipeline import STAGE_ORDER, TASK_STAGES, stage_table

    for name, fam in families.items():
        own = fam.stages()
        for stage in TASK_STAGES:
            assert stage in own or fam.skipped.get(stage), f"{name} lacks the {stage} stage and does not say why"
        assert set(own) <= set(TASK_STAGES), f"{name} gives stages the pipeline does not run: {set(own) - set(TASK_STAGES)}"
        for key, stage in own.items():
            assert stage.name == key
        assert list(stage_table(name)) == [s for s in STAGE_ORDER if s in own or s not in TASK_STAGES]


def test_a_family_lacking_a_stage_is_refused(monkeypatch, families):
    from edgekd.errors import StageError
    from edgekd.pipeline import stage_table

    fam = families["detection"]
    stages = {k: v for k, v in fam.stages().items() if k != "baseline"}
    monkeypatch.setattr(fam, "stages", lambda: stages)
    with pytest.raises(StageError, match="lacks stage.*baseline"):
        stage_table("detection")
    monkeypatch.setattr(fam, "skipped", {"baseline": "no hard-label baseline for this task"})
    assert "baseline" not in stage_table("detection")


# --- registries ----------------------------------------------------------------------------------


def test_registries_agree_with_what_registers():
    from edgekd import registry
    from edgekd.pruning import registered_methods as prune_methods
    from edgekd.quantization import registered_methods as quantize_methods

    for table, registered in ((registry.PRUNE_METHODS, prune_methods()), (registry.QUANTIZE_METHODS, quantize_methods())):
        assert set(table) == set(registered)
        for name, cls in registered.items():
            assert cls.__module__ == table[name], name


def test_onnx_quantized_folders_cover_every_quantize_method():
    from edgekd.export import get_exporter
    from edgekd.export.base import quantized_folder
    from edgekd.registry import QUANTIZE_METHODS

    assert set(get_exporter("onnx").quantized) == set(QUANTIZE_METHODS)
    # the folder names run folders already hold
    assert [quantized_folder("onnx", m) for m in ("dynamic", "static", "fp16")] == [
        "onnx-int8", "onnx-int8-static", "onnx-fp16"]
    assert quantized_folder("coreml", "palettize", palette_bits=6) == "coreml-palettize6"
    assert quantized_folder("coreml", "linear8", palette_bits=6) == "coreml-linear8"


def test_device_profiles_name_the_registered_export_targets():
    from edgekd.devices.profiles import TARGETS
    from edgekd.export import registered

    assert set(TARGETS) == set(registered())


@pytest.mark.parametrize("key,value,valid", [
    ("task", "segmentation", "text-classification, detection"),
    ("prune.method", "lottery", "heads-ffn, channels, unstructured"),
    ("quantize.method", "int4", "dynamic, static, fp16"),
])
def test_recipe_names_outside_the_registries_are_refused_with_the_valid_ones(key, value, valid):
    from edgekd.errors import RecipeError
    from edgekd.recipe import parse_recipe

    section, _, field = key.rpartition(".")
    data = {section: {field: value}} if section else {field: value}
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    assert key in str(err.value) and f"registered: {valid}" in str(err.value)


def test_every_stage_of_the_table_is_a_command_with_the_tables_help():
    """Adding a stage to the table gives it `edgekd <stage>`: the commands come from the table."""
    import typer

    from edgekd import pipeline
    from edgekd.cli import app

    commands = typer.main.get_command(app).commands
    assert set(pipeline.STAGE_HELP) == set(pipeline.STAGE_ORDER)
    for name in pipeline.STAGE_ORDER:
        assert name in commands, name
        assert commands[name].help == pipeline.STAGE_HELP[name]


def test_shared_stages_name_no_task_family():
    """Export, quantize and bench reach family-specific inputs through the context's hooks
    (ood_data, bench_torch_models, parity/validation/calibration data), never by task name."""
    root = Path(__file__).resolve().parents[1] / "edgekd" / "stages"
    for path in root.glob("*.py"):
        text = path.read_text()
        for word in ("text-classification", '"detection"', "tasks.text", "tasks.detection", "FromTrimmedIds"):
            assert word not in text, f"{path.name} names {word}"


def test_a_family_without_an_ood_set_refuses_one(tmp_path):
    from edgekd.recipe import parse_recipe
    from edgekd.tasks import get_family

    recipe = parse_recipe({"task": "detection", "output_dir": str(tmp_path),
                           "eval": {"ood_dataset": "amazon-snippets"}})
    with pytest.raises(StageError, match=r"eval.ood_dataset \(amazon-snippets\): task 'detection' cannot be scored"):
        get_family("detection").create_context(recipe).ood_data()
    assert get_family("detection").create_context(parse_recipe(
        {"task": "detection", "output_dir": str(tmp_path), "eval": {"ood_dataset": None}})).ood_data() is None
