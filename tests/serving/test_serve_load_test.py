"""benchmarks/load_test.py runs end to end on a tiny artifact, offline, and stops by itself.

Only the script's code paths and bookkeeping are checked (every phase ran within its bounds, no
5xx, no lost request, every figure of the report is there), never a timing target: those belong
to the real run on a real artifact.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"
REQUESTS = 40
ROUNDS = 2

CLIENTS = ["lean", pytest.param("wrk", marks=pytest.mark.skipif(shutil.which("wrk") is None,
                                                                 reason="wrk is not installed"))]


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_load_test_smoke(export_dir, tmp_path, client):
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(export_dir), "--requests", str(REQUESTS), "--duration", "2",
         "--rounds", str(ROUNDS), "--threads", "1", "--client", client, "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Client: {client}." in proc.stdout
    assert "| batched | 32 |" in proc.stdout and "HTTP overhead at p50" in proc.stdout
    result = json.loads(out.read_text())
    pays = result["ratios"]["batching_speedup_32"] >= 1.1
    assert ("batching pays for this artifact here" if pays else "batching does not pay for this artifact here") in proc.stdout
    assert result["client"] == client
    assert sorted((r["mode"], r["clients"]) for r in result["http"]) == sorted([
        ("floor: GET /v2/health/live", 1), ("floor: GET /v2/health/live", 32),
        ("unbatched", 1), ("unbatched", 32), ("batched", 1), ("batched", 32),
    ])
    for row in result["http"]:
        assert row["client"] == client
        # wrk stops each round's slice with at most one request in flight per connection
        assert 0 < row["ok"] <= row["sent"] <= REQUESTS + ROUNDS * row["clients"], row
        assert len(row["slices"]) == ROUNDS, row
        assert row["ok"] + row["abandoned"] == row["sent"], row
        assert row["5xx"] == 0 and row["4xx"] == 0 and row["lost"] == 0 and row["errors"] == 0, row
        assert row["server_finished"] >= row["ok"], row  # the server's own count agrees
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("p50_ms", "p90_ms", "p99_ms", "req_per_s")), row
        if row["mode"].startswith("floor"):
            assert row["runner_calls"] == 0, row
        else:
            assert row["runner_calls"] >= 1 and row["mean_batch"] >= 1, row
    if client == "lean":  # the lean client waits for its requests in flight: none abandoned
        assert all(r["abandoned"] == 0 for r in result["http"])
    raw = result["raw"]
    assert raw["runner"] == "OnnxRunner" and len(raw["runner_p50_ms_per_pass"]) == ROUNDS + 1
    for k in ("runner_p50_ms", "runner_p99_ms", "tokenize_run_p50_ms", "tokenize_run_p99_ms", "batch1_texts_per_s", "batch32_texts_per_s"):
        assert math.isfinite(raw[k]) and raw[k] > 0, k
    ratios = result["ratios"]
    for k in ("http_overhead_p50_ms", "http_overhead_vs_run_p50_ms", "http_overhead_p50_ms_median_of_rounds",
              "floor_p50_ms", "batching_speedup_32", "runner_batch32_gain"):
        assert math.isfinite(ratios[k]), k
    assert len(ratios["http_overhead_p50_ms_per_round"]) == len(ratios["batching_speedup_32_per_round"]) == ROUNDS
    assert ratios["total_5xx"] == 0 and ratios["total_lost"] == 0 and ratios["total_4xx"] == 0
    assert len(result["load_average_before"]) == 3 and len(result["load_average_after"]) == 3
