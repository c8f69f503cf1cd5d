"""One training loop for every stage that trains (teacher fine-tune, distillation, baseline).

Straight-line code over Hugging Face Accelerate, so the same loop runs on one CPU, one GPU or
many (``accelerate launch -m edgekd run ...``). A checkpoint is written atomically at the end of
each epoch; a run that is interrupted resumes from the last finished epoch, with the same data
order, optimizer, scheduler and random state.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.progress import progress_bar
from edgekd.recipe import TrainConfig
from edgekd.runfolder import atomic_write_text
from edgekd.tasks.text import TokenizedSplit, to_torch

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 on x86 (read from /proc/cpuinfo), where bf16 autocast is a real speed-up."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def resolve_precision(precision: str) -> str:
    """Map the recipe's precision to Accelerate's mixed_precision ('no', 'bf16', 'fp16')."""
    if precision == "fp32":
        return "no"
    if precision in ("bf16", "fp16"):
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"


def make_accelerator(precision: str):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=resolve_precision(precision))


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch build has it for the parameters' device: one
    kernel per step instead of a loop over tensors (the optimizer step was a quarter of a CPU step)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


@dataclass
class TrainResult:
    steps: int
    epochs_run: list[int]
    resumed_from_epoch: int | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _latest_checkpoint(ckpt_root: Path) -> tuple[int, Path] | None:
    best = None
    for p in ckpt_root.glob("epoch-*"):
        m = re.fullmatch(r"epoch-(\d+)", p.name)
        if m and (p / "edgekd_state.json").is_file():
            n = int(m.group(1))
            if best is None or n > best[0]:
                best = (n, p)
    return best


def train(
    model: nn.Module,
    data: TokenizedSplit,
    cfg: TrainConfig,
    loss_fn: LossFn,
    *,
    seed: int,
    precision: str,
    ckpt_root: Path,
    description: str,
    extra_params: list[nn.Parameter] | None = None,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train ``model`` in place with AdamW + linear warm-up/decay.

    ``loss_fn(model, batch)`` returns (loss, logs). ``extra_params`` (e.g. hidden-state
    projections) are optimised alongside. ``stop_after_epochs`` ends early after that many epochs
    (used by tests to simulate an interruption).
    """
    import time

    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    set_seed(seed)
    accelerator = make_accelerator(precision)
    batches_per_epoch = math.ceil(len(data) / cfg.batch_size)
    n_epochs = math.ceil(cfg.epochs)
    total_batches = max(1, round(cfg.epochs * batches_per_epoch))
    total_steps = math.ceil(total_batches / cfg.grad_accum)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if extra_params:
        groups.append({"params": list(extra_params), "weight_decay": cfg.weight_decay})
    optimizer = _adamw(groups, cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    ckpt_root = Path(ckpt_root)
    start_epoch, resumed = 0, None
    latest = _latest_checkpoint(ckpt_root)
    if latest:
        accelerator.load_state(str(latest[1]))
        start_epoch = resumed = latest[0]
    result = TrainResult(steps=0, epochs_run=[], resumed_from_epoch=resumed)
    if start_epoch:
        state = json.loads((latest[1] / "edgekd_state.json").read_text())
        result.history = state.get("history", [])
    t0 = time.perf_counter()
    done_batches = start_epoch * batches_per_epoch
    model.train()
    with progress_bar(description, total=total_batches, completed=done_batches) as bar:
        for epoch in range(start_epoch, n_epochs):
            order = data.train_batches(cfg.batch_size, seed=seed * 1000 + epoch)
            remaining = total_batches - done_batches
            order = order[:remaining]
            # Each process takes its share of the epoch's batches (data parallel under `accelerate launch`).
            mine = order[accelerator.process_index :: accelerator.num_processes]
            sums: dict[str, float] = {}
            for i, idx in enumerate(mine):
                batch = to_torch(data.collate(idx), accelerator.device)
                with accelerator.accumulate(model):
                    loss, logs = loss_fn(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                logs = {"loss": float(loss.detach()), **logs}
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.advance(accelerator.num_processes, loss=sums["loss"] / (i + 1))
            done_batches += len(order)
            result.epochs_run.append(epoch + 1)
            result.history.append({"epoch": epoch + 1, **{k: v / max(1, len(mine)) for k, v in sums.items()}})
            _save_checkpoint(accelerator, ckpt_root, epoch + 1, result.history)
            if stop_after_epochs is not None and len(result.epochs_run) >= stop_after_epochs:
                break
    result.steps = done_batches
    result.seconds = time.perf_counter() - t0
    # Drop the mixed-precision forward wrapper, so the trained model behaves like a loaded one.
    accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    return result


def _save_checkpoint(accelerator, root: Path, epoch: int, history: list[dict[str, float]]) -> None:
    """Write epoch-N atomically (a temporary folder renamed once every process has written its part),
    then drop older epochs: only the latest is needed to resume."""
    tmp = root / f".epoch-{epoch}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / "edgekd_state.json", json.dumps({"epoch": epoch, "history": history}))
        final = root / f"epoch-{epoch}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for p in root.glob("epoch-*"):
            if p.name != final.name:
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.inference_mode()
def predict(
    model: nn.Module,
    data: TokenizedSplit,
    batch_size: int,
    description: str,
    precision: str = "fp32",
    outputs: Callable[[Any], torch.Tensor] = lambda out: out.logits,
) -> np.ndarray:
    """Logits for every example of ``data``, in the split's order (batches sorted by length)."""
    device = next(model.parameters()).device
    model.eval()
    mixed = resolve_precision(precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    result: np.ndarray | None = None
    batches = data.eval_batches(batch_size)
    with progress_bar(description, total=len(data)) as bar:
        for idx in batches:
            batch = to_torch(data.collate(idx), device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = outputs(out).float().cpu().numpy()
            if result is None:
                result = np.zeros((len(data), *logits.shape[1:]), dtype=np.float32)
            result[idx] = logits
            bar.advance(len(idx))
    assert result is not None
    return result
