"""Ultralytics YOLO adapter: offline scope, KD math, and (where Ultralytics runs) a tiny
teacher -> student distillation on synthetic shapes, exported to ONNX and run in onnxruntime.

The project's own environment cannot run Ultralytics (its torchvision must import beside the
installed torch), so the end-to-end tests skip there with the reason and install command. Run them
in a separate venv (see README, "YOLO (Ultralytics) teachers and students").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekd.errors import AssetError, EdgeKDError, MissingBackendError
from edgekd.tasks.detection.yolo import (
    INSTALL_COMMAND,
    check_teacher_classes,
    distill_yolo,
    export_yolo_onnx,
    load_yolo_model,
    offline_ultralytics,
    ultralytics_available,
)

AVAILABLE, WHY = ultralytics_available()
needs_ultralytics = pytest.mark.skipif(not AVAILABLE, reason=f"Ultralytics cannot run here: {WHY}")

IMGSZ, NUM_CLASSES = 64, 4


# --- everywhere ---------------------------------------------------------------------------------


def test_import_pulls_in_neither_torch_nor_ultralytics():
    code = ("import sys, edgekd.tasks.detection.yolo as y; "
            "bad = [m for m in ('torch', 'ultralytics', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_availability_reason_names_the_install_command():
    ok, why = ultralytics_available()
    assert ok == (why is None)
    if not ok:
        assert INSTALL_COMMAND in why
        with pytest.raises(MissingBackendError, match="torchvision==0.29.1"):
            load_yolo_model("yolov8n.yaml", NUM_CLASSES)


def test_offline_scope_sets_and_restores_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("YOLO_OFFLINE", raising=False)
    monkeypatch.setenv("YOLO_AUTOINSTALL", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "mine"))
    with offline_ultralytics() as cfg:
        assert os.environ["YOLO_OFFLINE"] == "1"
        assert os.environ["YOLO_AUTOINSTALL"] == "0"
        assert os.environ["YOLO_CONFIG_DIR"] == str(cfg)
        assert Path(cfg).is_dir() and Path(cfg) != tmp_path / "mine"
        fonts = list((Path(cfg) / "Ultralytics").glob("Arial*.ttf"))
        if fonts:  # a DejaVuSans copy (matplotlib bundles one): no font download
            assert fonts[0].stat().st_size > 10_000
    assert "YOLO_OFFLINE" not in os.environ
    assert os.environ["YOLO_AUTOINSTALL"] == "1"
    assert os.environ["YOLO_CONFIG_DIR"] == str(tmp_path / "mine")


def test_a_teacher_whose_classes_are_not_the_datas_is_refused():
    """A .pt teacher's class scores are the KD targets: one with another class count would get a fresh,
    random class head (frozen, then taught to the student), one with the data's names in another order
    would teach the wrong labels. Both are refused; the data's names, as a dict or a list, pass."""
    data = {0: "cat", 1: "dog"}
    check_teacher_classes({0: "cat", 1: "dog"}, 2, data, "t.pt")
    check_teacher_classes(["cat", "dog"], 2, ["cat", "dog"], "t.pt")
    check_teacher_classes(None, 2, data, "t.pt")  # a checkpoint without names: judged by its count
    with pytest.raises(EdgeKDError, match=r"'t\.pt' has 3 classes but the data has 2 \(cat, dog\)"):
        check_teacher_classes({0: "cat", 1: "dog", 2: "cow"}, 3, data, "t.pt")
    with pytest.raises(EdgeKDError, match=r"has the classes \[dog, cat\] but the data has \[cat, dog\]"):
        check_teacher_classes({0: "dog", 1: "cat"}, 2, data, "t.pt")


@needs_ultralytics
def test_distill_refuses_a_pt_teacher_trained_on_other_classes(data_yaml, tmp_path):
    from edgekd.tasks.detection.yolo import save_yolo_checkpoint

    other = load_yolo_model("yolov8n.yaml", NUM_CLASSES + 1)
    other.names = {i: f"x{i}" for i in range(NUM_CLASSES + 1)}
    teacher = save_yolo_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(EdgeKDError, match="classes but the data has"):
        distill_yolo(teacher, "yolov8n.yaml", data_yaml, out_dir=tmp_path / "out", steps=1, imgsz=IMGSZ, batch=8)


def test_cls_kd_is_zero_on_agreement_positive_otherwise_and_has_bce_gradient():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from edgekd.tasks.detection.yolo import yolo_cls_kd

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 84, NUM_CLASSES, generator=g)
    s = torch.randn(2, 84, NUM_CLASSES, generator=g, requires_grad=True)
    assert float(yolo_cls_kd(t.clone(), t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    kd = yolo_cls_kd(s, t, 2.0)
    assert float(kd.detach()) > 0
    kd.backward()
    # same gradient as the plain temperature-scaled BCE the KD is defined by
    s2 = s.detach().clone().requires_grad_(True)
    w = t.sigmoid().amax(-1)
    bce = F.binary_cross_entropy_with_logits(s2 / 2.0, (t / 2.0).sigmoid(), reduction="none").sum(-1)
    ((bce * w).sum() / w.sum() * 4.0).backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6)


# --- with Ultralytics ---------------------------------------------------------------------------


def _write_rectangles(root: Path, n_train: int = 16, n_val: int = 8) -> Path:
    """A 16-image YOLO set of coloured rectangles (used when the synthetic generator is missing)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            im = Image.new("RGB", (IMGSZ, IMGSZ), tuple(int(v) for v in rng.integers(0, 80, 3)))
            draw, lines = ImageDraw.Draw(im), []
            for _ in range(int(rng.integers(1, 4))):
                c = int(rng.integers(0, NUM_CLASSES))
                w, h = (int(v) for v in rng.integers(8, 32, 2))
                x, y = int(rng.integers(0, IMGSZ - w)), int(rng.integers(0, IMGSZ - h))
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=((60 * c + 80) % 256, 200, 255 - 50 * c))
                lines.append(f"{c} {(x + w / 2) / IMGSZ:.6f} {(y + h / 2) / IMGSZ:.6f} {w / IMGSZ:.6f} {h / IMGSZ:.6f}")
            im.save(root / "images" / split / f"{i:03d}.png")
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"  {i}: c{i}\n" for i in range(NUM_CLASSES))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return root / "data.yaml"


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("yolo-data")
    try:
        from edgekd.tasks.detection.synthetic import generate
    except ImportError:
        return _write_rectangles(root / "rects")
    return generate(root / "shapes", n_train=16, n_val=8, n_test=0, image_size=IMGSZ, seed=0)


@pytest.fixture(scope="module")
def distilled(data_yaml, tmp_path_factory):
    """Train a yolov8s 'teacher' from scratch for a few steps (no weights are reachable offline),
    then distill it into a fresh yolov8n with class-score and neck-feature KD."""
    out = tmp_path_factory.mktemp("yolo-runs")
    teacher = distill_yolo(None, "yolov8s.yaml", data_yaml, out_dir=out / "teacher", steps=2, imgsz=IMGSZ,
                           batch=8)
    student = distill_yolo(teacher["weights"], "yolov8n.yaml", data_yaml, out_dir=out / "student", steps=4,
                           imgsz=IMGSZ, batch=8, temperature=2.0, cls_weight=1.0, feature_weight=1.0)
    return teacher, student


@needs_ultralytics
def test_checkpoint_names_are_never_downloaded():
    with pytest.raises(AssetError, match="not a local file"):
        load_yolo_model("yolov8n.pt", NUM_CLASSES)


@needs_ultralytics
def test_scope_restores_ultralytics_state():
    import ultralytics.utils as uu
    import ultralytics.utils.checks as checks

    before = (uu.ONLINE, checks.AUTOINSTALL, checks.USER_CONFIG_DIR, uu.SETTINGS["sync"])
    with offline_ultralytics() as cfg:
        assert uu.ONLINE is False and checks.AUTOINSTALL is False and uu.SETTINGS["sync"] is False
        assert checks.USER_CONFIG_DIR == Path(cfg) / "Ultralytics"
    assert (uu.ONLINE, checks.AUTOINSTALL, checks.USER_CONFIG_DIR, uu.SETTINGS["sync"]) == before


@needs_ultralytics
@pytest.mark.slow  # Ultralytics import + two short trainings: ~6-20 s on 2 shared CPU cores
def test_teacher_trains_and_student_distills(distilled):
    teacher, r = distilled
    assert teacher["teacher"] is None and teacher["steps"] == 2 and teacher["changed_tensors"] > 0
    assert r["steps"] == 4 and r["locations"] == (8 * 8 + 4 * 4 + 2 * 2)  # strides 8/16/32 at 64 px
    assert r["teacher_params"] > 3 * r["student_params"]
    for figures in (r["before"], r["after"], r["first_step"], r["last_step"]):
        assert all(np.isfinite(v) for v in figures.values()), figures
        assert figures["det"] > 0
    # the KD terms are part of the loss: positive for a teacher the student does not yet match
    assert r["first_step"]["kd_cls"] > 0 and r["before"]["kd_cls"] > 0
    assert r["first_step"]["kd_feat"] > 0
    assert r["first_step"]["total"] > r["first_step"]["det"]
    assert Path(r["weights"]).is_file()


@needs_ultralytics
@pytest.mark.slow  # Ultralytics import + two short trainings: ~6-20 s on 2 shared CPU cores
def test_student_weights_changed(distilled):
    import torch

    _, r = distilled
    assert r["changed_tensors"] >= 0.9 * r["float_tensors"]
    torch.manual_seed(0)  # distill_yolo seeds (seed=0) before building the student: its initial state
    fresh = load_yolo_model("yolov8n.yaml", NUM_CLASSES).state_dict()
    saved = load_yolo_model(r["weights"], NUM_CLASSES).state_dict()
    convs = [k for k in fresh if k.endswith("conv.weight") and "dfl" not in k]
    differ = sum(int(not torch.allclose(fresh[k], saved[k])) for k in convs)
    assert differ >= 0.9 * len(convs), f"{differ}/{len(convs)} conv weights moved"


@needs_ultralytics
@pytest.mark.slow  # Ultralytics import + two short trainings: ~6-20 s on 2 shared CPU cores
def test_student_exports_to_onnx_and_runs(distilled, data_yaml, tmp_path):
    import onnxruntime as ort
    from PIL import Image

    _, r = distilled
    info = export_yolo_onnx(r["weights"], tmp_path / "student.onnx", imgsz=IMGSZ)
    assert info["exporter"] in ("ultralytics", "torch.onnx"), info
    expected = [1, 4 + NUM_CLASSES, r["locations"]]
    assert info["output_shape"] == expected
    assert info["max_abs_diff"] < 1e-3, info
    # checked in a temporary folder, then published in one rename: only the file itself is left here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]
    run = Path(r["weights"]).parent  # and the distillation wrote its checkpoint and record the same way
    assert {"student.pt", "distill.json"} <= {p.name for p in run.iterdir()} and not list(run.glob(".*.tmp"))
    image = sorted((data_yaml.parent / "images" / "val").glob("*.png"))[0]
    x = np.asarray(Image.open(image).convert("RGB").resize((IMGSZ, IMGSZ)), dtype=np.float32) / 255.0
    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {info["input_name"]: x.transpose(2, 0, 1)[None]})
    assert list(out.shape) == expected and np.isfinite(out).all()
    scores = out[0, 4:]
    assert (scores >= 0).all() and (scores <= 1).all()  # class probabilities after the sigmoid


def test_cli_distill_yolo_without_ultralytics_says_how_to_install(tmp_path):
    import subprocess
    import sys

    from edgekd.tasks.detection.yolo import ultralytics_available

    if ultralytics_available()[0]:
        pytest.skip("Ultralytics runs here: the refusal path is not reachable")
    res = subprocess.run([sys.executable, "-m", "edgekd", "distill-yolo", "yolov8s.yaml", "yolov8n.yaml",
                          str(tmp_path / "data.yaml")], capture_output=True, text=True, timeout=120)
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0 and out.startswith("error:"), out
    assert "edgekd[yolo]" in out  # the extra survives the console's markup
