"""A tiny end-to-end run through the CLI: recipe → teacher → distill → baseline → eval → run folder."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.recipe import load_recipe
from edgekd.runfolder import sha256_file
from edgekd.testing import tiny_recipe


def write_recipe(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_a_complete_run_folder(tmp_path, tiny_teacher_dir, tiny_csv):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv))
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"teacher", "distill", "baseline", "eval"}
    # the resolved recipe is saved and reloads to the same recipe
    assert load_recipe(run / "recipe.yaml") == load_recipe(path)
    # models in Hugging Face format, every artifact hashed in the manifest
    for stage in ("teacher", "distill", "baseline"):
        assert (run / stage / "model" / "model.safetensors").is_file()
        for rel, digest in manifest["stages"][stage]["artifacts"].items():
            assert sha256_file(run / rel) == digest
    assert manifest["stages"]["teacher"]["metrics"]["finetuned"] is True
    ev = manifest["stages"]["eval"]["metrics"]
    for name in ("teacher", "student", "baseline"):
        assert 0.0 <= ev[name]["accuracy"] <= 1.0 and 0.0 <= ev[name]["agreement_with_teacher"] <= 1.0
    assert ev["student"]["layers"] == 2 and ev["teacher"]["layers"] == 4
    assert ev["teacher"]["accuracy"] > 0.6  # learnable synthetic data: the fine-tune really trained
    assert "distill_gain_over_baseline" in ev["summary"]
    assert manifest["data"]["seed"] == 1 and manifest["environment"]["packages"]["torch"]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert "student keeps" in res.output

    # Re-running with nothing changed skips every stage.
    before = {s: r["finished"] for s, r in manifest["stages"].items()}
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert {s: r["finished"] for s, r in after.items()} == before

    # Changing a distillation setting reruns distill and eval only.
    res = runner.invoke(app, ["run", str(path), "--set", "distill.temperature=4"])
    assert res.exit_code == 0, res.output
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert after["teacher"]["finished"] == before["teacher"]
    assert after["baseline"]["finished"] == before["baseline"]
    assert after["distill"]["fingerprint"] != manifest["stages"]["distill"]["fingerprint"]

    # Export the shipped student from the run folder alone, then benchmark what was exported.
    res = runner.invoke(app, ["export", str(run), "--to", "onnx,torchscript-lite"])
    assert res.exit_code == 0, res.output
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    for target in ("onnx", "torchscript-lite"):
        rec = stages["export"]["metrics"]["targets"][target]
        assert rec["built"] is True
        assert rec["parity"]["top1_agreement"] == 1.0 and rec["parity"]["max_abs_diff"] < 1e-4
        assert (run / "export" / target / "artifact.json").is_file()
        assert (run / "export" / target / "tokenizer.json").is_file()
    # The fine-tuned teacher, exported for `edgekd serve` from the run folder alone.
    res = runner.invoke(app, ["export-teacher", str(run)])
    assert res.exit_code == 0, res.output
    served = run / "served-teacher" / "onnx"
    meta = json.loads((served / "artifact.json").read_text())
    assert meta["parity"]["top1_agreement"] == 1.0 and meta["parity"]["max_abs_diff"] < 1e-4
    assert meta["sha256"] == sha256_file(served / "model.onnx") and (served / "tokenizer.json").is_file()
    assert f"serve it: edgekd serve {served.resolve()}" in res.output
    res = runner.invoke(app, ["bench", str(run), "--set", "bench.runs=3", "--set", "bench.warmup=1",
                              "--set", "bench.batch_sizes=[1]"])
    assert res.exit_code == 0, res.output
    bench_dir = run / "bench" / "local"
    for name in ("results.json", "results.csv", "table.md", "pareto.png"):
        assert (bench_dir / name).is_file(), name
    table = (bench_dir / "table.md").read_text()
    for name in ("onnx", "torchscript-lite", "pytorch-teacher", "pytorch-student"):
        assert name in table


@pytest.mark.slow
def test_hidden_state_and_attention_matching_run(tmp_path, tiny_teacher_dir, tiny_csv):
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv,
                         distill={"hidden_weight": 1.0, "hidden_loss": "mse", "attention_weight": 1.0},
                         baseline={"enabled": False})
    path = write_recipe(tmp_path, recipe)
    runner = CliRunner()
    assert runner.invoke(app, ["teacher", str(path)]).exit_code == 0
    res = runner.invoke(app, ["distill", str(path)])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["stages"]["distill"]["metrics"]
    hist = m["train_history"]
    assert {"hidden", "attention", "kd", "ce"} <= set(hist[0])
    assert m["teacher_forward_per_step"] is True


def test_a_stage_alone_without_its_inputs_says_what_to_run(tmp_path, tiny_teacher_dir, tiny_csv):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv))
    res = CliRunner().invoke(app, ["distill", str(path)])
    assert res.exit_code != 0
    assert "Run `edgekd teacher`" in str(res.exception) or "Run `edgekd teacher`" in res.output


def test_export_teacher_without_a_teacher_stage_says_what_to_run(tmp_path, tiny_teacher_dir, tiny_csv):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv))
    res = CliRunner().invoke(app, ["export-teacher", str(path)])
    assert res.exit_code != 0
    message = str(res.exception)  # the command line (main) prints it as "error: ..."
    assert "no finished teacher stage" in message and "run `edgekd teacher" in message, message
    assert not (tmp_path / "runs" / "tiny" / "served-teacher").exists()


def test_recipe_show_prints_the_default_as_yaml():
    res = CliRunner().invoke(app, ["recipe", "show"])
    assert res.exit_code == 0
    data = yaml.safe_load(res.output)
    assert data["teacher"]["model"] == "minilm-l6" and data["student"]["layers"] == [0, 2, 4]
