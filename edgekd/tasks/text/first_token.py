"""The exported classifier with its last encoder block computed for the first position only.

A sequence classifier of the BERT, DistilBERT and MPNet kinds reads one position of the last block's
output: the first ([CLS], ``<s>``), through BERT's pooler or the RoBERTa/ELECTRA/DistilBERT/MPNet heads.
Every other row of that block is computed and thrown away. In the last block only the keys and
values need every position; the query, the attention output, both FFN linears and both layer norms
need the first row alone, which is most of the block's multiply-adds (for the default 3-layer
student, about a quarter of the encoder's). The logits are the same: the rows dropped are never read.

``first_token_support(model)`` says whether a model qualifies (None) or why not (a sentence), and
``FirstTokenClassifierExport`` is the module the export targets capture in its place. The block
arithmetic is the one of transformers' BertLayer / TransformerBlock / MPNetLayer in eval mode (MPNet's
relative-position bias computed by its encoder, the first row of it in the last block), written with the
model's own linears and layer norms; ``check_same_logits`` compares it with the model's own forward.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.errors import StageError

# Heads that read the first position of the last hidden state only (BERT through its pooler).
_BERT_STYLE = {
    "BertForSequenceClassification": "pooler",
    "RobertaForSequenceClassification": "head",
    "XLMRobertaForSequenceClassification": "head",
    "ElectraForSequenceClassification": "head",
}
_DISTILBERT = "DistilBertForSequenceClassification"
_MPNET = "MPNetForSequenceClassification"  # relative-position bias, one row of it for the first position
SUPPORTED = (*_BERT_STYLE, _DISTILBERT, _MPNET)


def first_token_support(model: nn.Module) -> str | None:
    """None when ``model``'s last block can be computed for the first position alone, else why not."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return (f"{name}: its head is not one known to read the first position only "
                f"(known: {', '.join(SUPPORTED)})")
    cfg = model.config
    if name in (_DISTILBERT, _MPNET):
        return None
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return (f"{name} with position_embedding_type {cfg.position_embedding_type!r}: its attention adds "
                "relative-position scores this module does not compute")
    if getattr(cfg, "is_decoder", False):
        return f"{name} configured as a decoder (causal attention)"
    if _BERT_STYLE[name] == "pooler" and getattr(model.base_model, "pooler", None) is None:
        return f"{name} without a pooler"
    return None


def _heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, n, d).transpose(1, 2)


def _attend(q_lin: nn.Linear, k_lin: nn.Linear, v_lin: nn.Linear, n: int, d: int, hq: torch.Tensor,
            h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of the ``hq`` rows over all of ``h``: [batch, rows, n * d].

    Written as MatMul, Softmax, MatMul: torch.onnx exports ``scaled_dot_product_attention`` with a
    chain of shape operators around the key transpose (30 more nodes for three blocks), which made the
    dynamic int8 file about 5% slower per call at batch 1 (0.89 against 0.84 ms, timed side by side)."""
    q, k, v = _heads(q_lin(hq), n, d), _heads(k_lin(h), n, d), _heads(v_lin(h), n, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d)) + bias
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
    return ctx.transpose(1, 2).reshape(hq.shape[0], -1, n * d)


def _bert_block(layer: nn.Module, hq: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    sa = layer.attention.self
    ctx = _attend(sa.query, sa.key, sa.value, sa.num_attention_heads, sa.attention_head_size, hq, h, bias)
    a = layer.attention.output(ctx, hq)  # dense, dropout, LayerNorm(x + hq)
    return layer.output(layer.intermediate(a), a)


def _mpnet_block(layer: nn.Module, hq: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    sa = layer.attention.attn
    ctx = _attend(sa.q, sa.k, sa.v, sa.num_attention_heads, sa.attention_head_size, hq, h, bias)
    a = layer.attention.LayerNorm(sa.o(ctx) + hq)
    return layer.output(layer.intermediate(a), a)


def _distilbert_block(layer: nn.Module, hq: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    sa = layer.attention
    ctx = _attend(sa.q_lin, sa.k_lin, sa.v_lin, sa.n_heads, sa.dim // sa.n_heads, hq, h, bias)
    a = layer.sa_layer_norm(sa.out_lin(ctx) + hq)
    return layer.output_layer_norm(layer.ffn(a) + a)



# What a padded key adds to the attention scores: far below any score, and representable in fp16 (whose
# lowest is -65504), as the exported graph may be converted to it.
MASK_VALUE = -1e4

class FirstTokenClassifierExport(nn.Module):
    """(input_ids, attention_mask) -> (logits,), as ``SequenceClassifierExport``, with every block but the
    last over all positions and the last over the first position only. Raises StageError for a model
    ``first_token_support`` refuses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        why = first_token_support(model)
        if why:
            raise StageError(f"the last block cannot be computed for the first position alone: {why}")
        self.model = model.eval()
        self.kind = type(model).__name__

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        m, base = self.model, self.model.base_model
        if self.kind == _DISTILBERT:
            h = base.embeddings(input_ids)
            blocks, block = base.transformer.layer, _distilbert_block
        elif self.kind == _MPNET:
            h = base.embeddings(input_ids=input_ids)
            blocks, block = base.encoder.layer, _mpnet_block
        else:
            h = base.embeddings(input_ids=input_ids)
            if hasattr(base, "embeddings_project"):  # ELECTRA with embedding_size != hidden_size
                h = base.embeddings_project(h)
            blocks, block = base.encoder.layer, _bert_block
        # Additive key mask, [batch, 1, 1, keys]: padded keys get MASK_VALUE, which every real key then beats
        # by e^10000 (nothing in float32). Not the dtype's lowest value: an fp16 conversion of the traced graph
        # (Core ML's) makes float32's -3.4e38 -inf, and the real keys' 0 * -inf is NaN.
        bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * MASK_VALUE
        if self.kind == _MPNET:  # the relative-position bias every block adds, [batch, heads, rows, keys]
            position = base.encoder.compute_position_bias(h)
            bias, last_bias = position + bias, position[:, :, :1, :] + bias
        else:
            last_bias = bias
        for layer in blocks[:-1]:
            h = block(layer, h, h, bias)
        h = block(blocks[-1], h[:, :1], h, last_bias)  # [batch, 1, hidden]
        if self.kind == _DISTILBERT:
            x = nn.functional.relu(m.pre_classifier(h[:, 0]))
            return (m.classifier(m.dropout(x)),)
        if _BERT_STYLE.get(self.kind) == "pooler":
            return (m.classifier(m.dropout(base.pooler(h))),)
        return (m.classifier(h),)  # the RoBERTa/ELECTRA/MPNet heads read h[:, 0, :] themselves


def check_same_logits(module: nn.Module, reference: nn.Module, inputs: dict[str, np.ndarray],
                      n: int = 16, atol: float = 1e-4) -> float:
    """Largest |logit difference| of ``module`` against ``reference`` on the first ``n`` examples;
    StageError when it exceeds ``atol`` times the logits' scale (a block computed wrongly)."""
    feed = {k: torch.as_tensor(np.asarray(v[:n])) for k, v in inputs.items()}
    with torch.no_grad():
        got, want = module(**feed)[0], reference(**feed)[0]
    diff = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not diff <= atol * scale:
        raise StageError(f"the first-position last block gives logits {diff:.3g} away from the model's own "
                         f"forward on {len(want)} examples: set export.first_token_last_layer: false and "
                         "report this model type.")
    return diff


def shipped_text_module(model: nn.Module, setting: bool | None, reference: nn.Module,
                        inputs: dict[str, np.ndarray]) -> tuple[nn.Module, dict[str, Any]]:
    """The module the export targets capture, and what the artifact records about it.

    ``setting`` is ``export.first_token_last_layer``: None uses the first-position block where the model
    qualifies, True requires it (StageError where it does not), False keeps the full last block."""
    if setting is False:
        return reference, {"applied": False, "why": "export.first_token_last_layer is false"}
    why = first_token_support(model)
    if why:
        if setting:
            raise StageError(f"export.first_token_last_layer is true, but {why}. Leave the key out (the full "
                             "last block is exported where the first-position one is not possible) or set it false.")
        return reference, {"applied": False, "why": why}
    module = FirstTokenClassifierExport(model)
    diff = check_same_logits(module, reference, inputs)
    return module, {"applied": True, "max_abs_diff_vs_full": diff}
