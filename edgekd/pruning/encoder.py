"""The heads and FFN neurons of an encoder (where they live: edgekd.encoders), and removing them for real.

Heads go through Hugging Face's own ``model.prune_heads`` where the family has one (BERT, RoBERTa,
XLM-R, ELECTRA, DistilBERT, ALBERT): it slices query/key/value rows and the output projection's
columns and records the original head ids in ``config.pruned_heads``, so ``from_pretrained``
prunes a fresh model the same way before loading the weights. Families without it (DeBERTa-v2/v3,
ModernBERT's fused Wqkv) are sliced here and recorded in ``config.edgekd_pruned_heads``; such a
folder reloads with :func:`load_pruned_model` (plain ``from_pretrained`` refuses it: size mismatch).
MPNet (``head_removal: uniform``) is sliced here too, but only with the same heads in every layer:
its relative-position bias table, shared by all layers, has one column per head and loses the
removed heads' columns as well. Heads that differ between layers are refused before anything changes.

FFN neurons are sliced with ``transformers.pytorch_utils.prune_linear_layer`` (rows of the first
FFN linear, both halves of a gated one, columns of the second). The config holds one global FFN width, so:

* equal widths in every layer (``scope: per_layer`` with a share, ``keep_params`` or a search, of layers
  that were equal; or a ``remove_neurons`` that splits evenly over them): the width is written to the
  config (``intermediate_size`` for BERT) and the folder reloads with plain ``from_pretrained``;
* unequal widths (``scope: global``; ``per_layer`` with a ``remove_neurons`` whose remainder goes one each
  to some layers, ``selection.spread``: 10 over 3 layers of 64 leaves 60, 61, 61): the config also carries
  ``ffn_sizes_per_layer`` and the folder reloads with :func:`load_pruned_model`. Plain
  ``from_pretrained`` refuses it with a size-mismatch error rather than loading wrong weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.encoders import SLICED_HEADS_KEY, EncoderFamily, blocks, family_of, head_projections
from edgekd.encoders import get as _get
from edgekd.encoders import has as _has
from edgekd.encoders import put as _set
from edgekd.errors import StageError

FFN_SIZES_KEY = "ffn_sizes_per_layer"


def find_layout(model: nn.Module) -> EncoderFamily:
    """The model's encoder-family description (see edgekd.encoders); an unknown family is an error."""
    return family_of(model)


def _rows(groups: int, units: int, size: int, keep: list[int]) -> torch.Tensor:
    """Row indices of the kept units in a projection laid out [groups, units, size]."""
    return torch.tensor([g * units * size + u * size + j for g in range(groups) for u in keep for j in range(size)])


class Encoder:
    """One model seen through its family description: per-layer heads, neurons and the units' costs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layout = family_of(model)
        self.blocks = blocks(model, self.layout)

    # --- structure --------------------------------------------------------------------------
    def heads(self) -> list[int]:
        return [int(getattr(_get(b, self.layout.heads_owner), self.layout.heads_attrs[0])) for b in self.blocks]

    def neurons(self) -> list[int]:
        return [int(_get(b, self.layout.ffn_in).out_features) // self.layout.ffn_groups for b in self.blocks]

    def head_size(self, layer: int) -> int:
        heads = self.heads()[layer]
        return _get(self.blocks[layer], self.layout.attn_out).in_features // heads if heads else 0

    def head_cost(self, layer: int) -> int:
        """Parameters one head of ``layer`` holds: q/k/v rows (fused or not) and biases, output columns."""
        b, d, lay = self.blocks[layer], self.head_size(layer), self.layout
        cost = d * _get(b, lay.attn_out).out_features
        for n, p in enumerate(head_projections(b, lay)):
            groups = lay.qkv_groups if n < len(lay.head_projections) else 1
            cost += groups * d * (p.in_features + (1 if p.bias is not None else 0))
        return cost

    def neuron_cost(self, layer: int) -> int:
        b = self.blocks[layer]
        fin, fout = _get(b, self.layout.ffn_in), _get(b, self.layout.ffn_out)
        return self.layout.ffn_groups * (fin.in_features + (1 if fin.bias is not None else 0)) + fout.out_features

    def layer_params(self) -> int:
        return sum(p.numel() for b in self.blocks for p in b.parameters())

    def _pruned_record(self) -> dict[int, list[int]]:
        cfg = self.model.config
        rec = getattr(cfg, SLICED_HEADS_KEY, None) if self.layout.heads_sliced else cfg.pruned_heads
        return {int(k): list(v) for k, v in (rec or {}).items()}

    def original_head_ids(self, layer: int) -> list[int]:
        """Original ids (as in ``config.pruned_heads``) of the heads ``layer`` still has, in order."""
        total = int(getattr(self.model.config, self.layout.heads_key))
        gone = set(self._pruned_record().get(layer, []))
        return [h for h in range(total) if h not in gone]

    @torch.no_grad()
    def magnitude_scores(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer: L2 norm of the weights of each head (q/k/v rows, fused or not, and output-projection
        columns) and of each FFN neuron (both halves of a gated first linear, the second one's column)."""
        lay = self.layout
        head_scores, neuron_scores = [], []
        for i, b in enumerate(self.blocks):
            h, d = self.heads()[i], self.head_size(i)
            sq = _get(b, lay.attn_out).weight.pow(2).sum(0).view(h, d).sum(1)
            for n, p in enumerate(head_projections(b, lay)):
                groups = lay.qkv_groups if n < len(lay.head_projections) else 1
                sq = sq + p.weight.pow(2).sum(1).view(groups, h, d).sum((0, 2))
                if p.bias is not None:
                    sq = sq + p.bias.pow(2).view(groups, h, d).sum((0, 2))
            head_scores.append(sq.sqrt())
            fin, fout = _get(b, lay.ffn_in), _get(b, lay.ffn_out)
            units = fin.out_features // lay.ffn_groups
            nsq = fin.weight.pow(2).sum(1).view(lay.ffn_groups, units).sum(0) + fout.weight.pow(2).sum(0)
            if fin.bias is not None:
                nsq = nsq + fin.bias.pow(2).view(lay.ffn_groups, units).sum(0)
            neuron_scores.append(nsq.sqrt())
        return head_scores, neuron_scores

    # --- removal ----------------------------------------------------------------------------
    def remove_heads(self, remove: dict[int, list[int]]) -> dict[int, list[int]]:
        """Remove heads given by their current index per layer; returns the original ids removed."""
        by_original: dict[int, list[int]] = {}
        current_by_layer: dict[int, list[int]] = {}
        for layer, current in remove.items():
            if not current:
                continue
            ids = self.original_head_ids(layer)
            if len(set(current)) >= len(ids):
                raise StageError(f"refusing to remove every attention head of layer {layer}")
            by_original[layer] = sorted(ids[i] for i in current)
            current_by_layer[layer] = sorted(set(current))
        if not by_original:
            return by_original
        lay = self.layout
        if lay.head_removal == "none":
            raise StageError(f"{lay.name}: attention heads cannot be removed. {lay.no_head_removal_why}")
        if lay.head_removal == "hf":
            self.model.prune_heads(by_original)
            return by_original
        if lay.heads_uniform:
            check_uniform(lay, by_original, len(self.blocks))
            slice_shared_head_tables(self.model, lay, current_by_layer[0])
        record = self._pruned_record()
        for layer, current in current_by_layer.items():
            slice_heads(self.blocks[layer], lay, current)
            record[layer] = sorted(set(record.get(layer, [])) | set(by_original[layer]))
        setattr(self.model.config, SLICED_HEADS_KEY, {str(k): v for k, v in sorted(record.items())})
        return by_original

    def remove_neurons(self, remove: dict[int, list[int]]) -> None:
        for layer, current in remove.items():
            if not current:
                continue
            n = self.neurons()[layer]
            drop = set(current)
            if len(drop) >= n:
                raise StageError(f"refusing to remove every FFN neuron of layer {layer}")
            slice_neurons(self.blocks[layer], self.layout, [i for i in range(n) if i not in drop])
        self.sync_config()

    def sync_config(self) -> None:
        """Write the FFN widths into the config so that the saved folder reloads (see module doc)."""
        sizes = self.neurons()
        cfg = self.model.config
        setattr(cfg, self.layout.ffn_key, max(sizes))
        if len(set(sizes)) == 1:
            if hasattr(cfg, FFN_SIZES_KEY):
                delattr(cfg, FFN_SIZES_KEY)
        else:
            setattr(cfg, FFN_SIZES_KEY, sizes)


def check_uniform(lay: EncoderFamily, by_original: dict[int, list[int]], n_layers: int) -> None:
    """Refuse head removal (original ids per layer) that is not the same in every one of ``n_layers``."""
    sets = {tuple(sorted(by_original.get(i, []))) for i in range(n_layers)}
    if len(sets) == 1:
        return
    asked = "; ".join(f"layer {i}: {sorted(by_original.get(i, []))}" for i in range(n_layers))
    raise StageError(
        f"{lay.name}: attention heads must be removed uniformly, the same heads in every layer "
        f"({lay.uniform_heads_why}). Asked (original head ids): {asked}. Remove the same head ids from all "
        f"{n_layers} layers (prune.method heads-ffn chooses them so for this family), or set "
        "prune.prune_heads: false to prune FFN neurons only."
    )


def slice_shared_head_tables(model: nn.Module, lay: EncoderFamily, drop: list[int]) -> None:
    """Remove the columns of heads ``drop`` (current indices) from the family's shared per-head tables."""
    for path in lay.shared_head_tables:
        table = _get(model.base_model, path)
        if not isinstance(table, nn.Embedding):
            raise StageError(f"{lay.name}: {path} is a {type(table).__name__}, not the nn.Embedding (one column "
                             "per head) the family description says: the description does not fit this model")
        keep = [i for i in range(table.embedding_dim) if i not in set(drop)]
        sliced = nn.Embedding(table.num_embeddings, len(keep), padding_idx=table.padding_idx,
                              device=table.weight.device, dtype=table.weight.dtype)
        with torch.no_grad():
            sliced.weight.copy_(table.weight[:, keep])
        sliced.weight.requires_grad_(table.weight.requires_grad)
        _set(model.base_model, path, sliced)


def slice_heads(block: nn.Module, lay: EncoderFamily, drop: list[int]) -> None:
    """Remove heads (current indices) from one block by slicing its projections (fused rows included)."""
    from transformers.pytorch_utils import prune_linear_layer

    owner = _get(block, lay.heads_owner)
    h = int(getattr(owner, lay.heads_attrs[0]))
    out = _get(block, lay.attn_out)
    d = out.in_features // h
    keep = [i for i in range(h) if i not in set(drop)]
    for n, path in enumerate(lay.head_projections + lay.optional_head_projections):
        if _has(block, path):
            groups = lay.qkv_groups if n < len(lay.head_projections) else 1
            lin = _get(block, path)
            _set(block, path, prune_linear_layer(lin, _rows(groups, h, d, keep).to(lin.weight.device), dim=0))
    _set(block, lay.attn_out, prune_linear_layer(out, _rows(1, h, d, keep).to(out.weight.device), dim=1))
    setattr(owner, lay.heads_attrs[0], len(keep))
    setattr(owner, lay.heads_attrs[1], len(keep) * d)


def slice_neurons(block: nn.Module, lay: EncoderFamily, keep: list[int]) -> None:
    """Keep FFN neurons ``keep`` (current indices) of one block; both halves of a gated first linear."""
    from transformers.pytorch_utils import prune_linear_layer

    fin = _get(block, lay.ffn_in)
    n = fin.out_features // lay.ffn_groups
    _set(block, lay.ffn_in, prune_linear_layer(fin, _rows(lay.ffn_groups, n, 1, keep).to(fin.weight.device), dim=0))
    cols = torch.tensor(keep, device=fin.weight.device)
    _set(block, lay.ffn_out, prune_linear_layer(_get(block, lay.ffn_out), cols, dim=1))


# What ``load_pruned_model`` honours for a folder it builds from its config (a plain one takes any kwarg).
PRUNED_LOAD_KWARGS = ("dtype", "torch_dtype", "attn_implementation")


def shape_from_config(model: nn.Module, config: Any, where: str) -> None:
    """Slice a freshly built ``model`` (every block at the config's widest) as ``config`` records what
    edgekd pruned: heads it sliced itself (``edgekd_pruned_heads``; a family with a shared per-head table
    loses the same heads there) and per-layer FFN widths (``ffn_sizes_per_layer``). Used to rebuild a
    pruned folder (:func:`load_pruned_model`) and a student copied from a pruned teacher's layers
    (:func:`edgekd.students.build_student`); ``where`` names the model in errors."""
    sizes = getattr(config, FFN_SIZES_KEY, None)
    sliced = getattr(config, SLICED_HEADS_KEY, None)
    if not sizes and not sliced:
        return
    enc = Encoder(model)
    if sliced:
        if enc.layout.heads_uniform:
            by_layer = {int(k): list(v) for k, v in sliced.items()}
            try:
                check_uniform(enc.layout, by_layer, len(enc.blocks))
            except StageError as e:
                raise StageError(f"{where}: config.{SLICED_HEADS_KEY} does not describe a model edgekd pruned: {e}") from e
            slice_shared_head_tables(model, enc.layout, by_layer[min(by_layer)])
        for layer, ids in sliced.items():
            # original ids == current ids on a freshly built block
            slice_heads(enc.blocks[int(layer)], enc.layout, list(ids))
    if sizes:
        if len(sizes) != len(enc.blocks):
            raise StageError(
                f"{where}: config.{FFN_SIZES_KEY} lists {len(sizes)} layers but the model has {len(enc.blocks)}"
            )
        for block, size in zip(enc.blocks, sizes, strict=True):
            slice_neurons(block, enc.layout, list(range(int(size))))


def load_pruned_model(path: str | Path, model_cls: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved after pruning: per-layer FFN widths, and heads that edgekd sliced itself.

    ``model_cls`` defaults to ``AutoModelForSequenceClassification``. Heads removed through Hugging
    Face are restored by it from ``config.pruned_heads``; heads edgekd sliced (families without
    ``prune_heads``: DeBERTa-v2/v3, ModernBERT; MPNet, with its shared per-head table) from
    ``config.edgekd_pruned_heads``; FFN widths from ``config.ffn_sizes_per_layer``.

    ``kwargs`` go to ``from_pretrained`` for a folder it reloads by itself. A folder with either key above is
    built from its config instead, which honours ``dtype`` (or ``torch_dtype``: a torch dtype, its name, or
    ``"auto"``, the config's) and ``attn_implementation`` as ``from_pretrained`` would, the default dtype
    being torch's (float32) as there; any other kwarg is refused (TypeError) rather than dropped.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cls = model_cls or AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(path)
    sizes = getattr(config, FFN_SIZES_KEY, None)
    sliced = getattr(config, SLICED_HEADS_KEY, None)
    if not sizes and not sliced:
        return cls.from_pretrained(path, config=config, **kwargs)

    unread = sorted(set(kwargs) - set(PRUNED_LOAD_KWARGS))
    if unread:
        raise TypeError(f"load_pruned_model: {path} is built from its config (it has {FFN_SIZES_KEY} or "
                        f"{SLICED_HEADS_KEY}), which honours {', '.join(PRUNED_LOAD_KWARGS)} only, not "
                        f"{', '.join(unread)}: drop {'it' if len(unread) == 1 else 'them'} (or apply "
                        f"{'it' if len(unread) == 1 else 'them'} to the model returned)")
    # The dtype the model is built in, as from_pretrained chooses it; from_config reads it from the config.
    dtype = _load_dtype(kwargs.get("dtype", kwargs.get("torch_dtype")), config)
    setattr(config, "dtype" if "dtype" in vars(config) else "torch_dtype", dtype)
    attn = {"attn_implementation": kwargs["attn_implementation"]} if "attn_implementation" in kwargs else {}
    model = cls.from_config(config, **attn)  # widest FFN; heads pruned through Hugging Face already gone
    built_in = {name: p.dtype for name, p in model.named_parameters()}
    shape_from_config(model, config, str(path))
    with torch.no_grad():  # the sliced layers are built in float32: back to the dtype the model was built in
        for name, p in model.named_parameters():
            if built_in.get(name, p.dtype) != p.dtype:
                p.data = p.data.to(built_in[name])
    _load_weights(model, Path(path))
    return model.eval()


def _load_dtype(dtype: Any, config: Any) -> torch.dtype:
    """The dtype ``from_pretrained`` loads in for ``dtype``: torch's default for None, the config's for "auto"."""
    if dtype is None:
        return torch.get_default_dtype()
    if dtype == "auto":
        saved = vars(config).get("dtype", vars(config).get("torch_dtype"))
        return _load_dtype(saved, config) if saved not in (None, "auto") else torch.get_default_dtype()
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return found
    raise TypeError(f"load_pruned_model: dtype {dtype!r} is not a floating torch dtype, its name or 'auto'")


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
