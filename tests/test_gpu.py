"""The pipeline on a CUDA GPU, where one is present (skipped elsewhere, CI included).

The CPU tests never reach the code paths a GPU takes: Accelerate placing models and batches on the
device, ``runtime.precision: auto`` choosing bf16 or fp16 autocast, the teacher moved beside the
student for hidden-state and attention matching, pruning's importance scores and recovery on the
device, and the models brought back to the CPU for export. This test runs a tiny recipe through
all of them on the GPU and checks that the GPU did the training and that every later stage worked
from what it trained.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")]


def test_the_pipeline_trains_on_the_gpu_and_exports_from_it(tmp_path, tiny_teacher_dir, tiny_csv):
    from edgekd.pipeline import run_stages
    from edgekd.recipe import parse_recipe
    from edgekd.testing import tiny_recipe
    from edgekd.train import resolve_precision

    recipe = parse_recipe(tiny_recipe(
        tmp_path, tiny_teacher_dir, tiny_csv,
        runtime={"precision": "auto"},
        teacher={"augment": {"copies": 1}},
        distill={"hidden_weight": 1.0, "attention_weight": 1.0},
        prune={"enabled": True, "method": "heads-ffn", "keep_params": 0.6, "recover_epochs": 1,
               "recover_hidden_weight": 1.0},
        export={"targets": ["onnx", "torchscript-lite"], "parity_examples": 64},
        quantize={"enabled": True, "method": "dynamic"},
    ))
    want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision("auto") == want
    torch.cuda.reset_peak_memory_stats()
    ctx = run_stages(recipe, ["teacher", "distill", "baseline", "eval", "prune", "export", "quantize"])
    assert torch.cuda.max_memory_allocated() > 0  # the training ran on the GPU
    stages = json.loads((ctx.run.root / "manifest.json").read_text())["stages"]
    teacher = stages["teacher"]["metrics"]
    assert teacher["finetuned"] and teacher["augmented"]["texts"] > 0
    assert teacher["validation"]["accuracy"] > 0.6  # the fine-tune learnt the synthetic task in mixed precision
    hist = stages["distill"]["metrics"]["train_history"]
    assert {"hidden", "attention", "kd", "ce"} <= set(hist[0]) and hist[-1]["loss"] < hist[0]["loss"]
    assert stages["eval"]["metrics"]["student"]["accuracy"] > 0.5
    prune = stages["prune"]["metrics"]
    assert prune["params_after"] < prune["params_before"]
    for target in ("onnx", "torchscript-lite"):
        rec = stages["export"]["metrics"]["targets"][target]
        assert rec["built"] is True and rec["parity"]["top1_agreement"] >= 0.99, (target, rec)
    assert (ctx.run.root / "export" / "onnx-int8" / "model.onnx").is_file()
