"""The serving image installs the pinned versions. Docker itself cannot run in the test environment, so
the Dockerfile is checked as text, and the pins against the serve extra's full dependency tree."""

from __future__ import annotations

import re
import shlex
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "serving" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_install_step_reads_the_constraints():
    steps = _instructions()
    install = next(i for i, (op, arg) in enumerate(steps) if op == "RUN" and "pip install" in arg)
    args = shlex.split(steps[install][1].split("&&")[0])
    flag = next((a for a in args if a in ("-c", "--constraint") or a.startswith("--constraint=")), None)
    assert flag is not None, f"the image installs without constraints.txt: {steps[install][1]}"
    path = flag.split("=", 1)[1] if "=" in flag else args[args.index(flag) + 1]
    assert path == "constraints.txt"
    copied = [arg.split() for op, arg in steps[:install] if op == "COPY"]
    assert any("constraints.txt" in c[:-1] for c in copied), "constraints.txt is not copied before the install"
    assert "'.[serve]'" in steps[install][1] or ".[serve]" in args


def _closure(names_and_extras: list[tuple[str, set[str]]]) -> set[str]:
    """Every distribution installed for these requirements, by the metadata of this environment."""
    seen: set[str] = set()
    todo = list(names_and_extras)
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        dist = metadata.distribution(name)
        if (key, tuple(sorted(extras))) in seen:
            continue
        seen.add((key, tuple(sorted(extras))))
        for raw in dist.requires or []:
            req = Requirement(raw)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, set(req.extras)))
    return {k for k, _ in seen}


def test_every_package_the_image_installs_is_pinned():
    """The serve extra's whole dependency tree (as resolved here) has an exact pin in constraints.txt."""
    wanted = _closure([("edgekd", {"serve"})]) - {"edgekd"}
    pins = _pins()
    missing = sorted(n for n in wanted if n not in pins)
    assert not missing, f"constraints.txt pins none of {missing}: the image would install whatever is newest"
    assert "torch" not in wanted  # the serving image stays torch-free
    for name in wanted:  # and the pins are what this environment (the tested one) runs
        assert metadata.version(name) == pins[name], name


def test_base_image_python_matches_the_tested_one():
    import sys

    base = next(arg for op, arg in _instructions() if op == "FROM")
    m = re.match(r"python:(\d+\.\d+)", base)
    assert m and m.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}", base
