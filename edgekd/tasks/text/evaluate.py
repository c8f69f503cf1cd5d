"""The eval stage: teacher, distilled student and hard-label baseline on the held-out test split.

Reports accuracy, macro-F1 and top-1 agreement with the teacher, how much of the teacher's
accuracy the student keeps, and the measured gain of distillation over the hard-label baseline.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.context import RunContext
from edgekd.runfolder import atomic_write_bytes, fingerprint
from edgekd.stages.base import load_stage_model
from edgekd.tasks.text.distill import stage_fingerprint
from edgekd.tasks.text.teacher import teacher_fingerprint
from edgekd.train import predict


def _size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def eval_fingerprint(ctx: RunContext) -> str:
    r = ctx.recipe
    parts = {"teacher": teacher_fingerprint(ctx), "distill": stage_fingerprint(ctx, "distill")}
    if r.baseline.enabled:
        parts["baseline"] = stage_fingerprint(ctx, "baseline")
    if r.eval.ood_dataset:
        # less the run's own texts since 2026-12-07 (one sentence of the default set): scored again once
        parts["ood"] = {"dataset": r.eval.ood_dataset, "min_abs_score": r.eval.ood_min_abs_score,
                        "less_run_texts": True}
    return fingerprint(parts)


# The eval stage's logits of each model it ran, on the test split and the out-of-domain set, with a digest of the
# token ids they answer: the bench scores the same unpruned models on the same texts in the same ids, and reads
# these instead of running them again (``saved_logits``).
LOGITS_FILE = "logits.npz"


def token_rows_sha256(rows) -> str:
    """sha256 of token-id rows in order, each with its length: equal exactly when the texts' ids are."""
    h = hashlib.sha256()
    for row in rows:
        a = np.ascontiguousarray(row, dtype=np.int64)
        h.update(np.int64(a.size).tobytes())
        h.update(a.tobytes())
    return h.hexdigest()


def marked_rows(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The token ids of each row of padded model inputs, the positions its ``attention_mask`` marks."""
    ids, mask = np.asarray(inputs["input_ids"]), np.asarray(inputs["attention_mask"])
    return [ids[i][mask[i] != 0] for i in range(len(ids))]


def _save_logits(ctx: RunContext, test: Any, ood: Any, logits: dict[str, np.ndarray],
                 ood_logits: dict[str, np.ndarray]) -> Path:
    arrays: dict[str, np.ndarray] = {"test.ids_sha256": np.array(token_rows_sha256(test.input_ids))}
    if ood is not None:
        arrays["ood.ids_sha256"] = np.array(token_rows_sha256(ood.input_ids))
    arrays.update({f"{name}.test": v for name, v in logits.items()})
    arrays.update({f"{name}.ood": v for name, v in ood_logits.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = ctx.run.stage_dir("eval") / LOGITS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def saved_logits(ctx: RunContext, test: dict[str, np.ndarray],
                 ood: dict[str, np.ndarray] | None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], str]:
    """The eval stage's logits of each model it ran on exactly these inputs (padded ``input_ids`` and
    ``attention_mask`` of the test texts, and of the out-of-domain set or None), name -> (test, OOD or None);
    and why there are none. Only from a current eval record (its settings, the models it read and its file
    unchanged: ``RunFolder.stale_reason``) whose token ids are these inputs' own, row for row."""
    why = ctx.run.stale_reason("eval", eval_fingerprint(ctx))
    path = ctx.run.stage_dir("eval") / LOGITS_FILE
    rel = str(path.relative_to(ctx.run.root))
    if why is None and rel not in ((ctx.run.stage_record("eval") or {}).get("artifacts") or {}):
        why = f"its record has no {rel} (recorded before the eval stage kept its logits)"
    if why is not None:
        return {}, f"the eval stage's record is not current: {why}"
    with np.load(path) as z:
        saved = {k: z[k] for k in z.files}
    if str(saved.get("test.ids_sha256")) != token_rows_sha256(marked_rows(test)):
        return {}, "the eval stage scored other test texts or ids"
    if ood is not None and str(saved.get("ood.ids_sha256")) != token_rows_sha256(marked_rows(ood)):
        return {}, "the eval stage scored another out-of-domain set or ids"
    names = [k[: -len(".test")] for k in saved if k.endswith(".test")]
    out = {n: (saved[f"{n}.test"], saved.get(f"{n}.ood") if ood is not None else None) for n in names
           if ood is None or f"{n}.ood" in saved}
    return out, "" if out else "the eval stage ran no model here"


def run_eval(ctx: RunContext) -> dict[str, Any]:
    r, task = ctx.recipe, ctx.task
    t0 = time.perf_counter()
    from edgekd.tasks.text.teacher import load_teacher_outputs
    from edgekd.teachers.stage import cached_split_logits

    teacher, _ = load_teacher_outputs(ctx)
    test = ctx.tokenized("test")
    logits: dict[str, np.ndarray] = {}
    results: dict[str, Any] = {}
    models = {"teacher": (teacher, ctx.model_dir("teacher"))}
    teacher_test = cached_split_logits(ctx, "test")
    if teacher_test is not None:
        # A black-box or combined teacher is scored from its answers on the test split, cached by its stage.
        logits["teacher"] = teacher_test
        results["teacher"] = {**task.metrics({"logits": teacher_test}, test.labels), "agreement_with_teacher": 1.0,
                              "params": None, "size_bytes": None, "layers": None}
        models = {}
    models["student"] = (load_stage_model(ctx, "distill"), ctx.model_dir("distill"))
    if r.baseline.enabled:
        models["baseline"] = (load_stage_model(ctx, "baseline"), ctx.model_dir("baseline"))
    from edgekd.ood import ood_split

    ood = ood_split(ctx)
    if ood is not None and "teacher" not in models:
        results["teacher"]["ood_accuracy"] = None  # a black-box teacher answered the test split only
    ran: dict[str, np.ndarray] = {}  # logits of the models run here (not a black-box teacher's cached answers)
    ood_logits: dict[str, np.ndarray] = {}
    for name, (model, folder) in models.items():
        logits[name] = ran[name] = predict(model, test, r.eval.batch_size, f"eval {name} (test)")
        m = task.metrics({"logits": logits[name]}, test.labels)
        m["agreement_with_teacher"] = float((logits[name].argmax(-1) == logits["teacher"].argmax(-1)).mean())
        m["params"] = sum(p.numel() for p in model.parameters())
        m["size_bytes"] = _size_bytes(folder)
        m["layers"] = model.config.num_hidden_layers
        if ood is not None:
            ood_logits[name] = predict(model, ood[1], r.eval.batch_size, f"eval {name} ({ood[0].name})")
            m["ood_accuracy"] = task.metrics({"logits": ood_logits[name]}, ood[1].labels)["accuracy"]
        results[name] = m
    t_acc, s_acc = results["teacher"]["accuracy"], results["student"]["accuracy"]
    summary = {
        "test_examples": len(test),
        "student_keeps_teacher_accuracy": s_acc / t_acc if t_acc else None,
        "student_params_ratio": (results["student"]["params"] / results["teacher"]["params"]
                                 if results["teacher"]["params"] else None),
    }
    if ood is not None:
        summary["ood"] = ood[0].record()
        s_ood = results["student"]["ood_accuracy"]
        t_ood = results["teacher"].get("ood_accuracy")
        summary["student_keeps_teacher_ood_accuracy"] = s_ood / t_ood if t_ood else None
    if "baseline" in results:
        summary["distill_gain_over_baseline"] = s_acc - results["baseline"]["accuracy"]
        # What each trained on: distillation also on the texts the teacher labelled (teacher.augment copies,
        # teacher.unlabelled), the baseline on the labelled training split alone; the summary says so.
        for stage in ("distill", "baseline"):
            n = ((ctx.run.stage_record(stage) or {}).get("metrics") or {}).get("train_examples")
            if n is not None:
                summary[f"{stage}_train_examples"] = n
    metrics = {**results, "summary": summary}
    if ctx.is_main:
        saved = _save_logits(ctx, test, ood[1] if ood is not None else None, ran, ood_logits)
        ctx.run.record("eval", eval_fingerprint(ctx), metrics, artifacts=[saved], seconds=time.perf_counter() - t0)
    ctx.sync()
    return metrics
