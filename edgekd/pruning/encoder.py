"""Where the heads and FFN neurons of a BERT-family encoder live, and how to remove them for real.

Heads go through Hugging Face's own ``model.prune_heads``, which slices query/key/value rows and
the output projection's columns and records the original head ids in ``config.pruned_heads``, so
``from_pretrained`` prunes a fresh model the same way before loading the weights.

FFN neurons are sliced with ``transformers.pytorch_utils.prune_linear_layer`` (rows of the first
FFN linear, columns of the second). The config holds one global FFN width, so:

* equal widths in every layer (``scope: per_layer``): the width is written to the config
  (``intermediate_size`` for BERT) and the folder reloads with plain ``from_pretrained``;
* unequal widths (``scope: global``): the config also carries ``ffn_sizes_per_layer`` and
  the folder reloads with :func:`load_pruned_model`. Plain ``from_pretrained`` refuses it with a
  size-mismatch error rather than loading wrong weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import StageError

FFN_SIZES_KEY = "ffn_sizes_per_layer"


@dataclass(frozen=True)
class EncoderLayout:
    """Attribute paths, relative to one transformer block, of the parts pruning touches."""

    family: str
    blocks: str  # from model.base_model to the list of blocks
    attention: str  # the module whose prune_heads slices q/k/v/out
    query: str
    key: str
    value: str
    attn_out: str
    ffn_in: str
    ffn_out: str
    heads_attr: str  # on the attention-holding module (see heads_owner), the current head count
    heads_owner: str
    ffn_config_key: str
    heads_config_key: str


BERT_LIKE = EncoderLayout(
    family="bert", blocks="encoder.layer", attention="attention",
    query="attention.self.query", key="attention.self.key", value="attention.self.value",
    attn_out="attention.output.dense", ffn_in="intermediate.dense", ffn_out="output.dense",
    heads_attr="num_attention_heads", heads_owner="attention.self",
    ffn_config_key="intermediate_size", heads_config_key="num_attention_heads",
)
DISTILBERT = EncoderLayout(
    family="distilbert", blocks="transformer.layer", attention="attention",
    query="attention.q_lin", key="attention.k_lin", value="attention.v_lin",
    attn_out="attention.out_lin", ffn_in="ffn.lin1", ffn_out="ffn.lin2",
    heads_attr="n_heads", heads_owner="attention",
    ffn_config_key="hidden_dim", heads_config_key="n_heads",
)
LAYOUTS = (BERT_LIKE, DISTILBERT)


def _get(obj: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), obj)


def _has(obj: Any, path: str) -> bool:
    try:
        _get(obj, path)
    except AttributeError:
        return False
    return True


def _set(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    setattr(_get(obj, ".".join(parents)) if parents else obj, last, value)


def find_layout(model: nn.Module) -> EncoderLayout:
    base = getattr(model, "base_model", None)
    if base is not None:
        for layout in LAYOUTS:
            if _has(base, layout.blocks):
                blocks = _get(base, layout.blocks)
                if len(blocks) and all(_has(blocks[0], p) for p in (layout.query, layout.attn_out, layout.ffn_in)):
                    return layout
    raise StageError(
        f"heads-ffn pruning supports BERT-family encoders (BERT, RoBERTa, ELECTRA, DistilBERT and "
        f"relatives); {type(model).__name__} is not one. Use prune.method 'channels' or 'unstructured'."
    )


class Encoder:
    """One model seen through its layout: per-layer heads, neurons and the units' parameter costs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layout = find_layout(model)
        self.blocks = list(_get(model.base_model, self.layout.blocks))

    # --- structure --------------------------------------------------------------------------
    def heads(self) -> list[int]:
        return [int(getattr(_get(b, self.layout.heads_owner), self.layout.heads_attr)) for b in self.blocks]

    def neurons(self) -> list[int]:
        return [int(_get(b, self.layout.ffn_in).out_features) for b in self.blocks]

    def head_size(self, layer: int) -> int:
        heads = self.heads()[layer]
        return _get(self.blocks[layer], self.layout.query).out_features // heads if heads else 0

    def head_cost(self, layer: int) -> int:
        """Parameters one head of ``layer`` holds: q/k/v rows and biases, output-projection columns."""
        b, d = self.blocks[layer], self.head_size(layer)
        q = _get(b, self.layout.query)
        out = _get(b, self.layout.attn_out)
        qkv = 3 * d * (q.in_features + (1 if q.bias is not None else 0))
        return qkv + d * out.out_features

    def neuron_cost(self, layer: int) -> int:
        b = self.blocks[layer]
        fin, fout = _get(b, self.layout.ffn_in), _get(b, self.layout.ffn_out)
        return fin.in_features + (1 if fin.bias is not None else 0) + fout.out_features

    def layer_params(self) -> int:
        return sum(p.numel() for b in self.blocks for p in b.parameters())

    def original_head_ids(self, layer: int) -> list[int]:
        """Original ids (as in ``config.pruned_heads``) of the heads ``layer`` still has, in order."""
        total = int(getattr(self.model.config, self.layout.heads_config_key))
        gone = set(self.model.config.pruned_heads.get(layer, []))
        return [h for h in range(total) if h not in gone]

    # --- removal ----------------------------------------------------------------------------
    def remove_heads(self, remove: dict[int, list[int]]) -> dict[int, list[int]]:
        """Remove heads given by their current index per layer; returns the original ids removed."""
        by_original: dict[int, list[int]] = {}
        for layer, current in remove.items():
            if not current:
                continue
            ids = self.original_head_ids(layer)
            if len(set(current)) >= len(ids):
                raise StageError(f"refusing to remove every attention head of layer {layer}")
            by_original[layer] = sorted(ids[i] for i in current)
        if by_original:
            self.model.prune_heads(by_original)
        return by_original

    def remove_neurons(self, remove: dict[int, list[int]]) -> None:
        from transformers.pytorch_utils import prune_linear_layer

        for layer, current in remove.items():
            if not current:
                continue
            b = self.blocks[layer]
            fin = _get(b, self.layout.ffn_in)
            drop = set(current)
            if len(drop) >= fin.out_features:
                raise StageError(f"refusing to remove every FFN neuron of layer {layer}")
            keep = torch.tensor([i for i in range(fin.out_features) if i not in drop], device=fin.weight.device)
            _set(b, self.layout.ffn_in, prune_linear_layer(fin, keep, dim=0))
            _set(b, self.layout.ffn_out, prune_linear_layer(_get(b, self.layout.ffn_out), keep, dim=1))
        self.sync_config()

    def sync_config(self) -> None:
        """Write the FFN widths into the config so that the saved folder reloads (see module doc)."""
        sizes = self.neurons()
        cfg = self.model.config
        setattr(cfg, self.layout.ffn_config_key, max(sizes))
        if len(set(sizes)) == 1:
            if hasattr(cfg, FFN_SIZES_KEY):
                delattr(cfg, FFN_SIZES_KEY)
        else:
            setattr(cfg, FFN_SIZES_KEY, sizes)


def load_pruned_model(path: str | Path, model_cls: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved after pruning, including one whose layers have different FFN widths.

    ``model_cls`` defaults to ``AutoModelForSequenceClassification``. Pruned heads are restored by
    Hugging Face from ``config.pruned_heads``; FFN widths from ``config.ffn_sizes_per_layer``.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cls = model_cls or AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(path)
    sizes = getattr(config, FFN_SIZES_KEY, None)
    if not sizes:
        return cls.from_pretrained(path, config=config, **kwargs)

    from transformers.pytorch_utils import prune_linear_layer

    model = cls.from_config(config)  # built with the widest FFN and heads already pruned
    enc = Encoder(model)
    if len(sizes) != len(enc.blocks):
        raise StageError(
            f"{path}: config.{FFN_SIZES_KEY} lists {len(sizes)} layers but the model has {len(enc.blocks)}"
        )
    for block, size in zip(enc.blocks, sizes, strict=True):
        keep = torch.arange(int(size))
        _set(block, enc.layout.ffn_in, prune_linear_layer(_get(block, enc.layout.ffn_in), keep, dim=0))
        _set(block, enc.layout.ffn_out, prune_linear_layer(_get(block, enc.layout.ffn_out), keep, dim=1))
    _load_weights(model, Path(path))
    return model.eval()


def _load_weights(model: nn.Module, folder: Path) -> None:
    single = folder / "model.safetensors"
    if not single.is_file():
        if not (folder / "model.safetensors.index.json").is_file():
            raise StageError(f"{folder} holds no model.safetensors: save the pruned model with save_pretrained")
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(model, folder, strict=True)
        return
    from safetensors.torch import load_file

    result = model.load_state_dict(load_file(str(single)), strict=False)
    # Tied weights (e.g. a decoder sharing the embedding matrix) are saved once and re-tied below.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise StageError(
            f"{single} does not match its config: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    model.tie_weights()
