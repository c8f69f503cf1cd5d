"""Export a fine-tuned classifier folder (or a run's fine-tuned teacher) to ONNX, ready for
`edgekd serve`: to use it as a black-box teacher, or to serve the large model beside the small one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import StageError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def export_classifier(model_dir: str | Path, out_root: str | Path, texts: list[str], labels: list[int] | None = None,
                      max_length: int = 64, name: str = "teacher") -> dict[str, Any]:
    """Export the sequence classifier in ``model_dir`` to ``out_root/onnx/`` with the project's ONNX
    exporter, its parity checked on ``texts``. Returns the export record (``folder``, ``parity``)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgekd.export.stage import export_all
    from edgekd.recipe import ExportConfig
    from edgekd.tasks.text.task import TEXT_IO, SequenceClassifierExport, classification_metrics

    model_dir = Path(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    inputs = {n: enc[n].astype(np.int64) for n in TEXT_IO.input_names}
    id2label = model.config.id2label
    meta = {"labels": [id2label[i] for i in range(len(id2label))], "max_length": max_length,
            "task": "text-classification", "source_model": str(model_dir), "run": name}
    extra = [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    with torch.no_grad():
        records = export_all(SequenceClassifierExport(model), TEXT_IO, ["onnx"], Path(out_root),
                             ExportConfig(targets=["onnx"], parity_examples=len(texts)), inputs,
                             None if labels is None else np.asarray(labels), classification_metrics, meta, extra)
    rec = records["onnx"]
    if rec.get("status") != "ok":
        raise StageError(f"exporting {model_dir} to ONNX failed: {rec.get('reason') or rec}")
    return rec


def parity_summary(rec: dict[str, Any]) -> str:
    """One line on an export record's parity check, or why it did not run."""
    parity = rec.get("parity") or {}
    if not parity.get("ran"):
        return f"parity not checked: {parity.get('reason', 'no examples')}"
    return (f"parity on {parity['examples']} test texts: top-1 agreement {parity['top1_agreement']:.4f}, "
            f"max |diff| {parity['max_abs_diff']:.2e}")


SERVED_TEACHER = "served-teacher"  # runs/<name>/served-teacher/onnx: where `edgekd export-teacher` writes


def export_run_teacher(recipe: Any, out_root: str | Path | None = None, examples: int = 256) -> dict[str, Any]:
    """Export the fine-tuned teacher of ``recipe``'s run (``runs/<name>/teacher/model``) to
    ``out_root/onnx/`` (default ``runs/<name>/served-teacher/onnx``), its parity checked on the first
    ``examples`` texts of the test split. Returns the export record (``folder``, ``parity``)."""
    from edgekd.pipeline import create_context
    from edgekd.tasks.text.teacher import STAGE, teacher_fingerprint

    if recipe.task != "text-classification":
        raise StageError(f"export-teacher exports text classifiers; run '{recipe.name}' is a {recipe.task} run: "
                         "give the folder of a text-classification run.")
    if recipe.teacher.kind != "model":
        raise StageError(f"run '{recipe.name}' has a black-box teacher (teacher.kind: {recipe.teacher.kind}): "
                         "there are no weights here to export; serve or call the endpoint the recipe names.")
    ctx = create_context(recipe)
    model_dir = ctx.model_dir(STAGE)
    if not ctx.run.is_done(STAGE, teacher_fingerprint(ctx)) or not (model_dir / "config.json").is_file():
        raise StageError(f"run '{recipe.name}' has no finished teacher stage matching its recipe in {ctx.run.root}: "
                         f"run `edgekd teacher {ctx.run.root}` (or `edgekd run`) first.")
    texts, labels = ctx.splits.texts("test")[:examples], ctx.splits.labels("test")[:examples]
    out = Path(out_root) if out_root is not None else ctx.run.root / SERVED_TEACHER
    return export_classifier(model_dir, out, texts, labels.tolist(), max_length=recipe.data.max_length,
                             name=f"{recipe.name}-teacher")
