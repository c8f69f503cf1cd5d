"""Method ``channels``: remove conv/linear channels of a CNN through torch-pruning.

torch-pruning traces the model on ``PruneContext.example_inputs`` into a dependency graph, so a
channel removed from one layer is removed from every layer coupled to it (batch norm, the next
layer's inputs, residual additions). A fresh pruner is built at every step because the model
changes between steps (recovery training in between).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgekd.errors import MissingBackendError, StageError
from edgekd.pruning.base import PruneContext, StepGoal, count_params, register, taylor_batches
from edgekd.pruning.scoring import _to, default_loss
from edgekd.recipe import PruneConfig

# Increments of one step towards a parameter budget: the pruner's ratio grows by
# max_channel_ratio / BUDGET_INCREMENTS at a time until the budget is met.
BUDGET_INCREMENTS = 20


def _tp():
    try:
        import torch_pruning
    except ImportError as e:
        raise MissingBackendError("Channel pruning", "torch-pruning", "prune", str(e)) from None
    return torch_pruning


def _channel_layers(model: nn.Module) -> dict[str, int]:
    return {
        name: (m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    }


@register("channels")
class Channels:
    def __init__(self, model: nn.Module, cfg: PruneConfig, ctx: PruneContext):
        self.tp = _tp()
        if ctx.example_inputs is None:
            raise StageError("channel pruning traces the model: pass PruneContext.example_inputs")
        self.cfg, self.ctx = cfg, ctx
        self.batches = taylor_batches(cfg, ctx)

    def prunable_params(self, model: nn.Module) -> int:
        return count_params(model)

    def min_prunable_params(self, model: nn.Module) -> int:
        return 0  # depends on the dependency graph; an unmet budget is reported after the steps

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return {"channels": _channel_layers(model)}

    def _ignored(self, model: nn.Module) -> list[nn.Module]:
        if self.ctx.ignored_layers is not None:
            return list(self.ctx.ignored_layers)
        # The last Linear (or Conv) produces the model's outputs: its width is the number of classes.
        last = [m for m in model.modules() if isinstance(m, nn.Linear)] or [
            m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
        ]
        return last[-1:]

    def _pruner(self, model: nn.Module, ratio: float, steps: int):
        tp = self.tp
        importance = (tp.importance.GroupTaylorImportance() if self.cfg.importance == "taylor"
                      else tp.importance.GroupMagnitudeImportance(p=2))
        return tp.pruner.MetaPruner(
            model, self.ctx.example_inputs, importance=importance,
            global_pruning=self.cfg.scope == "global", pruning_ratio=ratio,
            max_pruning_ratio=self.cfg.max_channel_ratio, iterative_steps=steps,
            ignored_layers=self._ignored(model),
        )

    def _prune_once(self, model: nn.Module, pruner: Any) -> None:
        if self.batches is not None:
            # Taylor importance reads .grad of the weights; cleared afterwards so no state leaks.
            model.zero_grad(set_to_none=True)
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            with torch.enable_grad():
                for batch in self.batches:
                    (self.ctx.loss_fn or default_loss)(model, _to(batch, device)).backward()
            model.train(was_training)
        pruner.step()
        model.zero_grad(set_to_none=True)

    def step(self, model: nn.Module, goal: StepGoal) -> tuple[nn.Module, dict[str, Any]]:
        before = count_params(model)
        if goal.fraction is not None:
            self._prune_once(model, self._pruner(model, goal.fraction, 1))
        elif goal.param_budget is not None:
            pruner = self._pruner(model, self.cfg.max_channel_ratio, BUDGET_INCREMENTS)
            for _ in range(BUDGET_INCREMENTS):
                if count_params(model) <= goal.param_budget:
                    break
                self._prune_once(model, pruner)
        else:
            raise StageError("channel pruning takes prune.keep_params or prune.target_latency_ms")
        return model, {"removed": before - count_params(model), "params": count_params(model)}

    def finish(self, model: nn.Module) -> nn.Module:
        return model
