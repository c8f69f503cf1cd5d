"""A tiny end-to-end run through the CLI: recipe → teacher → distill → baseline → eval → run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import edgekd
from edgekd.cli import app
from edgekd.errors import RecipeError, StageError
from edgekd.recipe import load_recipe
from edgekd.runfolder import sha256_file
from edgekd.serving.settings import SettingsError
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
    # what each student trained on, as the stages recorded it (the summary's gain line says it)
    stages = manifest["stages"]
    assert ev["summary"]["distill_train_examples"] == stages["distill"]["metrics"]["train_examples"]
    assert ev["summary"]["baseline_train_examples"] == stages["baseline"]["metrics"]["train_examples"]
    assert manifest["data"]["seed"] == 1 and manifest["environment"]["packages"]["torch"]
    assert not (run / "checkpoints").exists()  # each stage removed its checkpoints, then the folder went
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
    # Served threads reach a runner that applies them; the lite interpreter (torch's process-wide pool)
    # does not, so asking it for threads is refused rather than ignored.
    assert edgekd.load(run, target="onnx", threads=1).served.runtime["threads"] == 1
    assert edgekd.load(run, target="torchscript-lite").predict(["fine"])
    with pytest.raises(SettingsError, match=r"^threads: the 'torchscript-lite' export's TorchScriptLiteRunner does "
                                            r"not apply intra-op threads"):
        edgekd.load(run, target="torchscript-lite", threads=1)
    # The fine-tuned teacher, exported for `edgekd serve` from the run folder alone.
    res = runner.invoke(app, ["export-teacher", str(run)])
    assert res.exit_code == 0, res.output
    served = run / "served-teacher" / "onnx"
    meta = json.loads((served / "artifact.json").read_text())
    assert meta["parity"]["top1_agreement"] == 1.0 and meta["parity"]["max_abs_diff"] < 1e-4
    assert meta["sha256"] == sha256_file(served / "model.onnx") and (served / "tokenizer.json").is_file()
    assert f"serve it: edgekd serve {served.resolve()}" in res.output
    # Recorded and held as a stage command is (its warnings kept in logs/warnings.log, not the console).
    last = json.loads((run / "invocations.jsonl").read_text().splitlines()[-1])
    assert last["command"] == "export-teacher" and last["status"] == "ok" and str(run) in last["argv"]
    # In this process: the bench's child processes are tested in tests/devices/test_bench.py.
    res = runner.invoke(app, ["bench", str(run), "--set", "bench.runs=3", "--set", "bench.warmup=1",
                              "--set", "bench.batch_sizes=[1]", "--set", "bench.isolate=false"])
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


# --- run folders: recipe.yaml is what produced the artifacts; every invocation is recorded ------------


def _quick_run_recipe(tmp_path, tiny_teacher_dir, tiny_csv):
    return tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv,
                       teacher={"finetune": {"epochs": 1, "batch_size": 32, "lr": 3e-3}},
                       distill={"train": {"epochs": 1, "batch_size": 32, "lr": 2e-3}},
                       baseline={"enabled": False}, export={"targets": ["onnx"]},
                       bench={"enabled": True, "runs": 2, "warmup": 1, "batch_sizes": [1], "torch_models": False,
                              "isolate": False})


@pytest.mark.slow
def test_one_off_overrides_and_failed_commands_leave_recipe_yaml_alone(tmp_path, tiny_teacher_dir, tiny_csv):
    path = write_recipe(tmp_path, _quick_run_recipe(tmp_path, tiny_teacher_dir, tiny_csv))
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    saved = (run / "recipe.yaml").read_bytes()
    assert load_recipe(run / "recipe.yaml") == load_recipe(path)
    assert not (run / "checkpoints").exists()

    # A failed command: an unknown device profile, caught before anything is measured.
    res = runner.invoke(app, ["bench", str(run), "--device", "nope"])
    assert res.exit_code != 0 and "bench.profile" in str(res.exception)
    assert (run / "recipe.yaml").read_bytes() == saved
    # ... so the next plain command still works.
    res = runner.invoke(app, ["bench", str(run)])
    assert res.exit_code == 0, res.output

    # A device profile given as a YAML file, end to end: measured, written, reported.
    profile = yaml.safe_load((Path(__file__).parents[1] / "devices" / "profiles" / "local.yaml").read_text())
    profile["name"] = "my-box"
    my = tmp_path / "my.yaml"
    my.write_text(yaml.safe_dump(profile))
    res = runner.invoke(app, ["bench", str(run), "--device", str(my)])
    assert res.exit_code == 0, res.output
    results = json.loads((run / "bench" / "my-box" / "results.json").read_text())
    assert results["profile"]["name"] == "my-box" and results["results"]
    assert "onnx" in res.output
    assert (run / "recipe.yaml").read_bytes() == saved  # --device is one-off

    # --set on a run folder is one-off too.
    res = runner.invoke(app, ["bench", str(run), "--set", "bench.runs=3"])
    assert res.exit_code == 0, res.output
    assert (run / "recipe.yaml").read_bytes() == saved

    lines = [json.loads(x) for x in (run / "invocations.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["ok", "error", "ok", "ok", "ok"]
    assert lines[0]["recipe_saved"] is True and not any(x["recipe_saved"] for x in lines[1:])
    assert "bench.profile" in lines[1]["error"] and lines[1]["one_off"] == ["bench.profile=nope"]
    assert lines[3]["one_off"] == [f"bench.profile={my}"] and lines[4]["one_off"] == ["bench.runs=3"]
    assert all(x["started"] <= x["ended"] for x in lines)
    assert lines[0]["stages"] == ["teacher", "distill", "eval", "export", "bench"]


def _saved_run(tmp_path, recipe: dict):
    """A run folder holding only its recipe.yaml, as a finished command saves it (resolved, every key)."""
    from edgekd.recipe import parse_recipe

    run = tmp_path / "runs" / recipe["name"]
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(parse_recipe(recipe).to_yaml())
    return run


def test_a_bad_one_off_flag_is_named_as_the_source_of_the_error_not_the_runs_recipe(tmp_path, tiny_teacher_dir,
                                                                                    tiny_csv):
    run = _saved_run(tmp_path, tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, export={"targets": ["onnx"]}))
    saved = (run / "recipe.yaml").read_bytes()
    runner = CliRunner()
    for args, given, problem in [
        (["bench", str(run), "--device", "nosuchprofile"], "--device nosuchprofile (bench.profile=nosuchprofile)",
         "bench.profile: Unknown device profile 'nosuchprofile'"),  # caught by the check of what the recipe names
        (["export", str(run), "--to", "onnx,bogus"], "--to onnx,bogus (export.targets=[onnx,bogus])",
         "targets: unknown export target(s) ['bogus']"),  # caught when the recipe loads
        (["bench", str(run), "--set", "bench.profile=nosuch"], "--set bench.profile=nosuch",  # one-off on a run folder
         "bench.profile: Unknown device profile 'nosuch'"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code != 0 and isinstance(res.exception, RecipeError), res.output
        message = str(res.exception)
        assert message.startswith(f"Invalid recipe with this command's one-off {given}, given for this command only, "
                                  f"not from {run / 'recipe.yaml'}:\n"), message
        assert problem in message
    assert (run / "recipe.yaml").read_bytes() == saved
    lines = [json.loads(x) for x in (run / "invocations.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["error"] * 3 and "--device nosuchprofile" in lines[0]["error"]
    # On a recipe file, --device is one-off too (there, --set defines the run); a problem of the recipe itself
    # still names the recipe.
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv))
    res = runner.invoke(app, ["bench", str(path), "--device", "also-nope"])
    assert str(res.exception).startswith("Invalid recipe with this command's one-off --device also-nope "
                                         f"(bench.profile=also-nope), given for this command only, not from {path}:")
    res = runner.invoke(app, ["bench", str(path), "--device", "local", "--set", "bench.runs=0"])
    assert str(res.exception).startswith(f"Invalid recipe in {path}:\n  - bench.runs"), res.exception
    # Both at fault: each problem under its own source (the whole error was laid on the recipe).
    res = runner.invoke(app, ["export", str(path), "--to", "onnx,bogus", "--set", "bench.runs=0"])
    message = str(res.exception)
    head, _, tail = message.partition("\nand with this command's one-off --to onnx,bogus (export.targets=[onnx,bogus]), "
                                      "given for this command only:\n")
    assert head.startswith(f"Invalid recipe in {path}:\n  - bench.runs") and "bogus" not in head, message
    assert tail.startswith("  - ") and "unknown export target(s) ['bogus']" in tail and "bench.runs" not in tail
    assert {"bench.runs", "bogus"} <= {w for p in res.exception.problems for w in ("bench.runs", "bogus") if w in p}


def test_a_one_off_export_of_other_targets_keeps_the_keys_the_runs_own_targets_read(tmp_path, tiny_teacher_dir,
                                                                                    tiny_csv, monkeypatch):
    """`edgekd export RUN --to X` exports X for this command only: prune.quant_aware, the quantize stage and its
    ONNX keys are still read by the run's own ONNX export, so a narrower --to is not refused for them."""
    import edgekd.pipeline

    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, export={"targets": ["onnx", "torchscript-lite"]},
                         prune={"enabled": True, "keep_params": 0.5, "recover_epochs": 1, "quant_aware": True},
                         quantize={"enabled": True, "method": "dynamic", "per_channel": True, "max_accuracy_drop": 0.5})
    run = _saved_run(tmp_path, recipe)
    ran = []

    def stages_ran(recipe, stages, force=False, save_recipe=None):  # what run_recipe would run, without running it
        ran.append((recipe, stages, save_recipe))
        raise StageError("stopped before the stage")

    monkeypatch.setattr(edgekd.pipeline, "run_stages", stages_ran)
    runner = CliRunner()
    for to in ("coreml", "torchscript-lite", "executorch,tensorrt"):
        res = runner.invoke(app, ["export", str(run), "--to", to])
        assert str(res.exception) == "stopped before the stage", res.exception
        used, stages, save = ran[-1]
        assert used.export.targets == to.split(",") and stages == ["export"] and save is None
        assert used.prune.quant_aware and "onnx" in used.exported_targets()
    # the same targets in the recipe are refused: nothing would make the int8 file quant_aware trains for
    path = write_recipe(tmp_path, {**recipe, "export": {"targets": ["torchscript-lite"]}})
    res = runner.invoke(app, ["export", str(path)])
    assert "prune.quant_aware: it trains for the int8 file" in str(res.exception), res.exception
    # ... and a one-off ONNX export does not make the recipe saved with the run right
    res = runner.invoke(app, ["export", str(path), "--to", "onnx"])
    assert str(res.exception).startswith(f"Invalid recipe in {path}:") and "prune.quant_aware" in str(res.exception)
    # A command that prunes checks those keys against its own targets: on a run folder its --set is one-off,
    # and a quant-aware prune for a run whose export this command narrows to torchscript-lite would train for
    # an int8 file nothing makes.
    res = runner.invoke(app, ["prune", str(run), "--set", "export.targets=[torchscript-lite]"])
    assert "prune.quant_aware: it trains for the int8 file" in str(res.exception), res.exception


def test_a_failed_first_command_writes_no_recipe_and_records_the_error(tmp_path, tiny_teacher_dir, tiny_csv):
    """The run folder exists (manifest) but no stage finished: nothing claims a recipe produced it."""
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv)
    path = write_recipe(tmp_path, recipe)
    res = CliRunner().invoke(app, ["distill", str(path)])  # needs the teacher stage: fails
    assert res.exit_code != 0
    run = tmp_path / "runs" / "tiny"
    assert not (run / "recipe.yaml").exists()
    (line,) = [json.loads(x) for x in (run / "invocations.jsonl").read_text().splitlines()]
    assert line["status"] == "error" and "edgekd teacher" in line["error"] and line["stages"] == ["distill"]


# --- recipe check: what the recipe points at ------------------------------------------------------------


def _check(tmp_path, recipe):
    res = CliRunner().invoke(app, ["recipe", "check", str(write_recipe(tmp_path, recipe))])
    return res.exit_code, str(res.exception) if res.exception else res.output


def test_recipe_check_passes_a_good_recipe_with_a_profile_file(tmp_path, tiny_teacher_dir, tiny_csv):
    profile = tmp_path / "box.yaml"
    profile.write_text((Path(__file__).parents[1] / "devices" / "profiles" / "local.yaml").read_text())
    code, out = _check(tmp_path, tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, bench={"profile": str(profile)}))
    assert code == 0 and "ok" in out, out


def test_recipe_check_reports_every_bad_input_at_once_by_key(tmp_path, tiny_teacher_dir, tiny_csv):
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, data={"dataset": str(tmp_path / "missing.csv")},
                         bench={"profile": "nope"})
    code, out = _check(tmp_path, recipe)
    assert code != 0
    assert f"data.dataset: the file {tmp_path / 'missing.csv'} does not exist" in out
    assert "bench.profile: Unknown device profile 'nope'" in out

    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, data={"text_column": "review", "label_column": "y"},
                         bench={"profile": str(tmp_path / "no-such-profile.yaml")})
    code, out = _check(tmp_path, recipe)
    assert code != 0
    assert "data.text_column" in out and "no column 'review'" in out
    assert "data.label_column" in out and "no column 'y'" in out and "columns: text, label" in out
    assert "bench.profile" in out and "no-such-profile.yaml does not exist" in out


def test_recipe_check_catches_unreadable_labels(tmp_path, tiny_teacher_dir, tiny_csv):
    lines = tiny_csv.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ","  # one row without a label
    tiny_csv.write_text("\n".join(lines) + "\n")
    code, out = _check(tmp_path, tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv))
    assert code != 0 and "data.label_column" in out and "missing labels in column 'label'" in out, out


def test_a_stage_command_checks_inputs_before_any_stage_runs(tmp_path, tiny_teacher_dir, tiny_csv):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, bench={"profile": "nope"}))
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code != 0 and "bench.profile" in str(res.exception)
    assert not (tmp_path / "runs" / "tiny" / "teacher").exists()  # nothing trained before the error


@pytest.mark.parametrize("stage", ["baseline", "prune", "quantize"])
def test_a_stage_the_recipe_turns_off_is_refused_by_its_command_before_anything_is_written(stage, tmp_path,
                                                                                          tiny_teacher_dir, tiny_csv):
    """Later stages read a baseline, a pruned student or a quantized file only while the recipe turns that
    stage on: made by its own command while it is off, nothing would use it (export would ship the distilled
    student). The bench, which nothing reads, runs by its command either way."""
    raw = tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, baseline={"enabled": False},
                      prune={"keep_params": 0.5}, quantize={"method": "dynamic"})
    path = write_recipe(tmp_path, raw)
    res = CliRunner().invoke(app, [stage, str(path)])
    assert res.exit_code != 0
    message = str(res.exception)  # the command line (main) prints it as "error: ..."
    assert (f"{stage}.enabled is false in this recipe, so no later stage would read what the {stage} stage made: "
            f"turn it on ({stage}.enabled: true in the recipe, or --set {stage}.enabled=true on a recipe file)"
            ) == message, message
    assert not (tmp_path / "runs" / "tiny" / stage).exists() and not (tmp_path / "runs" / "tiny" / "manifest.json").exists()
    from edgekd.pipeline import stage_table

    for family in ("text-classification", "detection"):
        table = stage_table(family)
        assert [n for n, s in table.items() if s.read_only_when_on] == ["baseline", "prune", "quantize"], family


@pytest.mark.slow
def test_a_later_stage_alone_is_refused_when_the_recipe_changes_a_stage_it_reads(tmp_path, tiny_teacher_dir,
                                                                                  tiny_csv):
    """`edgekd quantize my.yaml --set distill.temperature=4` (or the same edit in the file) after a run
    quantized the file exported from the student distilled at the old temperature and saved a recipe
    claiming the new one (a stage that loads a model refused already; one that reads files did not):
    refused before anything runs, naming the key and what to run; recipe.yaml and the records stay as
    they were. A change to what the command itself runs goes through."""
    data = _quick_run_recipe(tmp_path, tiny_teacher_dir, tiny_csv)
    data["quantize"] = {"enabled": True}
    data["bench"] = {"enabled": False}
    path = write_recipe(tmp_path, data)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    saved = (run / "recipe.yaml").read_bytes()
    stages = json.loads((run / "manifest.json").read_text())["stages"]

    for source in (path, run):  # a recipe file (saved with the run), a run folder (one-off)
        res = runner.invoke(app, ["quantize", str(source), "--set", "distill.temperature=4"])
        assert res.exit_code != 0
        msg = str(res.exception)
        assert "distill.temperature" in msg and "the distill and export stages" in msg, msg
        assert "`edgekd distill` with it first" in msg
        assert (run / "recipe.yaml").read_bytes() == saved
        assert json.loads((run / "manifest.json").read_text())["stages"] == stages

    res = runner.invoke(app, ["quantize", str(path), "--set", "quantize.max_accuracy_drop=0.5"])
    assert res.exit_code == 0, res.output
    assert load_recipe(run / "recipe.yaml").quantize.max_accuracy_drop == 0.5
