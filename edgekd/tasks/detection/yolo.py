"""Ultralytics YOLO as teacher or student (optional extra ``edgekd[yolo]``).

Nothing here imports Ultralytics or torch at module level: the core never needs them, and the
project's own environment usually cannot run Ultralytics (its torchvision must import beside the
installed torch). Use :func:`ultralytics_available` to ask, and run every Ultralytics call inside
:func:`offline_ultralytics`, which keeps it off the network (no hub/asset downloads, no pip
auto-installs, no telemetry, no font download) and puts its settings in a private temporary folder,
restoring the environment and Ultralytics' module state on exit.

Distillation (:func:`distill_yolo`) is a short plain-torch loop over Ultralytics' own pieces (the
``DetectionModel``, its ``v8DetectionLoss`` through ``model.loss`` and the YOLO dataloader), so it
does not depend on the trainer's internals, which change between Ultralytics releases:

    loss = v8DetectionLoss(student)                      # box + cls + dfl, x batch size
         + B * cls_weight * T^2 * KD_cls(student, teacher)  # per location, teacher-score weighted
         + B * feature_weight * MSE(proj(student neck), teacher neck)   # optional, 1x1 projectors

Teacher and student must share strides (v8n/v8s/v8m...: P3-P5) so their heads predict at the same
locations. The teacher is frozen in eval mode.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd.errors import AssetError, EdgeKDError, MissingBackendError
from edgekd.runfolder import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import torch
    from torch import nn

# Known to resolve and run on CPU (CUDA wheels): keep it in one place for messages and docs.
INSTALL_COMMAND = "pip install torch==2.14.1 torchvision==0.29.1 ultralytics==8.4.190"

_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
_CONFIG_DIR: Path | None = None  # one private Ultralytics config folder per process (removed at exit)
_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


# ---------------------------------------------------------------------------------------------
# availability and the offline scope


def ultralytics_available() -> tuple[bool, str | None]:
    """(True, None) when Ultralytics imports and can run here, else (False, why + how to install)."""
    hint = f"install it in an environment whose torchvision matches its torch, e.g. `{INSTALL_COMMAND}`"
    if importlib.util.find_spec("ultralytics") is None:
        return False, f"Ultralytics is not installed; {hint}"
    try:
        import torchvision  # noqa: F401  (Ultralytics needs it; PyPI's build may not load beside this torch)
    except Exception as e:  # ImportError, or a RuntimeError/OSError from mismatched native ops
        torch_version = _torch_version()
        return False, (f"torchvision does not import beside torch {torch_version} "
                       f"({type(e).__name__}: {_first_line(e)}); {hint}")
    try:
        with offline_ultralytics():
            import ultralytics  # noqa: F401
            from ultralytics.nn.tasks import DetectionModel  # noqa: F401
    except Exception as e:
        return False, f"Ultralytics does not import ({type(e).__name__}: {_first_line(e)}); {hint}"
    return True, None


def require_ultralytics() -> None:
    """Raise MissingBackendError (with the install command) when Ultralytics cannot run here."""
    ok, why = ultralytics_available()
    if not ok:
        raise MissingBackendError("YOLO detection (Ultralytics teachers/students)", "ultralytics", extra="yolo",
                                  why=why)


def _torch_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return "(not installed)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def _font_source() -> Path | None:
    """A DejaVuSans.ttf on this machine (matplotlib bundles one), found without importing anything."""
    candidates = []
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")
    candidates += [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"), Path("/usr/share/fonts/TTF/DejaVuSans.ttf"),
                   Path("/Library/Fonts/Arial.ttf"), Path("C:/Windows/Fonts/arial.ttf")]
    return next((p for p in candidates if p.is_file()), None)


def _config_dir() -> Path:
    """The private YOLO_CONFIG_DIR of this process, with a font where Ultralytics looks for Arial.

    It lives until the process exits (Ultralytics keeps the settings path it saw at import), so a
    later context finds the same folder; it is removed at exit.
    """
    global _CONFIG_DIR
    if _CONFIG_DIR is None or not _CONFIG_DIR.is_dir():
        root = Path(tempfile.mkdtemp(prefix="edgekd-ultralytics-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        (root / "Ultralytics").mkdir()
        font = _font_source()
        if font is not None:
            for name in _FONT_NAMES:
                shutil.copyfile(font, root / "Ultralytics" / name)
        _CONFIG_DIR = root
    return _CONFIG_DIR


@contextlib.contextmanager
def offline_ultralytics() -> Iterator[Path]:
    """Run Ultralytics offline, with its settings in a private temporary folder; restore on exit.

    Sets YOLO_OFFLINE=1, YOLO_AUTOINSTALL=0 and YOLO_CONFIG_DIR (a temporary folder holding a
    DejaVuSans copy as Arial.ttf, so the dataset check does not download the font). Ultralytics
    reads those at import, so when it was imported earlier its module constants (ONLINE,
    AUTOINSTALL, USER_CONFIG_DIR) are patched for the duration as well; settings ``sync`` is set
    False in memory only (the settings file is not rewritten) and telemetry events are disabled.
    Yields the config folder. Not thread-safe (it changes ``os.environ``).
    """
    cfg = _config_dir()
    saved_env = {k: os.environ.get(k) for k in (*_ENV, "YOLO_CONFIG_DIR")}
    undo: list[tuple[Any, str, Any]] = []  # (object, attribute or key, old value)
    try:
        os.environ.update(_ENV)
        os.environ["YOLO_CONFIG_DIR"] = str(cfg)
        undo = _patch_ultralytics(cfg / "Ultralytics")
        yield cfg
    finally:
        for obj, key, old in reversed(undo):
            if isinstance(obj, dict):
                dict.__setitem__(obj, key, old)  # bypass Ultralytics' JSON persistence
            else:
                setattr(obj, key, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _patch_ultralytics(user_dir: Path) -> list[tuple[Any, str, Any]]:
    undo: list[tuple[Any, str, Any]] = []
    if importlib.util.find_spec("ultralytics") is None:
        return undo
    try:
        import ultralytics.utils as uu  # first import happens here, under the offline environment
    except Exception:
        return undo  # ultralytics_available() reports why
    constants = {"ONLINE": False, "AUTOINSTALL": False, "USER_CONFIG_DIR": user_dir}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "ultralytics" or name.startswith("ultralytics.")):
            continue
        for attr, value in constants.items():
            if attr in getattr(module, "__dict__", {}):
                undo.append((module, attr, getattr(module, attr)))
                setattr(module, attr, value)
    settings = getattr(uu, "SETTINGS", None)
    if isinstance(settings, dict) and "sync" in settings:
        undo.append((settings, "sync", settings["sync"]))
        dict.__setitem__(settings, "sync", False)
    events_module = sys.modules.get("ultralytics.utils.events")
    events = getattr(events_module, "events", None)
    if events is not None and hasattr(events, "enabled"):
        undo.append((events, "enabled", events.enabled))
        events.enabled = False
    return undo


# ---------------------------------------------------------------------------------------------
# models


def class_name_list(names: Any) -> list[str] | None:
    """Ultralytics' class names (a dict ``{0: 'a', ...}`` or a list) as a list in class order; None if absent."""
    if names is None:
        return None
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    return [str(n) for n in names]


def check_teacher_classes(teacher_names: Any, teacher_nc: int, data_names: Any, spec: str | Path) -> None:
    """Refuse a teacher checkpoint whose classes are not the data's, in order: its class scores are the
    KD targets, so a fresh (random) class head, or one whose class 2 is the data's class 0, would teach
    the student noise or the wrong labels. A checkpoint without names is judged by its class count."""
    data = class_name_list(data_names) or []
    mine = class_name_list(teacher_names)
    if teacher_nc != len(data):
        raise EdgeKDError(
            f"YOLO teacher '{spec}' has {teacher_nc} classes but the data has {len(data)} ({', '.join(data)}): "
            "a teacher's class scores are the distillation targets, so it must be trained on these classes. "
            "Train (or fine-tune) the teacher on this data first, e.g. leave teacher.model unset.")
    if mine is not None and mine != data:
        raise EdgeKDError(
            f"YOLO teacher '{spec}' has the classes [{', '.join(mine)}] but the data has [{', '.join(data)}] "
            "(names, in class-id order, must match): its class scores would teach the student the wrong labels. "
            "Use a teacher trained on this data's classes, or fix the order of names in the data.yaml.")


def load_yolo_model(spec: str | Path, num_classes: int, *, teacher_names: Any = None) -> nn.Module:
    """An Ultralytics ``DetectionModel`` with ``num_classes`` classes, in train mode, ready for
    ``model.loss(batch)`` (``model.args`` holds Ultralytics' default hyperparameters, or the
    checkpoint's).

    ``spec`` is a model YAML (a name Ultralytics ships, e.g. ``yolov8n.yaml``/``yolov8s.yaml``, or a
    local file): a freshly initialised model; or a local ``.pt`` checkpoint (Ultralytics format, as
    written by :func:`save_yolo_checkpoint` or by ``yolo train``): its weights, with a new class head
    when its class count differs. Nothing is ever downloaded.

    ``teacher_names`` (the data's class names) loads a teacher: a ``.pt`` checkpoint whose classes are
    not these, in order, is refused (:func:`check_teacher_classes`) instead of getting a new head.
    """
    require_ultralytics()
    if num_classes < 1:
        raise EdgeKDError(f"num_classes must be >= 1, got {num_classes}.")
    text = str(spec)
    suffix = Path(text).suffix.lower()
    with offline_ultralytics():
        from ultralytics.nn.tasks import DetectionModel

        if suffix in (".yaml", ".yml"):
            try:
                model = DetectionModel(text, nc=num_classes, verbose=False)
            except FileNotFoundError as e:
                raise AssetError(f"YOLO model config '{text}' was found neither as a local file nor among the "
                                 f"configs Ultralytics ships (e.g. yolov8n.yaml, yolov8s.yaml): {e}") from e
        elif suffix == ".pt":
            path = Path(text).expanduser()
            if not path.is_file():
                raise AssetError(
                    f"YOLO checkpoint '{text}' is not a local file. edgekd never downloads weights (Ultralytics "
                    f"would try to fetch '{path.name}' from GitHub): put the .pt file at a path on this machine "
                    "and pass that path, or start from a config such as 'yolov8n.yaml'.")
            loaded = _load_checkpoint(path)
            if teacher_names is not None:
                check_teacher_classes(getattr(loaded, "names", None), int(loaded.model[-1].nc), teacher_names, text)
            if int(loaded.model[-1].nc) == num_classes:
                model = loaded
            else:  # same architecture, fresh class head; every other matching weight is transferred
                model = DetectionModel(loaded.yaml, nc=num_classes, verbose=False)
                model.load(loaded, verbose=False)
        else:
            raise EdgeKDError(f"YOLO model spec '{text}' must be a model YAML (e.g. yolov8n.yaml) or a local .pt "
                              "checkpoint.")
        model.args = _hyperparameters(getattr(model, "args", None))
    model = model.float()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def _hyperparameters(saved: Any):
    """Ultralytics' default settings updated with a checkpoint's (``model.loss`` reads its gains here)."""
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    saved = saved if isinstance(saved, dict) else dict(vars(saved)) if saved is not None else {}
    return IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **{k: v for k, v in saved.items() if k in DEFAULT_CFG_DICT}})


def _load_checkpoint(path: Path):
    try:
        from ultralytics.nn.tasks import load_checkpoint as load  # 8.4+
    except ImportError:
        from ultralytics.nn.tasks import attempt_load_one_weight as load  # 8.0 - 8.3
    return load(str(path))[0]


def save_yolo_checkpoint(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as an Ultralytics checkpoint (``YOLO(path)`` and :func:`load_yolo_model` load it)."""
    import copy
    from datetime import datetime, timezone

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).float().cpu().eval()
    if hasattr(m, "criterion"):
        m.criterion = None  # training state, rebuilt on demand
    args = getattr(m, "args", None)
    args = dict(vars(args)) if args is not None and not isinstance(args, dict) else dict(args or {})
    try:
        from ultralytics import __version__ as ul_version
    except Exception:
        ul_version = None
    ckpt = {"model": m, "ema": None, "epoch": -1, "train_args": args, "version": ul_version,
            "date": datetime.now(timezone.utc).isoformat(), "edgekd": dict(extra or {})}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())  # a crash mid-save leaves no half-written checkpoint behind
    return path


# ---------------------------------------------------------------------------------------------
# distillation


def _raw_scores(preds: Any, num_classes: int) -> torch.Tensor:
    """Class logits [B, A, C] from a DetectionModel's raw output, whatever its Ultralytics version:
    8.4 returns {"boxes", "scores" [B,C,A], "feats"} in training and (decoded, that dict) in eval;
    8.0-8.3 return per-level maps [B, 4*reg_max + C, H, W] (inside a tuple in eval)."""
    import torch

    if isinstance(preds, tuple) and len(preds) == 2:
        preds = preds[1]
    if isinstance(preds, dict) and "one2many" in preds:
        preds = preds["one2many"]
    if isinstance(preds, dict):
        return preds["scores"].transpose(1, 2)
    b = preds[0].shape[0]
    cat = torch.cat([p.reshape(b, p.shape[1], -1) for p in preds], 2)
    return cat[:, -num_classes:].transpose(1, 2)


def yolo_cls_kd(student_cls: torch.Tensor, teacher_cls: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled class-score distillation over [B, A, C] logits (a scalar, >= 0).

    Per location and class: BCE(sigmoid(s/T), target sigmoid(t/T)) minus the target's own entropy,
    i.e. the binary KL, which has BCE's gradient and is 0 when the scores agree; summed over classes,
    averaged over locations weighted by the teacher's best (T=1) class probability, times T^2.
    """
    import torch.nn.functional as F

    t_ = float(temperature)
    if t_ <= 0:
        raise EdgeKDError(f"temperature must be > 0, got {temperature}.")
    if student_cls.shape != teacher_cls.shape:
        raise EdgeKDError(f"student class scores {tuple(student_cls.shape)} vs teacher {tuple(teacher_cls.shape)}: "
                          "YOLO KD needs the same classes, strides and input size for both.")
    s = student_cls.float() / t_
    t = teacher_cls.detach().float() / t_
    p = t.sigmoid()
    kl = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
          - F.binary_cross_entropy_with_logits(t, p, reduction="none")).sum(-1)  # [B, A]
    w = teacher_cls.detach().float().sigmoid().amax(-1)  # [B, A]
    return (kl * w).sum() / w.sum().clamp(min=1e-6) * (t_ * t_)


class _NeckTap:
    """Keeps the inputs of a model's Detect head (the neck outputs P3..P5) from its last forward."""

    def __init__(self, model: nn.Module):
        self.feats: list[torch.Tensor] = []
        self.handle = model.model[-1].register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.feats = list(inputs[0])  # a copy: older Detect heads overwrite the list in place


@contextlib.contextmanager
def _bn_frozen(model: nn.Module) -> Iterator[None]:
    """Train-mode forward (batch statistics) that leaves BatchNorm running statistics untouched."""
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


def distill_yolo(
    teacher_spec: str | Path | None,
    student_spec: str | Path,
    data_yaml: str | Path,
    *,
    out_dir: str | Path,
    steps: int | None = None,
    epochs: int | None = None,
    imgsz: int = 640,
    batch: int = 16,
    lr: float = 1e-3,
    temperature: float = 2.0,
    cls_weight: float = 1.0,
    feature_weight: float = 0.0,
    device: str = "cpu",
    seed: int = 0,
    workers: int = 0,
    eval_batches: int = 4,
) -> dict[str, Any]:
    """Distill a YOLO teacher into a YOLO student on a YOLO-format dataset (``data.yaml``).

    ``teacher_spec``/``student_spec``: model YAML names (``yolov8s.yaml``, fresh weights) or local
    ``.pt`` checkpoints (see :func:`load_yolo_model`); ``teacher_spec=None`` trains the student on
    the labels alone (e.g. to train a teacher first). Train for ``steps`` optimizer steps, or
    ``epochs`` passes over the training split (default 100 steps): AdamW at ``lr``, gradient norm
    clipped at 10, Ultralytics' default augmentation and loss gains. ``cls_weight``/``feature_weight``
    weigh the KD terms (0 switches a term off; the feature term adds 1x1 projectors, trained with the
    student and not saved). The student is saved to ``out_dir/student.pt`` (Ultralytics checkpoint)
    and the figures to ``out_dir/distill.json``.

    Returns the figures: steps, seconds, the losses per image on up to ``eval_batches`` batches of
    the validation split (no augmentation) before and after training (``before``/``after``: total,
    det, kd_cls, kd_feat), the first/last training-step losses, how many weight tensors changed, and
    the student's ``weights`` path.
    """
    require_ultralytics()
    if steps is not None and epochs is not None:
        raise EdgeKDError("Give steps or epochs, not both.")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1) or eval_batches < 1:
        raise EdgeKDError(f"steps/epochs/eval_batches must be >= 1, got steps={steps}, epochs={epochs}, "
                          f"eval_batches={eval_batches}.")
    if temperature <= 0 or cls_weight < 0 or feature_weight < 0:
        raise EdgeKDError(f"temperature must be > 0 and the KD weights >= 0 (temperature={temperature}, "
                          f"cls_weight={cls_weight}, feature_weight={feature_weight}).")
    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise AssetError(f"YOLO data.yaml {data_yaml} does not exist.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if teacher_spec is None:
        cls_weight = feature_weight = 0.0

    import torch
    from torch import nn

    t0 = time.perf_counter()
    with offline_ultralytics():
        from ultralytics.cfg import get_cfg
        from ultralytics.data import build_dataloader, build_yolo_dataset
        from ultralytics.data.utils import check_det_dataset
        from ultralytics.utils import DEFAULT_CFG

        data = check_det_dataset(str(data_yaml))
        nc = int(data["nc"])
        _seed_everything(seed)  # model init, and the augmentation (python/numpy random) of the loader
        dev = torch.device(device)
        student = load_yolo_model(student_spec, nc).to(dev).train()
        teacher = None
        if teacher_spec is not None:
            teacher = load_yolo_model(teacher_spec, nc, teacher_names=data["names"]).to(dev).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            if not torch.equal(student.stride.cpu(), teacher.stride.cpu()):
                raise EdgeKDError(f"teacher strides {teacher.stride.tolist()} and student strides "
                                  f"{student.stride.tolist()} differ: class-score KD pairs their locations one "
                                  "to one.")
        args = get_cfg(DEFAULT_CFG, {"imgsz": imgsz, "batch": batch, "workers": workers, "task": "detect",
                                     "mode": "train", "seed": seed, "device": str(device)})
        student.args = args  # v8DetectionLoss reads its gains (box, cls, dfl) from here
        student.criterion = None
        student.nc, student.names = nc, data["names"]
        stride = max(int(student.stride.max()), 32)
        train_set = build_yolo_dataset(args, data["train"], batch, data, mode="train", stride=stride)
        loader = build_dataloader(train_set, batch, workers, True)
        val_set = build_yolo_dataset(args, data["val"], batch, data, mode="val", stride=stride)
        val_loader = build_dataloader(val_set, batch, workers, False)
        held_out = [_prepare(b, dev) for b in itertools.islice(val_loader, eval_batches)]
        n_batches = len(loader)
        total_steps = steps if steps is not None else (epochs * n_batches if epochs is not None else 100)

        s_tap = _NeckTap(student)
        t_tap = _NeckTap(teacher) if teacher is not None else None
        projectors = nn.ModuleList()
        if feature_weight:
            with torch.no_grad(), _bn_frozen(student):
                student(held_out[0]["img"])
                teacher(held_out[0]["img"])
            for fs, ft in zip(s_tap.feats, t_tap.feats, strict=True):
                projectors.append(nn.Conv2d(fs.shape[1], ft.shape[1], 1))
        projectors.to(dev).train()

        def step_loss(batch_: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
            img = batch_["img"]
            s_pred = student(img)
            det, _ = student.loss(batch_, s_pred)
            det = det.sum()  # 8.4 returns the 3 gain-weighted terms x B, 8.0-8.3 their sum x B
            bs = img.shape[0]
            total, kd_cls, kd_feat = det, det.new_zeros(()), det.new_zeros(())
            if teacher is not None:
                with torch.no_grad():
                    t_pred = teacher(img)
                if cls_weight:
                    kd_cls = yolo_cls_kd(_raw_scores(s_pred, nc), _raw_scores(t_pred, nc), temperature)
                    total = total + bs * cls_weight * kd_cls
                if feature_weight:
                    pairs = list(zip(s_tap.feats, t_tap.feats, strict=True))
                    kd_feat = sum(nn.functional.mse_loss(proj(fs), ft.detach())
                                  for proj, (fs, ft) in zip(projectors, pairs, strict=True)) / len(pairs)
                    total = total + bs * feature_weight * kd_feat
            return total, {"total": float(total.detach()) / bs, "det": float(det.detach()) / bs,
                           "kd_cls": float(kd_cls.detach()), "kd_feat": float(kd_feat.detach())}

        def measure() -> dict[str, float]:
            sums: dict[str, float] = {}
            n = 0
            with torch.no_grad(), _bn_frozen(student):
                for b in held_out:
                    bs = b["img"].shape[0]
                    for k, v in step_loss(b)[1].items():
                        sums[k] = sums.get(k, 0.0) + v * bs
                    n += bs
            return {k: v / n for k, v in sums.items()}

        before = measure()
        initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
        params = [p for p in student.parameters() if p.requires_grad] + list(projectors.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
        history: list[dict[str, float]] = []
        step = 0
        t_train = time.perf_counter()
        while step < total_steps:
            for raw in loader:
                loss, logs = step_loss(_prepare(raw, dev))
                if not torch.isfinite(loss):
                    raise EdgeKDError(f"YOLO distillation loss is not finite at step {step}: {logs}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, max_norm=10.0)
                optimizer.step()
                history.append(logs)
                step += 1
                if step >= total_steps:
                    break
        train_seconds = time.perf_counter() - t_train
        after = measure()
        s_tap.handle.remove()
        if t_tap is not None:
            t_tap.handle.remove()
        final = student.state_dict()
        changed = sum(int(not torch.equal(v, final[k])) for k, v in initial.items() if v.is_floating_point())
        student.criterion = None
        weights = save_yolo_checkpoint(student, out / "student.pt", extra={
            "distilled_from": None if teacher_spec is None else str(teacher_spec), "data": str(data_yaml)})

    result = {
        "teacher": None if teacher_spec is None else str(teacher_spec), "student": str(student_spec),
        "data": str(data_yaml), "num_classes": nc, "imgsz": imgsz, "batch": batch, "steps": step,
        "batches_per_epoch": n_batches, "epochs": round(step / max(n_batches, 1), 3),
        "temperature": temperature, "cls_weight": cls_weight, "feature_weight": feature_weight, "lr": lr,
        "device": str(device), "seed": seed,
        "teacher_params": None if teacher is None else sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "locations": _locations(student, imgsz), "eval_images": sum(b["img"].shape[0] for b in held_out),
        "before": before, "after": after, "first_step": history[0], "last_step": history[-1],
        "changed_tensors": changed, "float_tensors": sum(int(v.is_floating_point()) for v in initial.values()),
        "train_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - t0, 3),
        "weights": str(weights),
    }
    atomic_write_text(out / "distill.json", json.dumps(result, indent=2) + "\n")
    return result


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _locations(model: nn.Module, imgsz: int) -> int:
    return int(sum((imgsz // int(s)) ** 2 for s in model.stride.tolist()))


def _prepare(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    import torch

    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    out["img"] = out["img"].float() / 255.0
    return out


# ---------------------------------------------------------------------------------------------
# export


def export_yolo_onnx(model_or_path: nn.Module | str | Path, out_path: str | Path, imgsz: int = 640,
                     *, opset: int | None = None) -> dict[str, Any]:
    """Export a YOLO detector to ONNX with Ultralytics' exporter, then check it in onnxruntime.

    ``model_or_path``: a DetectionModel or a local ``.pt`` checkpoint. The graph takes ``images``
    float32 [1, 3, imgsz, imgsz] in 0..1 and returns ``output0`` [1, 4 + C, A] (xywh boxes in
    input pixels, then class probabilities; NMS left to the host). Falls back to
    ``torch.onnx.export`` of the same head-in-export-mode model if the exporter fails. Returns the
    path, the output shape, the exporter used and the max abs difference to the torch model.
    """
    require_ultralytics()
    import numpy as np
    import torch

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with offline_ultralytics(), tempfile.TemporaryDirectory(prefix="edgekd-yolo-export-") as tmp:
        if isinstance(model_or_path, (str, Path)):
            src = Path(model_or_path)
            if src.suffix.lower() != ".pt" or not src.is_file():
                raise AssetError(f"{src} is not a local .pt checkpoint; export needs trained weights on this machine.")
        else:
            src = save_yolo_checkpoint(model_or_path, Path(tmp) / "model.pt")
        ckpt_copy = Path(tmp) / "export.pt"  # the exporter writes next to its input; keep that in tmp
        staged = Path(tmp) / "staged.onnx"  # checked, then published at out_path in one rename
        if ckpt_copy != src:
            shutil.copyfile(src, ckpt_copy)
        reference = _load_checkpoint(ckpt_copy).float().eval()
        nc = int(reference.model[-1].nc)
        exporter, error = "ultralytics", None
        try:
            from ultralytics import YOLO

            produced = YOLO(str(ckpt_copy), task="detect").export(
                format="onnx", imgsz=imgsz, simplify=False, dynamic=False, device="cpu",
                **({"opset": opset} if opset else {}))
            shutil.move(str(produced), staged)
        except Exception as e:  # exporter API drift: the plain torch export of the same graph
            exporter, error = "torch.onnx", f"{type(e).__name__}: {_first_line(e)}"
            _torch_onnx_export(reference, staged, imgsz, opset or 17)

        import onnxruntime as ort

        x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
        sess = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        got = sess.run(None, {inp.name: x.numpy()})[0]
        with torch.no_grad():
            ref = reference(x)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
        if got.shape != ref.shape:  # nothing is written at out_path
            raise EdgeKDError(f"ONNX output {got.shape} does not match the torch model's {ref.shape}.")
        atomic_write_bytes(out_path, staged.read_bytes())
    result = {"path": str(out_path), "exporter": exporter, "input_name": inp.name,
              "input_shape": [1, 3, imgsz, imgsz], "output_shape": list(got.shape), "num_classes": nc,
              "max_abs_diff": float(np.abs(got - ref).max())}
    if error:
        result["exporter_error"] = error
    return result


def _torch_onnx_export(model: nn.Module, out_path: Path, imgsz: int, opset: int) -> None:
    import copy

    import torch

    m = copy.deepcopy(model).float().eval()
    for mod in m.modules():  # Detect heads: one concatenated tensor, no tuple of raw maps
        if hasattr(mod, "export") and hasattr(mod, "stride"):
            mod.export, mod.format = True, "onnx"
    x = torch.zeros(1, 3, imgsz, imgsz)
    kwargs: dict[str, Any] = {"input_names": ["images"], "output_names": ["output0"], "opset_version": opset}
    try:
        torch.onnx.export(m, (x,), str(out_path), dynamo=False, **kwargs)
    except TypeError:  # torch < 2.5 has no dynamo argument
        torch.onnx.export(m, (x,), str(out_path), **kwargs)
