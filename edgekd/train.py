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

from edgekd.errors import StageError
from edgekd.progress import progress_bar
from edgekd.recipe import TrainConfig
from edgekd.runfolder import atomic_write_text
from edgekd.tasks.base import Split


def to_torch(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A numpy batch (a split's ``collate``) as tensors on ``device``."""
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 on x86 (read from /proc/cpuinfo), where bf16 autocast is a real speed-up."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def resolve_precision(precision: str) -> str:
    """Map the recipe's precision to Accelerate's mixed_precision ('no', 'bf16', 'fp16').

    Under ``accelerate launch`` (which sets ``ACCELERATE_MIXED_PRECISION`` from ``--mixed_precision`` or its
    config; so may a user), ``auto`` takes the launch's precision, and another precision named in the recipe
    or the call is an error naming both: Accelerate lets the argument win silently over the launch's."""
    import os

    launch = (os.environ.get("ACCELERATE_MIXED_PRECISION") or "").strip().lower() or None
    if precision == "auto" and launch in ("no", "bf16", "fp16"):
        return launch
    if precision == "fp32":
        mixed = "no"
    elif precision in ("bf16", "fp16"):
        mixed = precision
    elif torch.cuda.is_available():
        mixed = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        mixed = "bf16" if cpu_has_fast_bf16() else "no"
    if launch is not None and launch != mixed:
        said = {"no": "fp32"}.get(launch, launch)
        fix = (f"give precision '{said}' (runtime.precision, or distill's precision=), or 'auto' to take the "
               "launch's" if launch in ("no", "bf16", "fp16") else "edgekd trains in no, bf16 or fp16")
        raise StageError(f"precision '{precision}' trains in Accelerate's mixed precision '{mixed}', but "
                         f"ACCELERATE_MIXED_PRECISION is '{launch}' (accelerate launch --mixed_precision, or its "
                         f"config): {fix}; or launch with --mixed_precision {mixed}")
    return mixed


def init_process_state():
    """Start Accelerate's process state the way this machine needs, before anything else asks for it.

    Accelerate joins the processes of a launch (``LOCAL_RANK`` set by ``accelerate launch`` /
    torchrun) over gloo only when told to use the CPU; otherwise, on a machine without a GPU, each
    process believes it is alone and trains on the whole data. ``accelerate launch --cpu`` starts a
    single process unless mpirun is configured, so on a CPU-only machine the launch is
    ``accelerate launch --multi_gpu --num_processes N``, and this makes it the CPU data-parallel run.
    """
    import os

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not has_accelerator))


def make_accelerator(precision: str, grad_accum: int = 1):
    """Accelerate does the accumulation: ``accelerator.accumulate`` skips the all-reduce and the
    optimizer/scheduler steps until ``grad_accum`` batches (or the end of the data loader) are in."""
    from accelerate import Accelerator

    process = init_process_state()
    mixed = resolve_precision(precision)
    _accelerator_state_for(mixed, precision, process)
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=grad_accum)


def _accelerator_state_for(mixed: str, precision: str, process) -> None:
    """Make way for an Accelerator at ``mixed`` precision where an earlier training of this process set up
    Accelerate's state (a singleton) at another: Accelerate refuses to change it ("restart your runtime").

    In one process of its own (no distributed launch), the state is reset as Accelerate's own tests do between
    uses (``AcceleratorState._reset_state``; the process state, ``PartialState``, is kept), so that a later
    ``edgekd.distill`` or ``edgekd.run`` at another precision just trains. Under a distributed launch the
    processes' state is shared and is not torn down here: another precision is an error naming both."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is None or held == mixed:
        return
    if AcceleratorState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED:
        return  # DeepSpeed keeps its precision in its own config (Accelerate holds "no" and checks nothing)
    if process.use_distributed:
        as_recipe = {"no": "fp32"}.get(held, held)
        raise StageError(
            f"precision '{precision}' trains in Accelerate's mixed precision '{mixed}', but this distributed launch "
            f"({process.num_processes} processes) has already trained in '{held}' (precision '{as_recipe}'), and "
            "Accelerate's state cannot change within a launch: give precision "
            f"'{as_recipe}' (runtime.precision, or distill's precision=), or train at '{precision}' in a launch "
            "of its own")
    AcceleratorState._reset_state(reset_partial_state=False)


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch build has it for the parameters' device: one
    kernel per step instead of a loop over tensors (the optimizer step was a quarter of a CPU step)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


@dataclass
class TrainResult:
    steps: int  # batches trained on, over all processes
    epochs_run: list[int]
    resumed_from_epoch: int | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    optimizer_steps: int = 0  # optimizer updates made in this call (one per grad_accum batches per process)
    lrs: list[float] = field(default_factory=list)  # the learning rate of each of those updates
    ema_updates: int = 0  # updates the moving average of the weights (cfg.ema_decay) took in, resumed ones included


class EpochBatches:
    """One epoch's batches (lists of example indices) as a batch sampler.

    The order comes from ``data.train_batches`` seeded by the epoch alone, so a resumed run replays
    the same epochs. ``accelerator.prepare`` wraps it in Accelerate's batch shard: under several
    processes each takes every n-th batch and, with ``even_batches``, the last round is filled
    with batches from the start, so every process runs the same number of backward passes (an
    uneven count would leave one process waiting in an all-reduce the others never join).
    """

    def __init__(self, data: Any, batch_size: int, seed: int, total_batches: int):
        self.data, self.batch_size_, self.seed, self.total = data, batch_size, seed, total_batches
        self.per_epoch = math.ceil(len(data) / batch_size)
        self.epoch = 0

    def __len__(self) -> int:
        return max(0, min(self.per_epoch, self.total - self.epoch * self.per_epoch))

    def __iter__(self):
        order = self.data.train_batches(self.batch_size_, seed=self.seed * 1000 + self.epoch)
        for idx in order[: len(self)]:
            yield [int(i) for i in idx]


def optimizer_steps_planned(sampler: EpochBatches, n_epochs: int, grad_accum: int, num_processes: int) -> int:
    """Scheduler steps the whole run makes: Accelerate syncs every ``grad_accum`` batches and at
    the end of each epoch's loader, and steps a prepared scheduler ``num_processes`` times per
    optimizer step (its convention: the schedule is written for one process)."""
    total, epoch = 0, sampler.epoch
    for e in range(n_epochs):
        sampler.epoch = e
        per_process = math.ceil(len(sampler) / num_processes)
        total += math.ceil(per_process / grad_accum) * num_processes
    sampler.epoch = epoch
    return max(1, total)


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
    data: Split,
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
    (used by tests to simulate an interruption). ``cfg.batch_size`` is per process and per
    backward pass; one update sees ``batch_size x grad_accum x processes`` examples, and the
    learning-rate schedule is counted in those updates. With ``cfg.ema_decay`` the model ends with
    the exponential moving average of its weights over every update instead of the last ones.
    """
    import time

    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    set_seed(seed)
    accelerator = make_accelerator(precision, cfg.grad_accum)
    batches_per_epoch = math.ceil(len(data) / cfg.batch_size)
    n_epochs = math.ceil(cfg.epochs)
    total_batches = max(1, round(cfg.epochs * batches_per_epoch))
    sampler = EpochBatches(data, cfg.batch_size, seed, total_batches)
    total_steps = optimizer_steps_planned(sampler, n_epochs, cfg.grad_accum, accelerator.num_processes)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = list(extra_params or [])
    if extra:
        groups.append({"params": extra, "weight_decay": cfg.weight_decay})
    optimizer = _adamw(groups, cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    # The data set is just the example indices: the sampler picks them, data.collate builds the batch.
    loader = DataLoader(range(len(data)), batch_sampler=sampler,
                        collate_fn=lambda idx: to_torch(data.collate(np.asarray(idx, dtype=np.int64))))
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)

    ema = None
    if cfg.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # A copy of the weights, averaged after every update; checkpointed with the rest, so it must be
        # registered before a resume loads the state.
        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
        accelerator.register_for_checkpointing(ema)

    if extra:
        # Not part of the prepared model: their values are checkpointed beside it (a resumed run goes on
        # from them, not from fresh ones beside a restored optimizer state), and under several processes
        # their gradients are averaged as the model's are (below).
        accelerator.register_for_checkpointing(nn.ParameterList(extra))

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
            sampler.epoch = epoch
            sums: dict[str, float] = {}
            seen = 0
            # Accelerate divides every loss by grad_accum and syncs at the end of the loader too, so an epoch
            # whose batches are not a multiple of grad_accum ends on a shorter window: its losses are scaled
            # back up, so that every update is the mean over the batches it holds (not k/grad_accum of one).
            in_epoch = len(loader)
            short = in_epoch % cfg.grad_accum
            tail_from = in_epoch - short if short else in_epoch
            for i, batch in enumerate(loader):
                with accelerator.accumulate(model):
                    loss, logs = loss_fn(model, batch)
                    # backward divides by grad_accum itself
                    accelerator.backward(loss * (cfg.grad_accum / short) if i >= tail_from else loss)
                    if extra and accelerator.sync_gradients and accelerator.num_processes > 1:
                        _average_gradients(accelerator, extra)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        result.optimizer_steps += 1
                        result.lrs.append(float(optimizer.param_groups[0]["lr"]))
                    # Prepared optimizer and scheduler step only when gradients were synchronised.
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None and accelerator.sync_gradients:
                        ema.update_parameters(accelerator.unwrap_model(model))
                seen += 1
                logs = {"loss": float(loss.detach()), **logs}
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.advance(accelerator.num_processes, loss=sums["loss"] / seen)
            done_batches += len(sampler)
            result.epochs_run.append(epoch + 1)
            if accelerator.num_processes > 1:  # the epoch's mean over every process's batches, not the main one's
                keys = sorted(sums)
                total = accelerator.reduce(torch.tensor([*(sums[k] for k in keys), float(seen)]), reduction="sum")
                sums, seen = {k: float(v) for k, v in zip(keys, total[:-1], strict=True)}, int(total[-1])
            result.history.append({"epoch": epoch + 1, **{k: v / max(1, seen) for k, v in sums.items()}})
            _save_checkpoint(accelerator, ckpt_root, epoch + 1, result.history)
            if stop_after_epochs is not None and len(result.epochs_run) >= stop_after_epochs:
                break
    result.steps = done_batches
    result.seconds = time.perf_counter() - t0
    if ema is not None and int(ema.n_averaged) > 0:
        with torch.no_grad():
            for p, avg in zip(accelerator.unwrap_model(model).parameters(), ema.module.parameters(), strict=True):
                p.copy_(avg)
        result.ema_updates = int(ema.n_averaged)
    # Drop the mixed-precision forward wrapper, so the trained model behaves like a loaded one.
    accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    # Hand the loader back: Accelerate keeps a reference to every prepared loader otherwise.
    accelerator.free_memory()
    return result


def _average_gradients(accelerator, params: list[nn.Parameter]) -> None:
    """The mean over processes of each parameter's gradient, as DDP gives the prepared model's (every
    process calls this for every parameter, a missing gradient counting as zeros, so none waits alone)."""
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        p.grad = accelerator.reduce(grad, reduction="mean")


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
    data: Split,
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
