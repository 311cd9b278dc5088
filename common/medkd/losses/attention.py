"""Distillation of spatial attention (importance) maps."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses._utils import check_dense, check_reduction, reduce_batch, resize_to

__all__ = ["ImportanceMapsDistillation", "attention_map"]


def _abs_pow(x: torch.Tensor, p: float) -> torch.Tensor:
    """``|x|^p``; integer exponents by repeated squaring (several times faster than ``pow`` on CPU).

    Without autograd (the teacher side) the squarings run in place on a temporary to save allocations.
    """
    if p != int(p) or p < 1:
        return x.abs().pow(p)
    n = int(p)
    in_place = not (torch.is_grad_enabled() and x.requires_grad)
    result = None
    base = x if n % 2 == 0 else x.abs()
    while n:
        if n & 1:
            result = base if result is None else result * base
        n >>= 1
        if n:
            base = base.mul_(base) if in_place and base is not x and base is not result else base * base
    return result


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """Channel mean of ``|F|^p``: (B, C, *spatial) -> (B, 1, *spatial), computed in float32."""
    return _abs_pow(feature.float(), p).mean(dim=1, keepdim=True)


class ImportanceMapsDistillation(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) as EMKD's importance-maps distillation (IMD).

    The attention map of a feature is the channel mean of ``|F|^p``, flattened and L2-normalised per sample; the
    loss is the squared L2 distance between the student's and the teacher's normalised maps, summed over
    positions, then reduced over the batch. Channel counts may differ (the map is channel-free).

    Args:
        p: exponent (EMKD's code: 4; classic attention transfer: 2).
        resize_feature: when spatial sizes differ, the student's *map* is resized to the teacher's size
            (default); ``True`` resizes the student *feature* before the map instead, as EMKD's official code
            does. Resizing is bilinear (trilinear in 3D), ``align_corners=False``.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student (B, Cs, *spatial_s), teacher (B, Ct, *spatial_t). The teacher is detached.
    """

    def __init__(self, p: float = 4.0, resize_feature: bool = False, reduction: str = "mean"):
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.p = float(p)
        self.resize_feature = bool(resize_feature)
        self.reduction = check_reduction(reduction)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        check_dense(type(self).__name__, student, teacher)
        if student.ndim != teacher.ndim:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in dimensionality")
        size = teacher.shape[2:]
        if self.resize_feature:
            student = resize_to(student, size)
        a_s = resize_to(attention_map(student, self.p), size)
        with torch.no_grad():
            a_t = attention_map(teacher, self.p)
        q_s = F.normalize(a_s.flatten(1), dim=1)
        q_t = F.normalize(a_t.flatten(1), dim=1)
        return reduce_batch((q_s - q_t).pow(2).sum(dim=1), self.reduction)
