"""How much each attention head and FFN neuron matters.

taylor: a mask of ones is multiplied into every head's context vector (at the input of the
attention output projection) and into every FFN activation (at the input of the second FFN
linear). The gradient of the loss with respect to a mask entry is the first-order Taylor estimate
of the loss change when that unit is removed (Michel et al., "Are Sixteen Heads Really Better
than One?", 2019); its absolute value is accumulated over a few labelled batches. Gradients are
taken with ``torch.autograd.grad`` on the masks only, so the model's ``.grad`` fields are untouched.

fisher: the same masks, one row per text of the batch, so one backward pass gives every text's own
gradient; the squares are summed over the texts (the diagonal of the empirical Fisher information
of the masks: Kwon et al., "A Fast Post-Training Pruning Framework for Transformers", 2022; the
squared per-example Taylor criterion of Molchanov et al., 2019). Taylor's absolute value of a
batch's summed gradient lets texts that pull a unit opposite ways cancel; the squares do not. The
loss is taken to be the mean of per-text terms (cross-entropy, distillation): each text's gradient
is scaled back by the batch size.

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


def _batch_size(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise StageError("fisher importance needs batches holding tensors (one row per example)")


def per_row(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mask`` shaped to multiply ``x`` (last dimension the units): (n,) applies to every position;
    (batch, n) to every position of its own example (fisher)."""
    if mask.dim() == 1:
        return mask
    if mask.shape[0] != x.shape[0]:
        raise StageError(f"fisher importance: a batch of {mask.shape[0]} examples reached a layer as "
                         f"{x.shape[0]} rows; the model must keep the batch as its first dimension")
    return mask.reshape(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])


def mask_scores(model: nn.Module, batches: Iterable[Mapping[str, Any]], loss_fn: LossFn, sizes: list[int],
                install: Callable[[dict[str, list[torch.Tensor]]], list[Any]], per_example: bool = False,
                what: str = "taylor importance") -> list[torch.Tensor]:
    """|dL/d mask| of masks of ones of ``sizes``, summed over ``batches`` (``per_example``: each example's
    gradient squared and summed). ``install(current)`` registers the hooks that multiply the masks in
    (they read ``current["masks"]``, a list in the order of ``sizes``) and returns their handles. Gradients
    are taken on the masks only, with the model in eval mode (dropout off: the scores measure the model)."""
    device = next(model.parameters()).device
    # masks in the model's own precision (a bf16 model multiplies bf16 activations); scores summed in float32
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    current: dict[str, list[torch.Tensor]] = {}
    handles = install(current)
    scores = [torch.zeros(n, device=device) for n in sizes]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                rows = _batch_size(batch) if per_example else None
                current["masks"] = [torch.ones((rows, n) if rows else (n,), device=device, dtype=dtype,
                                               requires_grad=True) for n in sizes]
                grads = torch.autograd.grad(loss_fn(model, _to(batch, device)), current["masks"])
                for acc, g in zip(scores, grads, strict=True):
                    g = g.detach().float()
                    acc += (g * rows).square().sum(0) if per_example else g.abs()
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise StageError(f"{what} got no batches: pass PruneContext.score_batches or use importance 'magnitude'")
    return scores


def taylor_scores(
    enc: Encoder, batches: Iterable[Mapping[str, Any]], loss_fn: LossFn | None = None, per_example: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: |dL/d mask| of each head and of each FFN neuron, summed over ``batches``; with
    ``per_example``, (dL_i/d mask)^2 summed over every example i instead (fisher, see the module doc)."""
    lay = enc.layout
    heads, neurons = enc.heads(), enc.neurons()

    def head_hook(current: dict, i: int, n_heads: int) -> Callable:
        def hook(_mod: nn.Module, args: tuple) -> tuple:
            x = args[0]
            shape = x.shape
            m = per_row(current["masks"][i], x)
            x = (x.reshape(*shape[:-1], n_heads, shape[-1] // n_heads) * m[..., None]).reshape(shape)
            return (x, *args[1:])
        return hook

    def neuron_hook(current: dict, i: int) -> Callable:
        def hook(_mod: nn.Module, args: tuple) -> tuple:
            return (args[0] * per_row(current["masks"][len(heads) + i], args[0]), *args[1:])
        return hook

    def install(current: dict) -> list[Any]:
        handles = []
        for i, block in enumerate(enc.blocks):
            handles.append(_get(block, lay.attn_out).register_forward_pre_hook(head_hook(current, i, heads[i])))
            handles.append(_get(block, lay.ffn_out).register_forward_pre_hook(neuron_hook(current, i)))
        return handles

    scores = mask_scores(enc.model, batches, loss_fn or default_loss, heads + neurons, install, per_example)
    return scores[:len(heads)], scores[len(heads):]


def magnitude_scores(enc: Encoder) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: L2 norm of the weights of each head and of each FFN neuron (fused QKV and gated FFN
    layouts are the encoder description's business: see Encoder.magnitude_scores)."""
    return enc.magnitude_scores()


def normalise_per_layer(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Divide each layer's scores by their L2 norm, so that layers compare (Michel et al., sec. 4.2)."""
    return [s / s.norm().clamp_min(1e-12) for s in scores]
