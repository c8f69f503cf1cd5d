"""How much each attention head and FFN neuron matters.

taylor: a mask of ones is multiplied into every head's context vector (at the input of the
attention output projection) and into every FFN activation (at the input of the second FFN
linear). The gradient of the loss with respect to a mask entry is the first-order Taylor estimate
of the loss change when that unit is removed (Michel et al., "Are Sixteen Heads Really Better
than One?", 2019); its absolute value is accumulated over a few labelled batches. Gradients are
taken with ``torch.autograd.grad`` on the masks only, so the model's ``.grad`` fields are untouched.

magnitude: the L2 norm of every weight that belongs to the unit (q/k/v rows and output-projection
columns of a head; the first FFN linear's row and the second one's column of a neuron).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from edgekd.errors import StageError
from edgekd.pruning.encoder import Encoder, _get

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a Hugging Face model computes from a batch with ``labels``; for a plain module
    taking one input tensor, cross-entropy of its output against ``labels``."""
    if "labels" not in batch:
        raise StageError("importance batches must carry 'labels' (taylor scores need a loss)")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        out = model(**batch)
        if getattr(out, "loss", None) is None:
            raise StageError(f"{type(model).__name__} returned no loss for a batch with labels")
        return out.loss
    if len(inputs) != 1:
        raise StageError(
            "a plain module's importance batch must hold one input tensor besides 'labels'; "
            "pass PruneContext.loss_fn for anything else"
        )
    logits = model(next(iter(inputs.values())))
    return nn.functional.cross_entropy(logits, batch["labels"])


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def taylor_scores(
    enc: Encoder, batches: Iterable[Mapping[str, Any]], loss_fn: LossFn | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: |dL/d mask| of each head and of each FFN neuron, summed over ``batches``."""
    model, lay = enc.model, enc.layout
    device = next(model.parameters()).device
    heads, neurons = enc.heads(), enc.neurons()
    head_masks = [torch.ones(h, device=device, requires_grad=True) for h in heads]
    neuron_masks = [torch.ones(n, device=device, requires_grad=True) for n in neurons]

    def head_hook(mask: torch.Tensor, n_heads: int) -> Callable:
        def hook(_mod: nn.Module, args: tuple) -> tuple:
            x = args[0]
            shape = x.shape
            x = (x.reshape(*shape[:-1], n_heads, shape[-1] // n_heads) * mask[:, None]).reshape(shape)
            return (x, *args[1:])
        return hook

    def neuron_hook(mask: torch.Tensor) -> Callable:
        def hook(_mod: nn.Module, args: tuple) -> tuple:
            return (args[0] * mask, *args[1:])
        return hook

    handles = []
    for i, block in enumerate(enc.blocks):
        handles.append(_get(block, lay.attn_out).register_forward_pre_hook(head_hook(head_masks[i], heads[i])))
        handles.append(_get(block, lay.ffn_out).register_forward_pre_hook(neuron_hook(neuron_masks[i])))
    head_scores = [torch.zeros(h, device=device) for h in heads]
    neuron_scores = [torch.zeros(n, device=device) for n in neurons]
    loss_fn = loss_fn or default_loss
    was_training = model.training
    model.eval()  # dropout off: the scores measure the model, not the noise
    seen = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, _to(batch, device))
                grads = torch.autograd.grad(loss, head_masks + neuron_masks)
                for acc, g in zip(head_scores + neuron_scores, grads, strict=True):
                    acc += g.detach().abs()
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise StageError("taylor importance got no batches: pass PruneContext.score_batches or use importance 'magnitude'")
    return head_scores, neuron_scores


def magnitude_scores(enc: Encoder) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: L2 norm of the weights of each head and of each FFN neuron (fused QKV and gated FFN
    layouts are the encoder description's business: see Encoder.magnitude_scores)."""
    return enc.magnitude_scores()


def normalise_per_layer(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Divide each layer's scores by their L2 norm, so that layers compare (Michel et al., sec. 4.2)."""
    return [s / s.norm().clamp_min(1e-12) for s in scores]
