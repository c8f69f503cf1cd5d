"""benchmarks/prune_variants.py versus: a variant is compared with its own run only (refusals that
come before any model is read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def variants(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import prune_variants

    return prune_variants


def _run(path: Path, distill_fp: str) -> Path:
    path.mkdir()
    stages = {"teacher": {"fingerprint": "t1"}, "distill": {"fingerprint": distill_fp}}
    (path / "manifest.json").write_text(json.dumps({"stages": stages}))
    return path


def test_versus_needs_runs_and_their_variant_copies(variants, tmp_path):
    with pytest.raises(SystemExit, match="give the run folders whose '-fi' copies"):
        variants.main(["versus", "fi"])
    with pytest.raises(SystemExit, match="give the variant's name"):
        variants.main(["versus"])
    run = _run(tmp_path / "default-seed42", "d1")
    with pytest.raises(SystemExit, match="default-seed42-fi: no such variant run"):
        variants.main(["versus", "fi", str(run)])


def test_versus_refuses_a_variant_of_another_student(variants, tmp_path):
    run = _run(tmp_path / "default-seed42", "d1")
    _run(tmp_path / "default-seed42-fi", "d2")
    with pytest.raises(SystemExit, match="its distill stage is not .*default-seed42's"):
        variants.main(["versus", "fi", str(run)])
