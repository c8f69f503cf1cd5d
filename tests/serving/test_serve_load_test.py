"""benchmarks/load_test.py runs end to end on a tiny artifact and stops by itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"


@pytest.mark.slow
def test_load_test_smoke(export_dir, tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(export_dir), "--requests", "40", "--duration", "2", "--threads", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| batched | 32 |" in proc.stdout and "HTTP overhead at p50" in proc.stdout
    result = json.loads(out.read_text())
    assert [(r["mode"], r["clients"]) for r in result["http"]] == [
        ("floor: GET /v2/health/live", 1), ("floor: GET /v2/health/live", 32),
        ("unbatched", 1), ("unbatched", 32), ("batched", 1), ("batched", 32),
    ]
    assert all(r["sent"] <= 40 for r in result["http"])
    assert result["ratios"]["total_5xx"] == 0 and result["ratios"]["total_lost"] == 0
    assert result["raw"]["runner"] == "OnnxRunner"
