"""Every file an export folder's artifact needs is verified before serving; startup and settings
errors are one clear line naming the file or setting; the recommended artifact is served by default."""

from __future__ import annotations

import json
import shutil

import pytest
from serve_helpers import serve_cli

from edgekd.errors import ChecksumError, EdgeKDError, UnsupportedTargetError
from edgekd.export.base import read_artifact_meta, write_artifact_meta
from edgekd.runfolder import RunFolder
from edgekd.serving.model import load_served_model, resolve_export_dir, verify_artifact
from edgekd.serving.settings import ServeSettings, SettingsError

FILES = ["model.onnx", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]


def _verify(folder):
    return verify_artifact(folder, read_artifact_meta(folder))


@pytest.fixture(params=["in-run", "alone"])
def folder(request, run_copy, tmp_path):
    """The export folder inside its run (manifest and artifact.json guard it) or copied out alone
    (artifact.json is the only guard, as in a container mount)."""
    inside = run_copy / "export" / "onnx"
    if request.param == "in-run":
        return inside
    return shutil.copytree(inside, tmp_path / "mounted")


def _swap_vocab_ids(path, a="wonderful", b="dull"):
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))


def test_swapped_vocabulary_ids_are_refused(folder):
    _swap_vocab_ids(folder / "tokenizer.json")
    with pytest.raises(ChecksumError, match=r"refusing to serve .*tokenizer.json"):
        _verify(folder)
    with pytest.raises(ChecksumError, match="tokenizer.json"):
        load_served_model(ServeSettings(export_dir=folder))


@pytest.mark.parametrize("name", FILES)
def test_one_changed_byte_in_any_file_is_refused_naming_it(folder, name):
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=rf"{name}: its sha256 is \w+ but artifact.json records"):
        _verify(folder)


def test_truncated_tokenizer_is_refused_naming_it(folder):
    path = folder / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ChecksumError, match=r"tokenizer.json: its sha256"):
        _verify(folder)


def test_edited_labels_in_artifact_json_are_refused(folder):
    meta = json.loads((folder / "artifact.json").read_text())
    meta["labels"] = meta["labels"][::-1]  # a hand edit: the seal is not renewed
    (folder / "artifact.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(ChecksumError, match=r"artifact.json was edited after export"):
        _verify(folder)


def test_a_served_file_no_checksum_covers_is_refused(folder):
    """An artifact.json from before per-file checksums: the tokenizer would be served unverified."""
    meta = read_artifact_meta(folder)
    del meta["extra_sha256"]
    write_artifact_meta(folder, meta)
    if folder.parent.name == "export":  # in a run whose manifest records every file, the manifest covers them
        RunFolder(folder.parent.parent).record("export", "fp", {}, [folder])
        _verify(folder)
        _swap_vocab_ids(folder / "tokenizer.json")
        with pytest.raises(ChecksumError, match=r"tokenizer.json does not match the sha256 that .*manifest.json"):
            _verify(folder)
    else:
        with pytest.raises(ChecksumError, match=r"no sha256 covers special_tokens_map.json, tokenizer.json, "):
            _verify(folder)


def test_untouched_folder_loads(folder):
    artifact, _ = _verify(folder)
    assert artifact == folder / "model.onnx"


@pytest.mark.parametrize("text", ["", "{\"target\": \"onnx\",", "not json", "[1, 2]"])
def test_artifact_json_that_is_not_a_json_object_is_one_clear_error(folder, text):
    (folder / "artifact.json").write_text(text)
    with pytest.raises(UnsupportedTargetError, match=r"artifact.json (is not valid JSON|holds list)") as e:
        load_served_model(ServeSettings(export_dir=folder))
    assert "\n" not in str(e.value) and "re-export" in str(e.value)


def test_manifest_json_that_is_not_json_is_one_clear_error(run_copy):
    (run_copy / "manifest.json").write_text('{"stages": {')
    with pytest.raises(EdgeKDError, match=r"manifest.json is not valid JSON .*: restore it") as e:
        load_served_model(ServeSettings(export_dir=run_copy / "export" / "onnx"))
    assert "\n" not in str(e.value)


# --- settings: flags > EDGEKD_SERVE_* > recipe > defaults ------------------------------------------

def test_settings_precedence(monkeypatch):
    from edgekd.recipe import ServeConfig

    recipe = ServeConfig(port=8100, batching=True, max_items=10)
    s = ServeSettings.from_config(recipe)
    assert (s.port, s.batching, s.max_items, s.max_queue) == (8100, True, 10, 4096)  # recipe > default
    monkeypatch.setenv("EDGEKD_SERVE_PORT", "8200")
    monkeypatch.setenv("EDGEKD_SERVE_BATCHING", "false")
    monkeypatch.setenv("EDGEKD_SERVE_MAX_QUEUE", "7")
    s = ServeSettings.from_config(recipe)
    assert (s.port, s.batching, s.max_items, s.max_queue) == (8200, False, 10, 7)  # env > recipe
    s = ServeSettings.from_config(recipe, port=8300, batching=None)
    assert (s.port, s.batching) == (8300, False)  # flag > env; a flag not given changes nothing


@pytest.mark.parametrize(("env", "flags", "expected"), [
    ({"EDGEKD_SERVE_API_KEY": ""}, {}, r"EDGEKD_SERVE_API_KEY: api_key is empty"),
    ({}, {"port": 70000}, r"--port=70000: Input should be less than or equal to 65535"),
    ({"EDGEKD_SERVE_PORT": "http"}, {}, r"EDGEKD_SERVE_PORT='http': Input should be a valid integer"),
])
def test_invalid_settings_name_their_source(monkeypatch, env, flags, expected):
    from edgekd.recipe import ServeConfig

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError, match=expected) as e:
        ServeSettings.from_config(ServeConfig(), **flags)
    assert "\n" not in str(e.value)


# --- the CLI ------------------------------------------------------------------------------------

_cli = serve_cli


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({"EDGEKD_SERVE_API_KEY": ""}, [], "error: invalid server setting: EDGEKD_SERVE_API_KEY: api_key is empty"),
    ({}, ["--port", "70000"], "error: invalid server setting: --port=70000"),
])
def test_cli_reports_setting_errors_as_one_line(monkeypatch, capsys, run_copy, env, args, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, out, started = _cli(monkeypatch, capsys, run_copy, *args)
    assert code == 2 and out.startswith(expected) and not started
    assert "Traceback" not in out


def test_cli_uses_environment_over_recipe(monkeypatch, capsys, run_copy):
    (run_copy / "recipe.yaml").write_text("name: tiny\nserve:\n  port: 8100\n  max_items: 10\n")
    monkeypatch.setenv("EDGEKD_SERVE_PORT", "8200")
    code, _, started = _cli(monkeypatch, capsys, run_copy)
    assert code == 0 and (started[0][1].port, started[0][1].max_items) == (8200, 10)
    code, _, started = _cli(monkeypatch, capsys, run_copy, "--port", "8300")
    assert started[0][1].port == 8300


def test_cli_serving_an_export_folder_of_a_run_reads_the_runs_recipe(monkeypatch, capsys, run_copy):
    (run_copy / "recipe.yaml").write_text("name: tiny\nserve:\n  target: onnx\n  max_items: 10\n  overflow: reject\n")
    code, out, started = _cli(monkeypatch, capsys, run_copy / "export" / "onnx")
    assert code == 0, out
    folder, settings = started[0]
    assert folder == run_copy / "export" / "onnx" and (settings.max_items, settings.overflow) == (10, "reject")


def _with_int8(run):
    """A run with export/onnx and export/onnx-int8 whose quantize stage recommends ``recommended``."""
    src = run / "export" / "onnx"
    dst = shutil.copytree(src, run / "export" / "onnx-int8")
    meta = read_artifact_meta(dst)
    meta["target"] = "onnx-int8"
    write_artifact_meta(dst, meta)
    return dst


@pytest.mark.parametrize("recommended", ["quantized", "float"])
def test_serve_run_without_target_serves_the_recommended_artifact(monkeypatch, capsys, run_copy, recommended):
    int8 = _with_int8(run_copy)
    chosen = int8 if recommended == "quantized" else run_copy / "export" / "onnx"
    RunFolder(run_copy).record("quantize", "fp", {"recommended": recommended, "recommended_dir": str(chosen)},
                               [int8])
    assert resolve_export_dir(run_copy) == chosen
    code, out, started = _cli(monkeypatch, capsys, run_copy)
    assert code == 0 and started[0][0] == chosen
    assert f"({chosen.name}, the quantize stage's recommendation ({recommended})" in out


def test_serve_run_without_target_or_recommendation_asks_for_one(monkeypatch, capsys, run_copy):
    _with_int8(run_copy)
    code, out, started = _cli(monkeypatch, capsys, run_copy)
    assert code == 2 and not started
    assert "several exports (onnx, onnx-int8): choose one with --target" in out


def test_int8_folder_reports_its_own_target(run_copy, make_client):
    int8 = _with_int8(run_copy)
    meta = read_artifact_meta(int8)
    meta["target"] = "onnx"  # as int8 folders were written before: the run layout still names it right
    write_artifact_meta(int8, meta)
    client = make_client(export_dir=int8)
    assert client.get("/metadata").json()["target"] == "onnx-int8"
    assert client.post("/predict", json={"text": "fine"}).json()["target"] == "onnx-int8"
