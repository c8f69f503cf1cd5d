"""Adding a task family touches its own folder plus one registration line (README, Architecture).

``tests/toy_family/`` is a third family (rows of numbers, a linear model) that nothing in edgekd
knows. A fresh process adds its one line to ``edgekd.registry.TASKS`` and then uses it as a user
would: its recipe section loads and is checked, ``edgekd.run`` runs its stage and the shared export
stage with parity, the console summary shows its table, ``edgekd.load(...).predict`` and the HTTP
server (POST /predict, /metadata, OpenAPI, the v2 protocol) answer with its codec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import edgekd.registry
    edgekd.registry.TASKS["rows"] = "toy_family"  # the one registration line

    import edgekd
    from edgekd.errors import RecipeError
    from edgekd.recipe import load_recipe

    out, recipe_path = Path(sys.argv[1]), Path(sys.argv[2])
    facts = {}
    try:
        load_recipe(str(recipe_path.with_name("bad.yaml")))
    except RecipeError as e:
        facts["bad_key"] = str(e)

    run = edgekd.run(str(recipe_path))
    m = run.manifest
    facts["stages"] = sorted(m["stages"])
    facts["primary_metric"] = m["primary_metric"]
    onnx = m["stages"]["export"]["metrics"]["targets"]["onnx"]
    facts["export"] = {"status": onnx["status"], "parity": onnx["parity"]}

    from edgekd.progress import console
    from edgekd.report import print_summary
    from edgekd.runfolder import RunFolder
    with console.capture() as cap:
        print_summary(RunFolder(run.folder))
    facts["summary"] = cap.get()

    model = edgekd.load(run.folder)
    facts["local"] = model.predict([[2.0, 2.0, 2.0, 2.0], [-2.0, -2.0, -2.0, -2.0]])
    try:
        model.predict([[1.0, 2.0]])
    except Exception as e:
        facts["local_bad"] = f"{type(e).__name__}: {e}"

    from fastapi.testclient import TestClient
    from edgekd.serving import ServeSettings, create_app
    with TestClient(create_app(ServeSettings(export_dir=run.folder / "export" / "onnx"))) as client:
        r = client.post("/predict", json={"rows": [[1.5, 1.0, 0.5, 1.0], [-1.0, -2.0, -0.5, -1.0]]})
        facts["http"] = [r.status_code, r.json()]
        facts["http_bad"] = client.post("/predict", json={"rows": [[1.0]]}).json()
        facts["metrics"] = client.get("/metrics").text
        facts["metadata"] = client.get("/metadata").json()
        doc = client.get("/openapi.json").json()
        facts["openapi"] = doc["paths"]["/predict"]["post"]["requestBody"]
        facts["openapi_has_schema"] = "RowsRequest" in doc["components"]["schemas"]
        name = facts["metadata"]["model"]
        facts["v2_meta"] = client.get(f"/v2/models/{name}").json()
        facts["v2_config"] = client.get(f"/v2/models/{name}/config").json()
        facts["v2"] = client.post(f"/v2/models/{name}/infer", json={"inputs": [
            {"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 1.0, 1.0, 1.0]}]}).json()
    out.write_text(json.dumps(facts, default=lambda o: o.__dict__))
''')


def test_a_family_added_by_its_folder_and_one_line_runs_serves_and_reports(tmp_path: Path):
    recipe = tmp_path / "rows.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: rows-run
        task: rows
        output_dir: {tmp_path / 'runs'}
        rows: {{features: 4, examples: 400, steps: 150}}
        baseline: {{enabled: false}}
        prune: {{enabled: false}}
        quantize: {{enabled: false}}
        bench: {{enabled: false}}
        export: {{targets: [onnx], parity_examples: 50}}
    """))
    (tmp_path / "bad.yaml").write_text("task: rows\nrows: {featurs: 3}\n")
    out = tmp_path / "facts.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(recipe)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    f = json.loads(out.read_text())

    # The family's own recipe section is part of the recipe, checked like every other.
    assert "rows.featurs: unknown key" in f["bad_key"] and "features" in f["bad_key"]

    # The pipeline ran its stage and the shared export stage, parity included.
    assert f["stages"] == ["distill", "export"]
    assert f["primary_metric"] == "accuracy"
    assert f["export"]["status"] == "ok" and f["export"]["parity"]["passed"] is True
    assert f["export"]["parity"]["top1_agreement"] == 1.0

    # The console summary shows the family's table.
    assert "rows: validation split" in f["summary"]
    row = next(line.split("│")[1:4] for line in f["summary"].splitlines() if "│ linear " in line)
    assert row[1].strip() == "10" and float(row[2]) > 90, f["summary"]  # 4 weights + 1 bias per class
    assert "edgekd serve" in f["summary"]

    # edgekd.load(...).predict answers with the family's codec; bad rows are refused by it.
    assert [a["label"] for a in f["local"]] == ["high", "low"]
    assert "rows of 4 numbers" in f["local_bad"]

    # The HTTP server: POST /predict, /metadata, OpenAPI and v2 are the family's.
    status, body = f["http"]
    assert status == 200 and [p["label"] for p in body["predictions"]] == ["high", "low"]
    assert "rows of 4 numbers" in f["http_bad"]["error"]
    assert "edgekd_rows_total 2.0" in f["metrics"]  # its own counter, in the server's registry
    assert f["metadata"]["task"] == "rows" and f["metadata"]["inputs"] == "rows" and f["metadata"]["features"] == 4
    assert f["openapi"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RowsRequest"}
    assert f["openapi_has_schema"]
    assert f["v2_meta"]["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert f["v2_config"]["max_batch_size"] > 0
    assert f["v2"]["outputs"][0]["name"] == "logits" and len(f["v2"]["outputs"][0]["data"]) == 2


def test_the_toy_family_is_known_only_in_its_folder():
    """Nothing in edgekd, export, serving or devices names the toy family (so the test above proves
    the folder plus the registration line are enough)."""
    root = Path(__file__).resolve().parents[1]
    hits = [str(p.relative_to(root)) for d in ("edgekd", "export", "serving", "devices")
            for p in (root / d).rglob("*.py") if "toy_family" in p.read_text() or "RowsCodec" in p.read_text()]
    assert hits == []
