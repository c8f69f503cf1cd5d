"""Method ``unstructured``: zero the smallest weights (L1 magnitude) of every Linear/Conv layer.

``prune.scope`` per_layer (the default) takes the same share of every layer's weights; global ranks
every layer's weights together, so layers end with different sparsities.

Weight shapes do not change, so a dense runtime (ONNX Runtime, PyTorch) runs exactly as fast as
before; what shrinks is the compressed file, which the metrics measure with gzip. Masks stay in
place (``torch.nn.utils.prune``) while the caller's recovery trains, so zeros stay zero, and are
folded into the weights by ``finish``. Embeddings are left dense.
"""

from __future__ import annotations

import gzip
import io
import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from edgekd.errors import StageError
from edgekd.pruning.base import PruneContext, StepGoal, register
from edgekd.recipe import PruneConfig

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def _masked(m: nn.Module, name: str) -> int:
    """Weights of ``m.name`` already masked by an earlier step."""
    mask = getattr(m, name + "_mask", None)
    return int((mask == 0).sum()) if mask is not None else 0


def weight_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero entries over every Linear/Conv weight (masks applied)."""
    zeros = total = 0
    for m, name in _targets(model):
        w = getattr(m, name)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def gzip_bytes(model: nn.Module) -> int:
    """Size of the gzip-compressed weights (masks folded in), the size an unstructured model ships at."""
    state = {}
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if pname.endswith("_orig"):
                pname = pname[: -len("_orig")]
                p = getattr(mod, pname)
            state[f"{name}.{pname}" if name else pname] = p.detach().cpu()
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(gzip.compress(buf.getvalue(), compresslevel=6))


@register("unstructured")
class Unstructured:
    importance = "magnitude"  # what ranks the weights, whatever prune.importance says (recorded in the metrics)

    def __init__(self, model: nn.Module, cfg: PruneConfig, ctx: PruneContext):
        if not _targets(model):
            raise StageError(f"{type(model).__name__} has no Linear or Conv layer to prune")
        self.cfg = cfg

    def prunable_params(self, model: nn.Module) -> int:
        return sum(getattr(m, n).numel() for m, n in _targets(model))

    def min_prunable_params(self, model: nn.Module) -> int:
        return 0

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return {"sparsity": round(weight_sparsity(model), 6), "gzip_bytes": gzip_bytes(model)}

    def step(self, model: nn.Module, goal: StepGoal) -> tuple[nn.Module, dict[str, Any]]:
        if goal.sparsity is None:
            raise StageError("unstructured pruning steps towards prune.sparsity")
        targets = _targets(model)
        # An integer amount counts weights among those not yet masked, as PruningContainer applies it.
        if self.cfg.scope == "global":
            # one ranking over every layer's weights: layers end with different sparsities
            amount = max(0, math.ceil(goal.sparsity * sum(getattr(m, n).numel() for m, n in targets))
                         - sum(_masked(m, n) for m, n in targets))
            if amount:
                prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        else:
            # per_layer: each layer loses the same share of its own weights, its smallest first
            amount = 0
            for m, n in targets:
                k = max(0, math.ceil(goal.sparsity * getattr(m, n).numel()) - _masked(m, n))
                if k:
                    prune.l1_unstructured(m, n, amount=k)
                    amount += k
        return model, {"removed": amount, "sparsity": round(weight_sparsity(model), 6)}

    def finish(self, model: nn.Module) -> nn.Module:
        for m, n in _targets(model):
            if prune.is_pruned(m) and hasattr(m, n + "_orig"):
                prune.remove(m, n)
        return model
