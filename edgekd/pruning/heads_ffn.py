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
        self.head_floor, self.neuron_floor = floors(enc, cfg)
        self.batches = taylor_batches(cfg, ctx)
        if cfg.hidden_size is not None:
            why = hidden.why_not(model)
            if why:
                raise RecipeError([why])
            if cfg.hidden_size >= hidden.width(model):
                raise RecipeError([f"prune.hidden_size {cfg.hidden_size}: the residual stream is "
                                   f"{hidden.width(model)} wide already; give a smaller width or leave it unset"])
            # a width, or heads the target's step would leave over it, refused before anything changes
            problem = config_problem(model.config, cfg, enc)
            if problem:
                raise RecipeError([problem])

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

    def _choose(self, scores: list[torch.Tensor], sizes: list[int], floor: list[int],
                count: int | None, fraction: float | None, search: bool = False) -> dict[int, list[int]]:
        """``search``: a round of the latency or accuracy search, which removes at least one unit where
        there is room (``selection.counts_for_fraction``)."""
        if self.cfg.scope == "global":
            total = global_total(sizes, floor, count, fraction, search)
            return selection.lowest_global(normalise_per_layer(scores), total, _capacity(sizes, floor))
        return selection.lowest_per_layer(scores, per_layer_counts(sizes, floor, count, fraction, search))

    def _choose_uniform(self, scores: list[torch.Tensor], sizes: list[int], floor: list[int],
                        count: int | None, fraction: float | None, search: bool = False) -> dict[int, list[int]]:
        """The same head indices in every layer (see the module doc)."""
        return selection.lowest_uniform(normalise_per_layer(scores),
                                        uniform_count(sizes, floor, count, fraction, search))

    def step(self, model: nn.Module, goal: StepGoal) -> tuple[nn.Module, dict[str, Any]]:
        enc = Encoder(model)
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        heads, neurons = enc.heads(), enc.neurons()
        fraction = step_fraction(enc, self.cfg, goal)
        head_scores, neuron_scores = self._scores(enc)
        drop_heads: dict[int, list[int]] = {}
        drop_neurons: dict[int, list[int]] = {}
        search = goal.fraction is not None  # a search round (prune.latency_step), not a parameter budget
        if heads_go(self.cfg, goal, fraction):
            choose = self._choose_uniform if self.uniform_heads else self._choose
            drop_heads = choose(head_scores, heads, self.head_floor, goal.heads, fraction, search)
        if self.cfg.prune_neurons and (goal.neurons or fraction):
            drop_neurons = self._choose(neuron_scores, neurons, self.neuron_floor, goal.neurons, fraction, search)
        if self.cfg.hidden_size is not None and hidden.width(model) > self.cfg.hidden_size:
            # the heads this step leaves must fit the narrowed width: checked before anything is removed (the
            # constructor checked what the target leaves; with scope global, importance picks the layers)
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


# --- what a step removes, before any scoring --------------------------------------------------------
# The step and the up-front check of prune.hidden_size (``heads_left``; plan_problem below)
# count with these same functions.

def floors(enc: Encoder, cfg: PruneConfig) -> tuple[list[int], list[int]]:
    """What every layer keeps at least: heads (prune.min_heads_per_layer) and FFN neurons
    (prune.min_neurons_fraction of the layer's neurons now, at least one)."""
    heads = [min(cfg.min_heads_per_layer, h) for h in enc.heads()]
    neurons = [min(n, max(1, math.ceil(cfg.min_neurons_fraction * n))) for n in enc.neurons()]
    return heads, neurons


def fraction_for_budget(enc: Encoder, budget: int, prune_heads: bool, prune_neurons: bool) -> float:
    """The share of the removable heads and neurons whose removal brings the layers to ``budget`` parameters."""
    excess = enc.layer_params() - budget
    if excess <= 0:
        return 0.0
    pool = 0
    for i, (h, n) in enumerate(zip(enc.heads(), enc.neurons(), strict=True)):
        pool += h * enc.head_cost(i) if prune_heads else 0
        pool += n * enc.neuron_cost(i) if prune_neurons else 0
    return min(1.0, excess / pool) if pool else 0.0


def step_fraction(enc: Encoder, cfg: PruneConfig, goal: StepGoal) -> float | None:
    """The share a step towards ``goal`` removes: a search round's, or the one a parameter budget asks for."""
    if goal.param_budget is not None:
        return fraction_for_budget(enc, goal.param_budget, cfg.prune_heads, cfg.prune_neurons)
    return goal.fraction


def heads_go(cfg: PruneConfig, goal: StepGoal, fraction: float | None) -> bool:
    """Whether a step towards ``goal`` (at ``fraction``, see ``step_fraction``) removes heads at all."""
    return bool(cfg.prune_heads and (goal.heads or fraction))


def _capacity(sizes: list[int], floor: list[int]) -> list[int]:
    return [max(0, n - f) for n, f in zip(sizes, floor, strict=True)]


def per_layer_counts(sizes: list[int], floor: list[int], count: int | None, fraction: float | None,
                     search: bool = False) -> list[int]:
    """scope per_layer: the units each layer loses (a count spread evenly, or a share of each layer)."""
    capacity = _capacity(sizes, floor)
    if count is not None:
        return selection.spread(count, capacity)
    return selection.counts_for_fraction(fraction or 0.0, sizes, capacity, at_least_one=search)


def global_total(sizes: list[int], floor: list[int], count: int | None, fraction: float | None,
                 search: bool = False) -> int:
    """scope global: the units removed across the layers (which layers lose them, importance decides)."""
    total = count if count is not None else round((fraction or 0.0) * sum(sizes))
    if search and fraction and sum(_capacity(sizes, floor)):
        total = max(total, 1)
    return total


def uniform_count(sizes: list[int], floor: list[int], count: int | None, fraction: float | None,
                  search: bool = False) -> int:
    """Heads removed uniformly (see the module doc): how many head indices every layer loses."""
    if len(set(sizes)) != 1:
        raise StageError(f"heads per layer {sizes} differ, but this family's heads can only be removed "
                         "uniformly: the model was not pruned by edgekd, or its config was edited")
    per_layer = min(_capacity(sizes, floor))
    k = math.ceil(count / len(sizes)) if count is not None else round((fraction or 0.0) * sizes[0])
    if search and fraction:
        k = max(k, 1)
    return min(k, per_layer)


def heads_left(enc: Encoder, cfg: PruneConfig, goal: StepGoal) -> tuple[list[int], bool]:
    """The heads per layer a step towards ``goal`` leaves, counted as the step counts before it scores
    anything, and whether that is exact. scope per_layer and uniform head removal: exact. scope global:
    importance chooses the layers, so this is the fewest the fullest layer can keep (the step's total taken
    from the fullest layers first, within the floors): no choice leaves fewer, the one made may leave more."""
    heads = enc.heads()
    fraction = step_fraction(enc, cfg, goal)
    if not heads_go(cfg, goal, fraction):
        return heads, True
    floor = floors(enc, cfg)[0]
    search = goal.fraction is not None
    if enc.layout.heads_uniform:
        k = uniform_count(heads, floor, goal.heads, fraction, search)
        return [h - k for h in heads], True
    if cfg.scope == "global":
        left = list(heads)
        for _ in range(global_total(heads, floor, goal.heads, fraction, search)):
            open_layers = [i for i in range(len(left)) if left[i] > floor[i]]
            if not open_layers:
                break
            fullest = max(open_layers, key=lambda i: (left[i], -i))
            left[fullest] -= 1
        return left, False
    return [h - c for h, c in zip(heads, per_layer_counts(heads, floor, goal.heads, fraction, search),
                                  strict=True)], True


# --- prune.hidden_size against the heads the step leaves, before any training ----------------------

def config_problem(config: Any, cfg: PruneConfig, enc: Any = None) -> str | None:
    """What ``cfg.hidden_size`` cannot be for a model of ``config`` (the checks a recipe can get before any
    training: the family, an ELECTRA embedding projection, the width against the head size, and the heads the
    target's step leaves, see ``plan_problem``, on ``enc`` where the model is at hand)."""
    new = cfg.hidden_size
    projects = getattr(config, "embedding_size", None) not in (None, getattr(config, "hidden_size", None))
    problem = hidden.family_problem(config, projects)
    if problem:
        return problem
    old, n_heads = int(config.hidden_size), int(config.num_attention_heads)
    head = old // n_heads
    problem = hidden.width_problem(new, old, head, config.model_type)
    if problem:
        return problem
    return plan_problem(config, cfg, enc)


def plan_problem(config: Any, cfg: PruneConfig, enc: Any = None) -> str | None:
    """Whether the heads that the step towards ``cfg``'s fixed target leaves fit in ``cfg.hidden_size``, counted
    as the step counts them (:func:`heads_left`) on ``enc`` (an Encoder; default: the
    structure ``config`` describes, built without weights), before any training. scope per_layer: the heads
    each layer keeps are known from the target. scope global: importance chooses the layers, known only
    once the stage scores the model; here a width no choice can fit is refused, and the stage checks the
    layers it chose before it removes anything."""
    from edgekd.pruning.stage import fixed_goals

    new = cfg.hidden_size
    enc = enc if enc is not None else Encoder(skeleton(config))
    head = int(config.hidden_size) // int(config.num_attention_heads)
    now = enc.heads()
    left, exact = heads_left(enc, cfg, fixed_goals(cfg, enc.layer_params())[0])
    room = f"prune.hidden_size {new} leaves room for {new // head} heads of {head}"
    if max(left) <= new // head:
        return None
    if left == now:
        return (f"{room}, but no head is removed (prune.prune_heads is false, or the target or "
                f"prune.min_heads_per_layer lets none go) and a layer keeps {max(now)}: set prune.keep_params or "
                f"remove_heads with prune.prune_heads, or leave hidden_size unset")
    fix = (f"remove more heads (a lower prune.keep_params or a larger prune.remove_heads, with prune.prune_heads and "
           f"a prune.min_heads_per_layer that lets them go) or keep hidden_size at least {max(left) * head}")
    if exact:
        return (f"{room} (hidden_size / num_attention_heads), but a layer would keep {max(left)} after the "
                f"target's step (heads per layer: {now} -> {left}): {fix}")
    gone = sum(now) - sum(left)
    return (f"{room} (hidden_size / num_attention_heads), but a layer would keep {max(left)} at least: with "
            f"prune.scope global, importance chooses which layers lose the {gone} head{'s' * (gone != 1)} the target "
            f"removes, and even taken from the fullest layers first they leave {left} (heads per layer now: {now}): "
            f"{fix}")


def skeleton(config: Any) -> nn.Module:
    """The encoder ``config`` describes, its parameters on the meta device (no memory, no initialisation): the
    layers' heads (removed through Hugging Face, ``pruned_heads``) and FFN widths (``ffn_sizes_per_layer``)
    as the stage will find them."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModel

    from edgekd.pruning.encoder import shape_from_config

    with init_empty_weights():
        model = AutoModel.from_config(copy.deepcopy(config))
        shape_from_config(model, model.config, "the model the config describes")
    return model
