"""The residual width (``hidden_size``) of a BERT-layout encoder: score every dimension, remove some for real.

Heads and FFN neurons leave the residual stream as wide as it was: every LayerNorm, residual add,
embedding row and projection input still runs over all ``hidden_size`` dimensions. Removing
dimensions of that stream shrinks all of them at once (CoFi, Xia et al. 2022, "Structured Pruning
Learns Compact and Accurate Models", prunes the same "hidden dimension" across every layer).

Importance (``taylor``/``fisher``): one mask of ones over the hidden dimensions is multiplied into the
output of every LayerNorm of the residual stream (the embeddings' and each block's two), so it reaches
every place the stream is read; ``|dL/d mask|`` is summed over the scoring batches (``fisher``: each
text's own gradient squared, as for heads). ``magnitude``: the L2 norm of the LayerNorm scales and
shifts of the dimension together with its embedding columns. Removing a dimension also changes the
remaining ones' LayerNorm statistics (the mean and variance run over fewer values); the recovery that
follows pruning trains that in.

What is sliced: the word, position and token-type embedding columns and the embeddings' LayerNorm;
in every block the query/key/value and first-FFN input columns, the attention-output and second-FFN
output rows and both LayerNorms; the pooler (rows and columns) and the classification head's first
linear (columns; a ``classifier.dense`` both, then ``classifier.out_proj`` columns). Families: BERT
(MiniLM), RoBERTa, XLM-R, ELECTRA without an embedding projection; others are refused, naming why.

The config gets ``hidden_size`` = the new width. Hugging Face builds BERT-layout attention with
``head size = hidden_size / num_attention_heads``, so ``num_attention_heads`` becomes the new width over
the head size, and each layer's ``pruned_heads`` lists the slots above the heads it keeps: the folder
reloads with plain ``from_pretrained`` to the same weights (the original head ids of earlier removals
stay in the prune stage's record, not in the config).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from edgekd.encoders import blocks, family_of
from edgekd.encoders import get as _get
from edgekd.errors import StageError
from edgekd.pruning.scoring import mask_scores, per_row

HIDDEN_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra")
_BLOCK_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
_BLOCK_IN = ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense")
_BLOCK_OUT = ("attention.output.dense", "output.dense")
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")
# Task heads outside the encoder: linear -> (slice its input columns, slice its output rows)
_HEADS = {"classifier": (True, False), "classifier.dense": (True, True), "classifier.out_proj": (True, False)}


def family_problem(model_or_config: Any, projects_embeddings: bool) -> str | None:
    """The family checks shared by a model and a config: a BERT-layout family, embeddings as wide as the stream."""
    try:
        lay = family_of(model_or_config)
    except Exception as e:  # an unknown family: its own message says what is missing
        return str(e)
    if lay.name not in HIDDEN_FAMILIES:
        return (f"prune.hidden_size slices BERT-layout encoders ({', '.join(HIDDEN_FAMILIES)}); this model is "
                f"'{lay.name}', whose residual width is not sliced by edgekd: leave prune.hidden_size unset")
    if projects_embeddings:
        return ("prune.hidden_size: this ELECTRA projects its embeddings (embedding_size != hidden_size); only "
                "encoders whose embeddings are as wide as the residual stream are sliced")
    return None


def why_not(model: nn.Module) -> str | None:
    """Why the residual width of ``model`` cannot be pruned here, or None when it can."""
    base = getattr(model, "base_model", None)
    problem = family_problem(model, getattr(base, "embeddings_project", None) is not None)
    if problem:
        return problem
    outer = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding))
             and not n.startswith(_base_prefix(model)) and n not in _HEADS]
    if outer:
        return (f"prune.hidden_size: the task head's {outer} read the residual stream in a layout edgekd does not "
                f"slice (it slices {', '.join(_HEADS)} and the pooler); leave prune.hidden_size unset")
    return None


def _base_prefix(model: nn.Module) -> str:
    """The name prefix of the encoder's modules: "" for a bare encoder (``BertModel``), whose every module is
    the encoder's; a prefix no module name has when the model has no base model under its prefix."""
    if model.base_model is model:
        return ""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and hasattr(model, prefix) else "\0"


def residual_norms(model: nn.Module) -> list[nn.LayerNorm]:
    """The LayerNorms whose outputs are the residual stream, in order."""
    lay = family_of(model)
    norms = [model.base_model.embeddings.LayerNorm]
    for b in blocks(model, lay):
        norms += [_get(b, p) for p in _BLOCK_NORMS]
    return norms


def width(model: nn.Module) -> int:
    return int(model.base_model.embeddings.LayerNorm.normalized_shape[0])


def taylor_scores(model: nn.Module, batches: Iterable[Mapping[str, Any]],
                  loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor],
                  per_example: bool = False) -> torch.Tensor:
    """|dL/d mask| of each hidden dimension summed over ``batches`` (see the module doc); with
    ``per_example``, each text's gradient squared and summed instead."""
    def install(current: dict) -> list[Any]:
        def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> torch.Tensor:
            return out * per_row(current["masks"][0], out)
        return [n.register_forward_hook(hook) for n in residual_norms(model)]

    return mask_scores(model, batches, loss_fn, [width(model)], install, per_example,
                       what="taylor importance of the hidden width")[0]


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> torch.Tensor:
    """L2 norm of each dimension's LayerNorm scales and shifts and its embedding columns."""
    sq = sum(n.weight.pow(2) + n.bias.pow(2) for n in residual_norms(model))
    emb = model.base_model.embeddings
    for name in _EMBEDDINGS:
        if hasattr(emb, name):
            sq = sq + getattr(emb, name).weight.pow(2).sum(0)
    return sq.sqrt()


def check_width(model: nn.Module, new: int, heads: list[int] | None = None) -> None:
    """Refuse a width the model cannot take (see the module doc for why heads bound it); ``heads``: the heads
    per layer the model will have when it is narrowed (default: what it has now)."""
    why = why_not(model)
    if why:
        raise StageError(why)
    head = _head_size(model)
    problem = width_problem(new, width(model), head, model.config.model_type)
    if problem:
        raise StageError(problem)
    heads = heads if heads is not None else _heads(model)
    if max(heads) > new // head:
        raise StageError(f"prune.hidden_size {new} leaves room for {new // head} heads of {head} in the config "
                         f"(hidden_size / num_attention_heads), but a layer would keep {max(heads)} (heads per "
                         f"layer: {heads}): remove more heads (prune.keep_params or remove_heads, with "
                         f"prune.prune_heads) or keep hidden_size at least {max(heads) * head}")


def width_problem(new: int, old: int, head: int, model_type: str) -> str | None:
    if not head <= new < old:
        return (f"prune.hidden_size {new}: the residual stream is {old} wide; give a width from one head ({head}) "
                f"up to below {old}")
    if new % head:
        return (f"prune.hidden_size {new} is not a multiple of the attention head size {head}: Hugging Face builds "
                f"{model_type} heads as hidden_size / num_attention_heads wide, so the width must be a whole number "
                f"of heads (e.g. {new // head * head} or {(new // head + 1) * head})")
    return None


def _heads(model: nn.Module) -> list[int]:
    lay = family_of(model)
    return [int(getattr(_get(b, lay.heads_owner), lay.heads_attrs[0])) for b in blocks(model, lay)]


def _head_size(model: nn.Module) -> int:
    lay = family_of(model)
    owner = _get(blocks(model, lay)[0], lay.heads_owner)
    return int(owner.attention_head_size)


def remove_hidden(model: nn.Module, keep: list[int]) -> None:
    """Keep hidden dimensions ``keep`` (ascending current indices) everywhere; in place. Checks first."""
    from transformers.pytorch_utils import prune_linear_layer

    new = len(keep)
    check_width(model, new)
    old = width(model)
    if sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= old:
        raise StageError(f"hidden dimensions to keep must be distinct ascending indices below {old}")
    lay = family_of(model)
    dev = model.base_model.embeddings.LayerNorm.weight.device
    idx = torch.tensor(keep, device=dev)

    def linear(owner: nn.Module, path: str, cols: bool, rows: bool) -> None:
        lin = _get(owner, path)
        if cols:
            lin = prune_linear_layer(lin, idx, dim=1)
        if rows:
            lin = prune_linear_layer(lin, idx, dim=0)
        _set_path(owner, path, lin)

    emb = model.base_model.embeddings
    for name in _EMBEDDINGS:
        if hasattr(emb, name):
            _slice_embedding(emb, name, idx)
    _slice_norm(emb, "LayerNorm", idx)
    for b in blocks(model, lay):
        for p in _BLOCK_IN:
            linear(b, p, cols=True, rows=False)
        for p in _BLOCK_OUT:
            linear(b, p, cols=False, rows=True)
        for p in _BLOCK_NORMS:
            _slice_norm(b, p, idx)
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        linear(pooler, "dense", cols=True, rows=True)
    for path, (cols, rows) in _HEADS.items():
        if _has_linear(model, path):
            linear(model, path, cols=cols, rows=rows)
    _write_config(model, old, new)


def _has_linear(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(_get(model, path), nn.Linear)
    except AttributeError:
        return False


def _set_path(owner: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get(owner, parent) if parent else owner, leaf, module)


def _slice_embedding(owner: nn.Module, name: str, idx: torch.Tensor) -> None:
    e = getattr(owner, name)
    new = nn.Embedding(e.num_embeddings, len(idx), padding_idx=e.padding_idx, device=e.weight.device,
                       dtype=e.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(e.weight[:, idx])
    new.weight.requires_grad_(e.weight.requires_grad)
    setattr(owner, name, new)


def _slice_norm(owner: nn.Module, path: str, idx: torch.Tensor) -> None:
    n = _get(owner, path)
    new = nn.LayerNorm(len(idx), eps=n.eps, elementwise_affine=True, device=n.weight.device, dtype=n.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(n.weight[idx])
        new.bias.copy_(n.bias[idx])
    new.weight.requires_grad_(n.weight.requires_grad)
    new.bias.requires_grad_(n.bias.requires_grad)
    _set_path(owner, path, new)


def _write_config(model: nn.Module, old: int, new: int) -> None:
    """hidden_size, num_attention_heads and pruned_heads as Hugging Face rebuilds them (module doc)."""
    cfg = model.config
    head = _head_size(model)
    slots = new // head
    heads = _heads(model)
    cfg.hidden_size = new
    if getattr(cfg, "embedding_size", None) == old:  # ELECTRA: embeddings as wide as the stream, no projection
        cfg.embedding_size = new
    cfg.num_attention_heads = slots
    cfg.pruned_heads = {i: list(range(h, slots)) for i, h in enumerate(heads) if h < slots}
    lay = family_of(model)
    for i, b in enumerate(blocks(model, lay)):
        attention = _get(b, lay.heads_owner.rpartition(".")[0] or lay.heads_owner)
        if hasattr(attention, "pruned_heads"):
            attention.pruned_heads = set(cfg.pruned_heads.get(i, []))
