"""Method ``channels``: remove conv/linear channels of a CNN through torch-pruning.

torch-pruning traces the model on ``PruneContext.example_inputs`` into a dependency graph, so a
channel removed from one layer is removed from every layer coupled to it (batch norm, the next
layer's inputs, residual additions). A fresh pruner is built at every step because the model
changes between steps (recovery training in between).

``prune.max_channel_ratio`` caps what pruning may remove from a layer over the whole stage, counted
against the layer's ORIGINAL width (recorded when the method is built, per module name): every conv
or linear layer keeps at least ``ceil((1 - max_channel_ratio) * original)`` output channels, and at
least 1. torch-pruning's own ``max_pruning_ratio`` counts from the widths the pruner is built on, so
a pruner built at every step would let a layer shrink by that share again and again; each group the
pruner proposes is therefore trimmed here (its least important channels kept in the proposal) so no
layer in it passes its floor, or skipped when it cannot be trimmed safely.
"""

from __future__ import annotations

import math
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


def _width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features


def _channel_layers(model: nn.Module) -> dict[str, int]:
    return {name: _width(m) for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)}


def min_channels(original: int, max_channel_ratio: float) -> int:
    """The fewest output channels a layer of ``original`` channels keeps under ``max_channel_ratio``:
    ceil((1 - ratio) * original), at least 1 (the epsilon absorbs float error, e.g. 40 * 0.5)."""
    return max(1, math.ceil(original * (1 - max_channel_ratio) - 1e-9))


@register("channels")
class Channels:
    def __init__(self, model: nn.Module, cfg: PruneConfig, ctx: PruneContext):
        self.tp = _tp()
        if ctx.example_inputs is None:
            raise StageError("channel pruning traces the model: pass PruneContext.example_inputs")
        self.cfg, self.ctx = cfg, ctx
        self.batches = taylor_batches(cfg, ctx)
        # The cap of prune.max_channel_ratio counts from these widths, whatever the steps do after.
        self.original = _channel_layers(model)
        self.held_back = 0  # groups the cap trimmed or skipped in the current step

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
        names = {m: n for n, m in model.named_modules()}
        for group in pruner.step(interactive=True):
            group = self._within_cap(pruner, group, names)
            if group is not None:
                group.prune()
        model.zero_grad(set_to_none=True)

    def _room(self, pruner: Any, group: Any, names: dict[nn.Module, str]) -> int:
        """How many of the group's root channels may go without any layer in it passing its floor."""
        removed: dict[nn.Module, int] = {}
        for dep, idxs in group:
            m = dep.target.module
            if names.get(m) in self.original and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                removed[m] = max(removed.get(m, 0), len(idxs))
        k = len(group[0].idxs)
        room = k
        for m, n in removed.items():
            left = _width(m) - min_channels(self.original[names[m]], self.cfg.max_channel_ratio)
            if n > left:
                room = min(room, max(left, 0) * k // n)
        return room

    def _within_cap(self, pruner: Any, group: Any, names: dict[nn.Module, str]) -> Any:
        """``group`` itself, a copy trimmed to what prune.max_channel_ratio still allows, or None."""
        room = self._room(pruner, group, names)
        if room >= len(group[0].idxs):
            return group
        self.held_back += 1
        if room <= 0 or pruner._get_channel_groups(group) > 1:
            return None  # grouped channels (group conv, group norm) are not trimmed: the group waits
        root, handler = group[0].dep.target.module, group[0].dep.handler
        dg = pruner.DG
        width = dg.get_out_channels(root) if dg.is_out_channel_pruning_fn(handler) else dg.get_in_channels(root)
        try:
            imp = pruner.estimate_importance(dg.get_pruning_group(root, handler, list(range(width))))
        except Exception:  # noqa: BLE001 - an importance that cannot score the group: skip it, never overshoot
            imp = None
        if imp is None or len(imp) != width:
            return None
        keep = sorted(sorted((int(i) for i in group[0].idxs), key=lambda i: float(imp[i]))[:room])
        trimmed = dg.get_pruning_group(root, handler, keep)
        if not dg.check_pruning_group(trimmed) or self._room(pruner, trimmed, names) < len(keep):
            return None
        return trimmed

    def step(self, model: nn.Module, goal: StepGoal) -> tuple[nn.Module, dict[str, Any]]:
        before = count_params(model)
        self.held_back = 0
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
        info: dict[str, Any] = {"removed": before - count_params(model), "params": count_params(model)}
        if self.held_back:
            info["held_back_by_max_channel_ratio"] = self.held_back
            if info["removed"] == 0:
                r = self.cfg.max_channel_ratio
                info["nothing_left"] = (
                    f"nothing left to remove within prune.max_channel_ratio={r}: every layer the step would "
                    f"shrink has already lost the most of its original channels that the cap allows (it keeps "
                    f"at least ceil({1 - r:g} x its original width)); raise prune.max_channel_ratio to prune further"
                )
        return model, info

    def finish(self, model: nn.Module) -> nn.Module:
        return model
