"""Detection losses: YOLOv8's training loss (TAL assigner, BCE, CIoU, DFL) and detection KD.

Both work on the raw ``Detector`` outputs (``cls`` logits, ``dist`` DFL logits, neck ``feats``)
and compute in float32 whatever the autocast dtype of the forward pass, so bf16 training keeps
exact assignments and stable log-sums.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import DataError, EdgeKDError
from edgekd.tasks.detection.models import Detector, dfl_expectation, dist_to_boxes

# ---------------------------------------------------------------------------------------------
# Box geometry


def bbox_ciou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of matching xyxy boxes [..., 4] -> [...]: IoU minus the centre-distance and
    aspect-ratio penalties (Zheng et al. 2020), as Ultralytics computes it."""
    x1, y1, x2, y2 = b1.unbind(-1)
    u1, v1, u2, v2 = b2.unbind(-1)
    w1, h1 = x2 - x1, (y2 - y1).clamp(min=eps)
    w2, h2 = u2 - u1, (v2 - v1).clamp(min=eps)
    inter = (torch.minimum(x2, u2) - torch.maximum(x1, u1)).clamp(min=0) * \
        (torch.minimum(y2, v2) - torch.maximum(y1, v1)).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(x2, u2) - torch.minimum(x1, u1)
    ch = torch.maximum(y2, v2) - torch.minimum(y1, v1)
    c2 = cw.square() + ch.square() + eps
    rho2 = ((u1 + u2 - x1 - x2).square() + (v1 + v2 - y1 - y2).square()) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).square()
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


# ---------------------------------------------------------------------------------------------
# Task-aligned assigner (TOOD / YOLOv8)


@torch.no_grad()
def task_aligned_assign(
    pd_scores: torch.Tensor,
    pd_boxes: torch.Tensor,
    anchors: torch.Tensor,
    gt_classes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_mask: torch.Tensor,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign each gt box the ``topk`` anchors inside it with the best alignment
    ``score^alpha * CIoU^beta``; an anchor claimed by several gts goes to the one it overlaps most.

    Inputs: scores [B,N,C] (probabilities), boxes [B,N,4] and anchors [N,2] in pixels, gt classes
    [B,M], boxes [B,M,4], mask [B,M]. Returns target boxes [B,N,4], target scores [B,N,C] (one-hot
    scaled by the normalised alignment, so the best-aligned anchor of each gt gets its best IoU),
    the foreground mask [B,N] and the assigned gt index [B,N].
    """
    b, n, c = pd_scores.shape
    m = gt_boxes.shape[1]
    if m == 0:  # no gt rows at all in this batch: everything is background
        return (torch.zeros_like(pd_boxes), torch.zeros_like(pd_scores),
                torch.zeros(b, n, dtype=torch.bool, device=pd_scores.device),
                torch.zeros(b, n, dtype=torch.long, device=pd_scores.device))
    mask_gt = gt_mask.unsqueeze(-1) > 0  # [B,M,1]
    # candidates: anchor centres strictly inside the gt box
    lt = anchors[None, None] - gt_boxes[:, :, None, :2]
    rb = gt_boxes[:, :, None, 2:] - anchors[None, None]
    in_gts = torch.cat([lt, rb], -1).amin(-1) > eps  # [B,M,N]
    cand = in_gts & mask_gt
    labels = gt_classes.clamp(0, c - 1)
    bbox_scores = pd_scores.transpose(1, 2).gather(1, labels.unsqueeze(-1).expand(-1, -1, n))  # [B,M,N]
    overlaps = bbox_ciou(gt_boxes[:, :, None, :], pd_boxes[:, None, :, :]).clamp(min=0) * cand
    align = bbox_scores.pow(alpha) * overlaps.pow(beta) * cand
    k = min(topk, n)
    top_idx = align.topk(k, dim=-1).indices
    mask_top = torch.zeros_like(align).scatter_(-1, top_idx, 1.0)
    mask_pos = mask_top * cand  # [B,M,N]
    # one gt per anchor: the highest-overlap gt where several claim it
    fg = mask_pos.sum(1)  # [B,N]
    multi = (fg > 1).unsqueeze(1).expand(-1, m, -1)
    best = F.one_hot(overlaps.argmax(1), m).permute(0, 2, 1).to(mask_pos.dtype)
    mask_pos = torch.where(multi, best, mask_pos)
    fg_mask = mask_pos.sum(1) > 0
    gt_idx = mask_pos.argmax(1)  # [B,N]
    tgt_labels = labels.gather(1, gt_idx)
    tgt_boxes = gt_boxes.gather(1, gt_idx.unsqueeze(-1).expand(-1, -1, 4))
    tgt_scores = F.one_hot(tgt_labels, c).to(pd_scores.dtype) * fg_mask.unsqueeze(-1)
    # normalise the alignment per gt so its best anchor's target equals that gt's best IoU
    align = align * mask_pos
    pos_align = align.amax(-1, keepdim=True)
    pos_overlap = (overlaps * mask_pos).amax(-1, keepdim=True)
    norm = (align * pos_overlap / (pos_align + eps)).amax(1).unsqueeze(-1)  # [B,N,1]
    return tgt_boxes, tgt_scores * norm, fg_mask, gt_idx


# ---------------------------------------------------------------------------------------------
# YOLOv8 detection loss


def _check_batch(batch: dict[str, Any], num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        boxes, classes, mask = batch["gt_boxes"], batch["gt_classes"], batch["gt_mask"]
    except KeyError as e:
        raise DataError(f"detection batch has no {e}; batches need images, gt_boxes, gt_classes and gt_mask "
                        "(DetectionSplit.collate)") from None
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or classes.shape != boxes.shape[:2] or mask.shape != boxes.shape[:2]:
        raise DataError(f"detection batch shapes disagree: gt_boxes {tuple(boxes.shape)} (want [B,M,4]), "
                        f"gt_classes {tuple(classes.shape)} and gt_mask {tuple(mask.shape)} (want [B,M]).")
    boxes, classes, mask = (torch.as_tensor(t) for t in (boxes, classes, mask))  # numpy from collate() too
    real = mask > 0
    if real.any() and int(classes[real].max()) >= num_classes:
        raise DataError(f"a gt class id is {int(classes[real].max())} but the detector has {num_classes} "
                        "classes; build it with the dataset's number of classes.")
    return boxes.float(), classes.long(), mask.float()


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def df_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution Focal Loss: cross-entropy to the two bins around each continuous target,
    weighted by closeness (Li et al. 2020). pred [K,4,R] logits, target [K,4] in bins -> [K]."""
    tl = target.long()
    wl = tl + 1 - target
    logp = pred.log_softmax(-1)
    lo = logp.gather(-1, tl.unsqueeze(-1)).squeeze(-1)
    hi = logp.gather(-1, (tl + 1).unsqueeze(-1)).squeeze(-1)
    return -(lo * wl + hi * (1 - wl)).mean(-1)


class DetectionLoss:
    """YOLOv8's loss: TAL assignment, BCE on aligned class targets, CIoU and DFL on foreground
    anchors weighted by their target score; everything divided by the target score sum, so the
    scale does not depend on the batch size or the number of objects."""

    def __init__(self, *, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5, topk: int = 10,
                 alpha: float = 0.5, beta: float = 6.0):
        self.w_box, self.w_cls, self.w_dfl = box, cls, dfl
        self.topk, self.alpha, self.beta = topk, alpha, beta

    def __call__(self, out: dict, model: Detector, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        cls_logits = out["cls"].float()
        dist = out["dist"].float()
        b, n, c = cls_logits.shape
        r = model.reg_max
        gt_boxes, gt_classes, gt_mask = _check_batch(batch, c)
        gt_boxes, gt_classes, gt_mask = (t.to(cls_logits.device) for t in (gt_boxes, gt_classes, gt_mask))
        anchors, stride = model.grid(*batch["images"].shape[-2:])
        if anchors.shape[0] != n:
            raise EdgeKDError(f"the outputs have {n} locations but a {tuple(batch['images'].shape[-2:])} input "
                              f"has {anchors.shape[0]}; pass the batch the outputs were computed from.")
        pd_boxes = dist_to_boxes(dfl_expectation(dist, r), anchors, stride)  # pixels
        tgt_boxes, tgt_scores, fg, _ = task_aligned_assign(
            cls_logits.detach().sigmoid(), pd_boxes.detach(), anchors, gt_classes, gt_boxes, gt_mask,
            topk=self.topk, alpha=self.alpha, beta=self.beta)
        tss = tgt_scores.sum().clamp(min=1.0)
        l_cls = F.binary_cross_entropy_with_logits(cls_logits, tgt_scores, reduction="sum") / tss
        if fg.any():
            weight = tgt_scores.sum(-1)[fg]  # [K]
            tb = tgt_boxes[fg]
            l_box = ((1.0 - bbox_ciou(pd_boxes[fg], tb)) * weight).sum() / tss
            anc, st = anchors.expand(b, -1, -1)[fg], stride.expand(b, -1, -1)[fg]
            ltrb = (torch.cat([anc - tb[:, :2], tb[:, 2:] - anc], -1) / st).clamp(0, r - 1 - 0.01)  # in bins
            l_dfl = (df_loss(dist[fg].reshape(-1, 4, r), ltrb) * weight).sum() / tss
        else:  # no objects: the box terms are zero but stay in the graph
            l_box = l_dfl = dist.sum() * 0.0
        total = self.w_box * l_box + self.w_cls * l_cls + self.w_dfl * l_dfl
        return total, {"box": _f(l_box), "cls": _f(l_cls), "dfl": _f(l_dfl)}


# ---------------------------------------------------------------------------------------------
# Knowledge distillation for detectors


def _binary_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-element KL(Bernoulli(sigmoid t) || Bernoulli(sigmoid s)) from logits: BCE to the
    teacher's soft target minus the teacher's own entropy, so it is 0 when the logits agree
    (same gradient as plain BCE)."""
    p = t.sigmoid()
    return F.binary_cross_entropy_with_logits(s, p, reduction="none") - \
        F.binary_cross_entropy_with_logits(t, p, reduction="none")


class DetectionKD(nn.Module):
    """Detection distillation terms; its projectors/generators are trained with the student.

    (a) ``kd_cls``: binary KL of class scores at temperature T (x T^2), summed over classes;
    (b) ``kd_box``: KL(teacher || student) of the DFL bin distributions at T (x T^2), mean over
    the 4 sides. Both are weighted per location by the teacher's best class probability and
    normalised by the weight sum, so the many background cells do not dominate.
    (c) ``kd_feat``: imitation of each neck output through a learned 1x1 projector: ``cwd``
    (channel-wise spatial softmax KL at T, x T^2; Shu et al. 2021), ``mgd`` (mask the projected
    student feature, regenerate the teacher's with conv-ReLU-conv, MSE; Yang et al. 2022) or
    ``mse``; mean over levels. A zero weight skips its term and creates no parameters.
    """

    def __init__(
        self,
        student_channels: list[int],
        teacher_channels: list[int],
        *,
        cls_weight: float,
        box_weight: float,
        feature_weight: float,
        temperature: float,
        feature_method: Literal["cwd", "mgd", "mse"],
        mgd_mask_ratio: float = 0.65,
    ):
        super().__init__()
        if feature_method not in ("cwd", "mgd", "mse"):
            raise EdgeKDError(f"feature_method must be 'cwd', 'mgd' or 'mse', got {feature_method!r}.")
        if temperature <= 0:
            raise EdgeKDError(f"temperature must be > 0, got {temperature}.")
        if not 0.0 <= mgd_mask_ratio < 1.0:
            raise EdgeKDError(f"mgd_mask_ratio must be in [0, 1), got {mgd_mask_ratio}.")
        if feature_weight and len(student_channels) != len(teacher_channels):
            raise EdgeKDError(f"student has {len(student_channels)} feature levels, teacher "
                              f"{len(teacher_channels)}; feature KD pairs them level by level.")
        self.cls_weight, self.box_weight, self.feature_weight = cls_weight, box_weight, feature_weight
        self.temperature = float(temperature)
        self.feature_method = feature_method
        self.mgd_mask_ratio = mgd_mask_ratio
        self.projectors = nn.ModuleList()
        self.generators = nn.ModuleList()
        if feature_weight:
            for cs, ct in zip(student_channels, teacher_channels, strict=True):
                proj = nn.Conv2d(cs, ct, 1)
                if cs == ct:  # start as the identity: equal features give zero loss from step 0
                    with torch.no_grad():
                        proj.weight.copy_(torch.eye(ct).reshape(ct, ct, 1, 1))
                        proj.bias.zero_()
                self.projectors.append(proj)
                if feature_method == "mgd":
                    self.generators.append(nn.Sequential(
                        nn.Conv2d(ct, ct, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(ct, ct, 3, padding=1)))

    def _weights(self, t_cls: torch.Tensor) -> torch.Tensor:
        w = t_cls.detach().float().sigmoid().amax(-1)  # [B,N]
        return w / w.sum().clamp(min=1e-6)

    def _feature(self, s: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        s = self.projectors[i](s.to(self.projectors[i].weight.dtype)).float()
        t = t.detach().float()
        if s.shape != t.shape:
            raise EdgeKDError(f"feature level {i}: projected student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                              "student and teacher must see the same input size.")
        if self.feature_method == "mse":
            return F.mse_loss(s, t)
        if self.feature_method == "mgd":
            keep = (torch.rand(s.shape[0], 1, *s.shape[2:], device=s.device) >= self.mgd_mask_ratio).to(s.dtype)
            return F.mse_loss(self.generators[i](s * keep), t)
        T = self.temperature  # cwd: each channel's spatial map as a distribution
        ls = (s.flatten(2) / T).log_softmax(-1)
        lt = (t.flatten(2) / T).log_softmax(-1)
        return (lt.exp() * (lt - ls)).sum(-1).mean() * T * T

    def forward(self, s_out: dict, t_out: dict) -> tuple[torch.Tensor, dict[str, float]]:
        T = self.temperature
        s_cls, t_cls = s_out["cls"].float(), t_out["cls"].detach().float()
        if s_cls.shape != t_cls.shape:
            raise EdgeKDError(f"student cls {tuple(s_cls.shape)} vs teacher {tuple(t_cls.shape)}: KD needs the "
                              "same classes and input size for both.")
        zero = s_cls.sum() * 0.0
        total, logs = zero, {"kd_cls": 0.0, "kd_box": 0.0, "kd_feat": 0.0}
        w = self._weights(t_cls) if (self.cls_weight or self.box_weight) else None
        if self.cls_weight:
            kd_cls = (_binary_kl(s_cls / T, t_cls / T).sum(-1) * w).sum() * T * T
            total = total + self.cls_weight * kd_cls
            logs["kd_cls"] = _f(kd_cls)
        if self.box_weight:
            s_d, t_d = s_out["dist"].float(), t_out["dist"].detach().float()
            if s_d.shape != t_d.shape:
                raise EdgeKDError(f"student dist {tuple(s_d.shape)} vs teacher {tuple(t_d.shape)}: box KD needs "
                                  "the same reg_max and input size for both.")
            b, n, _ = s_d.shape
            ls = (s_d.reshape(b, n, 4, -1) / T).log_softmax(-1)
            lt = (t_d.reshape(b, n, 4, -1) / T).log_softmax(-1)
            kl = (lt.exp() * (lt - ls)).sum(-1).mean(-1)  # [B,N]
            kd_box = (kl * w).sum() * T * T
            total = total + self.box_weight * kd_box
            logs["kd_box"] = _f(kd_box)
        if self.feature_weight:
            s_f, t_f = s_out["feats"], t_out["feats"]
            if len(s_f) != len(self.projectors) or len(t_f) != len(self.projectors):
                raise EdgeKDError(f"feature KD was built for {len(self.projectors)} levels, got student "
                                  f"{len(s_f)} and teacher {len(t_f)}.")
            kd_feat = sum(self._feature(s, t, i) for i, (s, t) in enumerate(zip(s_f, t_f, strict=True))) / len(s_f)
            total = total + self.feature_weight * kd_feat
            logs["kd_feat"] = _f(kd_feat)
        return total, logs
