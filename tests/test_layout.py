"""The package layout DESIGN.md promises: top-level export/, serving/, devices/ installed as
edgekd.export, edgekd.serving, edgekd.devices; a base install without heavy target backends."""

import importlib
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("module,folder", [("edgekd.export", "export"), ("edgekd.serving", "serving"),
                                           ("edgekd.devices", "devices")])
def test_top_level_folders_import_as_edgekd_subpackages(module, folder):
    mod = importlib.import_module(module)
    assert Path(mod.__file__).resolve() == (ROOT / folder / "__init__.py").resolve()


def test_package_dir_mapping_lists_every_subpackage():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping, packages = cfg["package-dir"], set(cfg["packages"])
    assert mapping["edgekd.export"] == "export" and mapping["edgekd.serving"] == "serving"
    assert mapping["edgekd.devices"] == "devices"
    # every folder with an __init__.py under a mapped root is listed, so a wheel ships it
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            pkg = ".".join([name, *rel.parts]) if rel.parts else name
            assert pkg in packages, f"{pkg} ({init.parent}) is missing from [tool.setuptools] packages"


def test_base_install_does_not_force_target_backends_or_training_on_a_server():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for heavy in ("coremltools", "executorch", "onnxruntime", "tensorrt", "ultralytics"):
        assert heavy not in base
    # `pip install edgekd[serve]` must not pull the training stack
    serve = [d.lower() for d in project["dependencies"] + project["optional-dependencies"]["serve"]]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for d in serve}
    assert not names & {"torch", "transformers", "accelerate", "torchvision"}
