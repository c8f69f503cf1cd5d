"""Quantization-aware training for ONNX Runtime's dynamic int8: while the context is open, every
``nn.Linear`` of a model computes with the rounding the int8 export will apply, and gradients pass
through the rounding unchanged (straight-through estimator).

The rounding is ONNX Runtime's ``quantize_dynamic`` (``onnxruntime.quantization.quant_utils``):

- weights: int8 symmetric, scale ``max|w| / 127`` (``reduce_range``: ``/ 64``), per tensor or, with
  ``per_channel``, per output feature; uint8 weights asymmetric over ``[min(w, 0), max(w, 0)]`` in
  0..255 (``reduce_range``: 0..127);
- activations: ``DynamicQuantizeLinear``, uint8 asymmetric per tensor, the range taken from each
  input with 0 included, scale ``(max - min) / 255``. A batch-1 server quantizes each text on its own
  range, over its own tokens; so does training with ``ranges="text"``: each row of the batch gets the
  range of its own positions, the padding the attention mask marks left out. ``ranges="batch"``
  gives the whole padded batch one range (a looser stand-in for the server's rounding).

ONNX Runtime computes exactly this (``tests/test_fake_quant.py``), except with full-range int8
weights (``reduce_range`` off) on x86 CPUs without VNNI, whose u8s8 kernel can saturate its int16 pair
sums: there ``quantize.reduce_range: true`` is both the accurate export and the one trained for, and
``quantize.unsigned_weights`` stores the same full-range integers as uint8, which ONNX Runtime's u8u8
kernels compute exactly (``edgekd/quantization/weight_encoding.py``).

Training with it (distillation against the teacher's soft targets, in the prune stage's recovery)
lets the weights settle where int8 rounding costs little; the model stays a float model, exported
and quantized as before.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def _weight_range(weight_type: str, reduce_range: bool) -> tuple[int, int, bool]:
    """(qmin, qmax, symmetric) of the weights, as quantize_dynamic picks them."""
    if weight_type == "qint8":
        return (-64, 64, True) if reduce_range else (-127, 127, True)
    if weight_type == "quint8":
        return (0, 127, False) if reduce_range else (0, 255, False)
    raise ValueError(f"weight_type '{weight_type}': give qint8 or quint8.")


def fake_quant_weight(w: torch.Tensor, *, per_channel: bool, weight_type: str = "qint8",
                      reduce_range: bool = False) -> torch.Tensor:
    """``w`` rounded to the int8 grid the export uses (values in float; gradients straight through)."""
    qmin, qmax, symmetric = _weight_range(weight_type, reduce_range)
    flat = w.detach().reshape(w.shape[0], -1) if per_channel else w.detach().reshape(1, -1)
    lo = flat.min(dim=1).values.clamp(max=0)
    hi = flat.max(dim=1).values.clamp(min=0)
    if symmetric:
        absmax = torch.maximum(-lo, hi)
        scale = (2 * absmax / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).tiny)
        zero = torch.full_like(scale, (qmax + qmin) // 2, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).tiny)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    if per_channel:
        return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(w, scale.float(), zero, qmin, qmax)


def fake_quant_activation(x: torch.Tensor, mask: torch.Tensor | None = None, *,
                          per_row: bool = False) -> torch.Tensor:
    """``x`` through DynamicQuantizeLinear and back: uint8, its own range with 0 included. With
    ``per_row``, each row of ``x`` (dim 0, one text of a batch) on its own range: for a
    ``[rows, positions, features]`` input, over the positions ``mask`` (``[rows, positions]``, 1 for a
    real token) marks, which must then be given and match; the rounding each text gets when it is
    quantized alone."""
    d = x.detach()
    if per_row:
        flat = d.reshape(d.shape[0], -1)
        if d.dim() == 3:
            if mask is None or tuple(mask.shape) != tuple(d.shape[:2]):
                got = "no attention mask" if mask is None else f"an attention mask of shape {tuple(mask.shape)}"
                raise ValueError(f"per-text int8 rounding of a {tuple(d.shape)} input needs the attention mask "
                                 f"of its texts ({tuple(d.shape[:2])}), and the model was called with {got}: "
                                 "pass attention_mask= as a keyword, or round with ranges='batch'")
            drop = ~mask.to(torch.bool)[:, :, None].expand_as(d).reshape(d.shape[0], -1)
            lo = flat.masked_fill(drop, float("inf")).amin(dim=1)
            hi = flat.masked_fill(drop, float("-inf")).amax(dim=1)
        else:
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
        scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).tiny)
        zero = torch.round(-lo / scale).clamp(0, 255).to(torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale, zero, 0, 0, 255)
    lo, hi = d.min().clamp(max=0), d.max().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).tiny).float().reshape(1)
    zero = torch.round(-lo / scale).clamp(0, 255).to(torch.int32).reshape(1)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


RANGES = ("text", "batch")


@contextmanager
def dynamic_int8_training(model: nn.Module, *, per_channel: bool = False, weight_type: str = "qint8",
                          reduce_range: bool = False, ranges: str = "batch") -> Iterator[int]:
    """Within the block every ``nn.Linear`` of ``model`` runs with dynamic-int8 rounding; yields how many.
    ``ranges``: ``text``, each text of a batch rounded on the range of its own tokens (the attention
    mask passed to ``model`` as a keyword marks them; a per-position input without it is an error),
    as a batch-1 server rounds it; ``batch``, one range for the
    whole padded batch. The modules' own forward comes back when the block ends, whatever happens
    inside it."""
    _weight_range(weight_type, reduce_range)  # refuse an unknown type before touching the model
    if ranges not in RANGES:
        raise ValueError(f"ranges '{ranges}': give one of {', '.join(RANGES)}.")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    per_row = ranges == "text"
    seen: dict[str, torch.Tensor | None] = {"mask": None}

    def remember_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        seen["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_weight(self.weight, per_channel=per_channel, weight_type=weight_type,
                              reduce_range=reduce_range)
        return F.linear(fake_quant_activation(x, seen["mask"], per_row=per_row), w, self.bias)

    hook = model.register_forward_pre_hook(remember_mask, with_kwargs=True) if per_row else None
    for m in linears:
        m.forward = types.MethodType(forward, m)  # an instance attribute, shadowing the class's
    try:
        yield len(linears)
    finally:
        if hook is not None:
            hook.remove()
        for m in linears:
            del m.forward
