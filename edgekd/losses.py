"""Distillation losses. Pure functions of tensors, so the math is testable on its own."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    kind: Literal["forward", "reverse"] = "forward",
) -> Tensor:
    """T² · KL between temperature-softened distributions, averaged over the batch.

    forward: KL(teacher ‖ student), mean-seeking (Hinton et al.); reverse: KL(student ‖ teacher),
    mode-seeking. The T² factor keeps gradient magnitudes comparable across temperatures.
    """
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    if kind == "forward":
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    elif kind == "reverse":
        kl = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")
    else:
        raise ValueError(f"kind must be 'forward' or 'reverse', got {kind!r}")
    return kl * (t * t)


def ensemble_logits(logits: list[Tensor], temperature: float) -> Tensor:
    """Logits whose temperature-``temperature`` softmax is the mean of the given models' softmaxes at
    that temperature (``T · log mean_i softmax(z_i / T)``): an ensemble's soft targets, usable wherever
    one teacher's logits are (``kd_kl``, ``soft_hard_loss``)."""
    if not logits:
        raise ValueError("ensemble_logits needs at least one model's logits")
    t = float(temperature)
    log_p = torch.stack([F.log_softmax(z.float() / t, dim=-1) for z in logits])
    return t * (torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(len(logits)))))


def soft_hard_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    alpha: float,
    temperature: float,
    kind: Literal["forward", "reverse"] = "forward",
) -> tuple[Tensor, dict[str, float]]:
    """α·T²·KL + (1−α)·CE(labels). With ``teacher_logits`` None (or α=0) it is plain cross-entropy."""
    ce = F.cross_entropy(student_logits.float(), labels)
    if teacher_logits is None or alpha == 0:
        return ce, {"ce": float(ce.detach())}
    kd = kd_kl(student_logits, teacher_logits, temperature, kind)
    loss = alpha * kd + (1 - alpha) * ce
    return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}


def teacher_labels_loss(student_logits: Tensor, teacher_labels: Tensor, labels: Tensor,
                        alpha: float) -> tuple[Tensor, dict[str, float]]:
    """A labels-only teacher: α·CE(the teacher's labels) + (1−α)·CE(the data's labels). No temperature
    and no KL: a one-hot target softened by T is still one-hot, and T² would only rescale the term."""
    t_ce = F.cross_entropy(student_logits.float(), teacher_labels)
    ce = F.cross_entropy(student_logits.float(), labels)
    return alpha * t_ce + (1 - alpha) * ce, {"ce": float(ce.detach()), "teacher_ce": float(t_ce.detach())}


def hidden_state_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor,
    kind: Literal["mse", "cosine"] = "cosine",
) -> Tensor:
    """Token-level matching of hidden states over real (unpadded) tokens.

    ``student_hidden`` must already be projected to the teacher's width.
    cosine: mean(1 − cos) as in DistilBERT; mse: mean squared error per element.
    """
    m = mask.to(student_hidden.dtype).unsqueeze(-1)
    s, t = student_hidden.float(), teacher_hidden.float()
    n_tokens = m.sum().clamp_min(1.0)
    if kind == "cosine":
        cos = F.cosine_similarity(s, t, dim=-1).unsqueeze(-1)
        return ((1 - cos) * m).sum() / n_tokens
    if kind == "mse":
        return (((s - t) ** 2) * m).sum() / (n_tokens * s.shape[-1])
    raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")


def attention_loss(student_att: Tensor, teacher_att: Tensor, mask: Tensor) -> Tensor:
    """KL(teacher ‖ student) between attention distributions, over real query tokens.

    Shapes (batch, heads, query, key). When head counts differ, both are averaged over heads first.
    """
    if student_att.shape[1] != teacher_att.shape[1]:
        student_att = student_att.mean(1, keepdim=True)
        teacher_att = teacher_att.mean(1, keepdim=True)
    eps = 1e-8
    s = student_att.float().clamp_min(eps)
    t = teacher_att.float().clamp_min(eps)
    kl = (t * (t.log() - s.log())).sum(-1)  # (batch, heads, query)
    q = mask.to(kl.dtype).unsqueeze(1)  # (batch, 1, query)
    return (kl * q).sum() / (q.sum() * kl.shape[1]).clamp_min(1.0)


def agreement(a_logits: Tensor, b_logits: Tensor) -> float:
    return float((a_logits.argmax(-1) == b_logits.argmax(-1)).float().mean())

