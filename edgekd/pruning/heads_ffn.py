"""Method ``heads-ffn``: remove attention heads and FFN neurons of an encoder (families: edgekd.encoders).

Heads of a family whose description says ``head_removal: uniform`` (MPNet) are chosen the same in
every layer whatever ``prune.scope``: each head index is ranked by its importance normalised per
layer and summed over the layers, and a count of heads (``remove_heads``) is rounded up to whole
head indices (a multiple of the layer count). FFN neurons follow ``prune.scope`` as usual.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from edgekd.errors import RecipeError, StageError
from edgekd.pruning import hidden, selection
from edgekd.pruning.base import PruneContext, StepGoal, register, taylor_batches
from edgekd.pruning.encoder import Encoder
from edgekd.pruning.scoring import default_loss, magnitude_scores, normalise_per_layer, taylor_scores
from edgekd.recipe import PruneConfig


@register("heads-ffn")
class HeadsFFN:
    def __init__(self, model: nn.Module, cfg: PruneConfig, ctx: PruneContext):
        enc = Encoder(model)
        if cfg.prune_heads and enc.layout.head_removal == "none":
            raise RecipeError([f"prune.prune_heads: {enc.layout.no_head_removal_why}"])
        self.cfg, self.ctx = cfg, ctx
        self.uniform_heads = enc.layout.heads_uniform
        self.head_floor = [min(cfg.min_heads_per_layer, h) for h in enc.heads()]
        self.neuron_floor = [min(n, max(1, math.ceil(cfg.min_neurons_fraction * n))) for n in enc.neurons()]
        self.batches = taylor_batches(cfg, ctx)
        if cfg.hidden_size is not None:
            why = hidden.why_not(model)
            if why:
                raise RecipeError([why])
            if cfg.hidden_size >= hidden.width(model):
                raise RecipeError([f"prune.hidden_size {cfg.hidden_size}: the residual stream is "
                                   f"{hidden.width(model)} wide already; give a smaller width or leave it unset"])
            heads_may_go = cfg.prune_heads and (cfg.keep_params is not None or cfg.remove_heads is not None)
            try:  # what no head removal can mend is refused before anything changes
                hidden.check_width(model, cfg.hidden_size, self.head_floor if heads_may_go else None)
            except StageError as e:
                raise RecipeError([str(e)]) from e

    # --- figures ------------------------------------------------------------------------------
    def prunable_params(self, model: nn.Module) -> int:
        return Encoder(model).layer_params()

    def min_prunable_params(self, model: nn.Module) -> int:
        enc = Encoder(model)
        removable = 0
        for i, (h, n) in enumerate(zip(enc.heads(), enc.neurons(), strict=True)):
            if self.cfg.prune_heads:
                removable += (h - self.head_floor[i]) * enc.head_cost(i)
            if self.cfg.prune_neurons:
                removable += (n - self.neuron_floor[i]) * enc.neuron_cost(i)
        return enc.layer_params() - removable

    def describe(self, model: nn.Module) -> dict[str, Any]:
        enc = Encoder(model)
        out = {"heads_per_layer": enc.heads(), "neurons_per_layer": enc.neurons(),
               "encoder_params": enc.layer_params()}
        if self.cfg.hidden_size is not None:
            out["hidden_size"] = hidden.width(model)
        return out

    # --- one step -----------------------------------------------------------------------------
    def _scores(self, enc: Encoder) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.cfg.importance in ("taylor", "fisher"):
            return taylor_scores(enc, self.batches or [], self.ctx.loss_fn,
                                 per_example=self.cfg.importance == "fisher")
        return magnitude_scores(enc)

    def _fraction_for_budget(self, enc: Encoder, budget: int) -> float:
        excess = enc.layer_params() - budget
        if excess <= 0:
            return 0.0
        pool = 0
        for i, (h, n) in enumerate(zip(enc.heads(), enc.neurons(), strict=True)):
            pool += h * enc.head_cost(i) if self.cfg.prune_heads else 0
            pool += n * enc.neuron_cost(i) if self.cfg.prune_neurons else 0
        return min(1.0, excess / pool) if pool else 0.0

    def _choose(self, scores: list[torch.Tensor], sizes: list[int], floor: list[int],
                count: int | None, fraction: float | None, search: bool = False) -> dict[int, list[int]]:
        """``search``: a round of the latency or accuracy search, which removes at least one unit where
        there is room (``selection.counts_for_fraction``)."""
        capacity = [max(0, n - f) for n, f in zip(sizes, floor, strict=True)]
        if self.cfg.scope == "global":
            total = count if count is not None else round((fraction or 0.0) * sum(sizes))
            if search and fraction and sum(capacity):
                total = max(total, 1)
            return selection.lowest_global(normalise_per_layer(scores), total, capacity)
        if count is not None:
            counts = selection.spread(count, capacity)
        else:
            counts = selection.counts_for_fraction(fraction or 0.0, sizes, capacity, at_least_one=search)
        return selection.lowest_per_layer(scores, counts)

    def _choose_uniform(self, scores: list[torch.Tensor], sizes: list[int], floor: list[int],
                        count: int | None, fraction: float | None, search: bool = False) -> dict[int, list[int]]:
        """The same head indices in every layer (see the module doc)."""
        if len(set(sizes)) != 1:
            raise StageError(f"heads per layer {sizes} differ, but this family's heads can only be removed "
                             "uniformly: the model was not pruned by edgekd, or its config was edited")
        per_layer = min(max(0, n - f) for n, f in zip(sizes, floor, strict=True))
        k = math.ceil(count / len(sizes)) if count is not None else round((fraction or 0.0) * sizes[0])
        if search and fraction:
            k = max(k, 1)
        return selection.lowest_uniform(normalise_per_layer(scores), min(k, per_layer))

    def step(self, model: nn.Module, goal: StepGoal) -> tuple[nn.Module, dict[str, Any]]:
        enc = Encoder(model)
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        heads, neurons = enc.heads(), enc.neurons()
        fraction = goal.fraction
        if goal.param_budget is not None:
            fraction = self._fraction_for_budget(enc, goal.param_budget)
        head_scores, neuron_scores = self._scores(enc)
        drop_heads: dict[int, list[int]] = {}
        drop_neurons: dict[int, list[int]] = {}
        search = goal.fraction is not None  # a search round (prune.latency_step), not a parameter budget
        if self.cfg.prune_heads and (goal.heads or fraction):
            choose = self._choose_uniform if self.uniform_heads else self._choose
            drop_heads = choose(head_scores, heads, self.head_floor, goal.heads, fraction, search)
        if self.cfg.prune_neurons and (goal.neurons or fraction):
            drop_neurons = self._choose(neuron_scores, neurons, self.neuron_floor, goal.neurons, fraction, search)
        if self.cfg.hidden_size is not None and hidden.width(model) > self.cfg.hidden_size:
            # the heads this step leaves must fit the narrowed width: checked before anything is removed
            hidden.check_width(model, self.cfg.hidden_size,
                               [h - len(drop_heads.get(i, [])) for i, h in enumerate(heads)])
        # Neurons first: removing heads rebuilds the attention linears but leaves the FFN alone,
        # and the indices of both were computed on the model as it is now.
        enc.remove_neurons(drop_neurons)
        removed_heads = enc.remove_heads(drop_heads)
        _keep_precision(model, dtypes)
        n_heads = sum(len(v) for v in drop_heads.values())
        n_neurons = sum(len(v) for v in drop_neurons.values())
        narrowed = self._narrow(model)
        _keep_precision(model, dtypes)
        return model, {
            **narrowed,
            "removed": n_heads + n_neurons,
            "removed_heads": n_heads,
            "removed_neurons": n_neurons,
            "removed_head_ids": {str(k): v for k, v in removed_heads.items()},
            "removed_neurons_per_layer": [len(drop_neurons.get(i, [])) for i in range(len(neurons))],
        }

    def _narrow(self, model: nn.Module) -> dict[str, Any]:
        """prune.hidden_size: remove the least important residual dimensions (edgekd.pruning.hidden)."""
        target = self.cfg.hidden_size
        if target is None or hidden.width(model) <= target:
            return {}
        if self.cfg.importance in ("taylor", "fisher"):
            scores = hidden.taylor_scores(model, self.batches or [], self.ctx.loss_fn or default_loss,
                                          per_example=self.cfg.importance == "fisher")
        else:
            scores = hidden.magnitude_scores(model)
        before = hidden.width(model)
        keep = sorted(torch.topk(scores, target).indices.tolist())
        hidden.remove_hidden(model, keep)  # checks the width first
        kept = set(keep)
        return {"hidden_size": {"before": before, "after": target,
                                "removed_dims": [i for i in range(before) if i not in kept]}}

    def finish(self, model: nn.Module) -> nn.Module:
        return model


def _keep_precision(model: nn.Module, dtypes: set[torch.dtype]) -> None:
    """transformers' ``prune_linear_layer`` builds float32 layers: a model that was all one floating
    precision (bf16, fp16) is put back in it, so it runs and is scored as it came."""
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
            model.to(dtype)
