"""One description per encoder family: where its blocks, attention and FFN live, and its config keys.

Student building (layer copy + verification), the layer map of hidden/attention distillation and
heads/FFN pruning all read the description of the model's ``config.model_type``; a model type with
no description is an error that names what a description needs, never a guess.

Module paths are attribute paths: ``blocks`` from ``model.base_model`` to the list of blocks, the
others from one block. Read off the installed transformers 4.57 modeling files.

Fused and gated projections: a projection's output rows are laid out ``[groups, heads, head_dim]``
(``qkv_groups``: 1 for separate q/k/v, 3 for a fused Wqkv) or ``[groups, neurons]`` for the FFN
(``ffn_groups``: 2 for a gated FFN whose first linear holds input and gate halves, ModernBERT's Wi).

Head removal (``head_removal``): "hf" through the model's own ``prune_heads``; "slice" sliced by edgekd,
layer by layer; "uniform" sliced by edgekd with the same heads in every layer, because a table outside
the blocks holds one column per head for all of them (``shared_head_tables``, MPNet's relative-position
bias), which is sliced along; "none" refused (``no_head_removal_why``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from edgekd.errors import StageError

# Head removal: "hf" = the model's own prune_heads (config.pruned_heads, reloads with from_pretrained);
# "slice" and "uniform" = edgekd slices the projections (config key below, reloads with load_pruned_model).
SLICED_HEADS_KEY = "edgekd_pruned_heads"
HeadRemoval = Literal["hf", "slice", "uniform", "none"]


@dataclass(frozen=True)
class EncoderFamily:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # model.base_model -> list of blocks (ALBERT: list of layer groups, see inner)
    head_projections: tuple[str, ...]  # linears whose output rows are [qkv_groups, heads, head_dim]
    attn_out: str  # output projection: input columns are [heads, head_dim]
    ffn_in: str  # rows [ffn_groups, neurons]
    ffn_out: str  # input columns [neurons]
    heads_owner: str  # module holding the head count attributes
    heads_attrs: tuple[str, str]  # (head count, heads * head_dim) attribute names on heads_owner
    layers_key: str
    heads_key: str
    ffn_key: str
    head_dim_key: str | None = None  # None: hidden_size // heads
    qkv_groups: int = 1
    ffn_groups: int = 1
    optional_head_projections: tuple[str, ...] = ()  # present with some configs only (DeBERTa pos_*_proj)
    inner: str | None = None  # ALBERT: each group -> its list of layers
    head_removal: HeadRemoval = "hf"
    no_head_removal_why: str = ""
    # head_removal "uniform": tables (paths from model.base_model, nn.Embedding) with one column per head
    # shared by every layer, and why heads must therefore go from every layer alike
    shared_head_tables: tuple[str, ...] = ()
    uniform_heads_why: str = ""
    no_layer_copy_why: str = ""  # set: a student cannot be built by copying teacher layers
    attention_maps: bool = True  # output_attentions gives per-layer maps (eager attention)
    notes: str = ""

    @property
    def qkv_fused(self) -> bool:
        return self.qkv_groups > 1

    @property
    def ffn_gated(self) -> bool:
        return self.ffn_groups > 1

    @property
    def heads_sliced(self) -> bool:
        """edgekd slices the heads itself and records them in ``config.edgekd_pruned_heads``."""
        return self.head_removal in ("slice", "uniform")

    @property
    def heads_uniform(self) -> bool:
        """Heads can only be removed from every layer alike (the same original head ids)."""
        return self.head_removal == "uniform"


_BERT = dict(
    blocks="encoder.layer",
    head_projections=("attention.self.query", "attention.self.key", "attention.self.value"),
    attn_out="attention.output.dense", ffn_in="intermediate.dense", ffn_out="output.dense",
    heads_owner="attention.self", heads_attrs=("num_attention_heads", "all_head_size"),
    layers_key="num_hidden_layers", heads_key="num_attention_heads", ffn_key="intermediate_size",
)

FAMILIES: tuple[EncoderFamily, ...] = (
    EncoderFamily("bert", ("bert",), **_BERT,
                  notes="BERT and MiniLM-style BERTs (all-MiniLM, TinyBERT: model_type 'bert')"),
    EncoderFamily("roberta", ("roberta",), **_BERT),
    EncoderFamily("xlm-roberta", ("xlm-roberta",), **_BERT),
    EncoderFamily("electra", ("electra",), **_BERT),
    EncoderFamily(
        "distilbert", ("distilbert",), blocks="transformer.layer",
        head_projections=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        attn_out="attention.out_lin", ffn_in="ffn.lin1", ffn_out="ffn.lin2",
        heads_owner="attention", heads_attrs=("n_heads", "dim"),
        layers_key="n_layers", heads_key="n_heads", ffn_key="hidden_dim",
    ),
    EncoderFamily(
        "albert", ("albert",), blocks="encoder.albert_layer_groups", inner="albert_layers",
        head_projections=("attention.query", "attention.key", "attention.value"),
        attn_out="attention.dense", ffn_in="ffn", ffn_out="ffn_output",
        heads_owner="attention", heads_attrs=("num_attention_heads", "all_head_size"),
        layers_key="num_hidden_layers", heads_key="num_attention_heads", ffn_key="intermediate_size",
        no_layer_copy_why=(
            "ALBERT shares one set of block weights across its layers (num_hidden_groups groups reused "
            "num_hidden_layers times), so a student 'from teacher layers' would hold the very same weights: "
            "no fewer parameters, and the chosen layer indices would not matter. Give a separate student "
            "(student.model), or keep the ALBERT and prune it (pruning acts on the shared blocks)."
        ),
        notes="pruning acts on the unique (shared) blocks: a head removed there is gone from every layer using it",
    ),
    EncoderFamily(
        "deberta-v2", ("deberta-v2",), blocks="encoder.layer",
        head_projections=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
        optional_head_projections=("attention.self.pos_key_proj", "attention.self.pos_query_proj"),
        attn_out="attention.output.dense", ffn_in="intermediate.dense", ffn_out="output.dense",
        heads_owner="attention.self", heads_attrs=("num_attention_heads", "all_head_size"),
        layers_key="num_hidden_layers", heads_key="num_attention_heads", ffn_key="intermediate_size",
        head_dim_key="attention_head_size", head_removal="slice",
        notes="DeBERTa-v2 and v3 (model_type 'deberta-v2'); the relative-position embeddings are shared and "
        "projected by each layer's own (sliced) key/query projections, so heads prune per layer; with the encoder's "
        "convolution (conv_kernel_size > 0, the xlarge/xxlarge sizes), which follows block 0 only, a student by "
        "layer copy keeps teacher layer 0 first",
    ),
    EncoderFamily(
        "mpnet", ("mpnet",), blocks="encoder.layer",
        head_projections=("attention.attn.q", "attention.attn.k", "attention.attn.v"),
        attn_out="attention.attn.o", ffn_in="intermediate.dense", ffn_out="output.dense",
        heads_owner="attention.attn", heads_attrs=("num_attention_heads", "all_head_size"),
        layers_key="num_hidden_layers", heads_key="num_attention_heads", ffn_key="intermediate_size",
        head_removal="uniform", shared_head_tables=("encoder.relative_attention_bias",),
        uniform_heads_why=(
            "MPNet adds one relative-position bias per head from a single table shared by all layers "
            "(mpnet.encoder.relative_attention_bias, one column per head), so a head can only go from every "
            "layer at once, together with its column (transformers' own prune_heads leaves the table "
            "full-size and the forward fails)"
        ),
        notes="heads are removed uniformly: the same heads from every layer and their columns of the shared "
        "relative-position bias table (heads-ffn ranks heads by their importance summed over layers)",
    ),
    EncoderFamily(
        "modernbert", ("modernbert",), blocks="layers",
        head_projections=("attn.Wqkv",), qkv_groups=3, attn_out="attn.Wo",
        ffn_in="mlp.Wi", ffn_groups=2, ffn_out="mlp.Wo",
        heads_owner="attn", heads_attrs=("num_heads", "all_head_size"),
        layers_key="num_hidden_layers", heads_key="num_attention_heads", ffn_key="intermediate_size",
        head_removal="slice",
        notes="fused Wqkv (rows [q|k|v, heads, head_dim]), gated FFN Wi (rows [input|gate, neurons]); "
        "every global_attn_every_n_layers-th layer attends globally, the others locally, and layer 0 "
        "has no attention norm: a copied layer must keep its kind",
    ),
)

BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_NEEDS = ("the module path of its list of blocks", "q/k/v projections (separate or fused QKV)",
          "the attention output projection", "the FFN in/out linears (and whether gated)",
          "the config keys of layer count, head count, head dim and intermediate size")


def get(obj: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), obj)


def has(obj: Any, path: str) -> bool:
    try:
        get(obj, path)
    except AttributeError:
        return False
    return True


def put(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    setattr(get(obj, ".".join(parents)) if parents else obj, last, value)


def family_of(model_or_config: Any) -> EncoderFamily:
    """The description of a model (or config); an unknown model_type is an error naming what is missing."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    fam = BY_MODEL_TYPE.get(model_type)
    if fam is None:
        known = ", ".join(sorted(BY_MODEL_TYPE))
        raise StageError(
            f"edgekd has no encoder description for model_type '{model_type}' "
            f"({type(model_or_config).__name__}); known encoder families: {known}. A description "
            f"(edgekd/encoders.py, FAMILIES) needs: {'; '.join(_NEEDS)}. Use a model of a known family, "
            "give a separate student (student.model) and prune.method 'channels' or 'unstructured'."
        )
    return fam


def blocks(model: nn.Module, fam: EncoderFamily | None = None) -> list[nn.Module]:
    """The model's distinct transformer blocks, in order (ALBERT: its shared blocks, group by group)."""
    fam = fam or family_of(model)
    base = model.base_model
    if not has(base, fam.blocks):
        raise StageError(f"{type(model).__name__} has no {fam.blocks} although its model_type is "
                         f"'{model.config.model_type}': the '{fam.name}' description does not fit this model")
    listed = list(get(base, fam.blocks))
    return [b for g in listed for b in get(g, fam.inner)] if fam.inner else listed


def block_prefix(model: nn.Module, fam: EncoderFamily) -> str:
    """State-dict key prefix of the block list, e.g. 'bert.encoder.layer.' or 'model.layers.'."""
    base = "" if model.base_model is model else f"{model.base_model_prefix}."
    return f"{base}{fam.blocks}."


def head_projections(block: nn.Module, fam: EncoderFamily) -> list[nn.Linear]:
    return [get(block, p) for p in fam.head_projections + fam.optional_head_projections if has(block, p)]


# --- layer kinds that a copy must preserve -----------------------------------------------------

def layer_kind(config: Any, i: int) -> str:
    """What a block's index alone decides (beyond its weights); empty when nothing."""
    if config.model_type == "modernbert":
        glob = i % config.global_attn_every_n_layers == 0
        return f"{'global' if glob else 'local'} attention{', no attention norm' if i == 0 else ''}"
    if config.model_type == "deberta-v2" and (getattr(config, "conv_kernel_size", 0) or 0) > 0:
        # The encoder's convolution (deberta-v2-xlarge/xxlarge) runs after block 0 only, on its input and output.
        return "followed by the encoder's convolution (encoder.conv)" if i == 0 else ""
    return ""


# --- students by layer copy ------------------------------------------------------------------

def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def verify_student(teacher: nn.Module, student: nn.Module, layers: list[int]) -> None:
    """Fail unless student block i equals teacher block ``layers[i]`` tensor by tensor, and every tensor
    outside the blocks equals the teacher's."""
    fam = family_of(teacher)
    t_blocks, s_blocks = blocks(teacher, fam), blocks(student, fam)
    problems = []
    if len(s_blocks) != len(layers):
        problems.append(f"the student has {len(s_blocks)} blocks, {len(layers)} were asked for")
    for i, (sb, t) in enumerate(zip(s_blocks, layers, strict=False)):
        s_t, t_t = _tensors(sb), _tensors(t_blocks[t])
        if set(s_t) != set(t_t):
            problems.append(f"student block {i} and teacher block {t} hold different tensors: "
                            f"{sorted(set(s_t) ^ set(t_t))[:4]}")
            continue
        diff = [n for n in s_t if s_t[n].shape != t_t[n].shape or not torch.equal(s_t[n], t_t[n])]
        if diff:
            problems.append(f"student block {i} differs from teacher block {t} in {diff[:4]}")
    prefix = block_prefix(teacher, fam)
    t_all, s_all = teacher.state_dict(), student.state_dict()
    for k, v in s_all.items():
        if not k.startswith(prefix) and (k not in t_all or not torch.equal(v, t_all[k])):
            problems.append(f"{k} is not the teacher's")
    if problems:
        raise StageError(f"the {fam.name} student is not the copy of teacher layers {layers} it should be: "
                         + "; ".join(problems[:6]))


def describe_families() -> list[dict[str, str]]:
    """One row per family for docs and `edgekd` listings."""
    rows = []
    for f in FAMILIES:
        rows.append({
            "family": f.name, "model_type": ", ".join(f.model_types), "blocks": f.blocks,
            "qkv": "fused" if f.qkv_fused else "separate", "ffn": "gated" if f.ffn_gated else "plain",
            "student by layer copy": "no" if f.no_layer_copy_why else "yes",
            "head pruning": {"hf": "yes", "slice": "yes (edgekd slicing)",
                             "uniform": "yes, the same heads in every layer (edgekd slicing)",
                             "none": "no"}[f.head_removal],
        })
    return rows
