"""Distillation of the output (logit) maps."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses._utils import check_dense, check_reduction, reduce_batch

__all__ = ["PredictionMapDistillation"]


class PredictionMapDistillation(nn.Module):
    """Pixel-wise logit distillation (Hinton et al., 2015), the PMD term of EMKD (Qin et al., TMI 2021).

    ``T² · KL(softmax(t / T) ‖ softmax(s / T))`` computed at every pixel/voxel over the class axis, then averaged
    over pixels/voxels (never summed: the value does not grow with the image size) and reduced over the batch.

    Args:
        temperature: softmax temperature ``T`` (EMKD: 4).
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for the per-sample values (B,).

    Shapes:
        student, teacher: logits (B, C, H, W[, D]) with C ≥ 2. Teacher log-probabilities work too (softmax is
        shift-invariant). The teacher is detached: gradients reach the student only.
    """

    def __init__(self, temperature: float = 4.0, reduction: str = "mean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.reduction = check_reduction(reduction)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        check_dense(type(self).__name__, student, teacher)
        if student.shape != teacher.shape:
            raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
        if student.shape[1] < 2:
            raise ValueError("PredictionMapDistillation needs at least 2 classes on the channel axis")
        t = self.temperature
        pixels = student[0, 0].numel()
        log_p = F.log_softmax(student.float() * (1.0 / t), dim=1)
        with torch.no_grad():  # KL = sum q log q - sum q log p; the first sum is a constant for the student
            log_q = F.log_softmax(teacher.float() * (1.0 / t), dim=1)
            q = log_q.exp()
            neg_entropy = log_q.mul_(q).flatten(1).sum(dim=1)
        cross = (q * log_p).flatten(1).sum(dim=1)
        return reduce_batch((neg_entropy - cross) * (t * t / pixels), self.reduction)
