"""Distillation of region-level relations computed from the ground-truth regions."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses._utils import check_dense, check_reduction, label_one_hot, reduce_batch

__all__ = ["RegionAffinityDistillation", "region_affinities"]


def region_affinities(feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the background centroid and each foreground-class centroid of ``feature``.

    Args:
        feature: (B, C, *spatial).
        mask: (B, K, *spatial) one-hot regions at the feature's size, channel 0 = background.

    Returns:
        (B, K - 1) affinities. Centroids follow EMKD's code: foreground sums are divided by ``count + 1``; the
        background by its count (guarded to at least 1, which changes nothing when background is present and
        gives a zero centroid, hence zero affinity, instead of NaN when it is absent).
    """
    f = feature.float().flatten(2)  # (B, C, N)
    m = mask.float().flatten(2)  # (B, K, N)
    sums = torch.einsum("bcn,bkn->bkc", f, m)
    counts = m.sum(dim=2)  # (B, K)
    c_bg = sums[:, :1] / counts[:, :1, None].clamp_min(1.0)
    c_fg = sums[:, 1:] / (counts[:, 1:, None] + 1.0)
    return F.cosine_similarity(c_bg.expand_as(c_fg), c_fg, dim=2, eps=1e-8)


class RegionAffinityDistillation(nn.Module):
    """Region affinity distillation (RAD) of EMKD (Qin et al., TMI 2021).

    For each sample and each network, the centroid of the network's own feature over the background and over
    each foreground class (ground truth one-hot, resized to the feature size with nearest interpolation) is
    computed; the affinity is the cosine between the background and a foreground centroid. The loss is the
    squared difference of student and teacher affinities, averaged over foreground classes (a binary task has
    one), then reduced over the batch. A class absent from a sample has a zero centroid and contributes zero
    affinity to both networks, as in the official code.

    Args:
        num_classes: number of classes including background, used to one-hot a (B, 1, ...) label map
            (a (B, K, ...) one-hot label is used as it is).
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student (B, Cs, *spatial), teacher (B, Ct, *spatial) with the same spatial size (channels may differ),
        label (B, 1, *full_spatial) class indices or (B, K, *full_spatial) one-hot. The teacher is detached.
    """

    def __init__(self, num_classes: int | None = None, reduction: str = "mean"):
        super().__init__()
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
        self.num_classes = num_classes
        self.reduction = check_reduction(reduction)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        check_dense(type(self).__name__, student, teacher, label)
        if student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"RegionAffinityDistillation needs equal spatial sizes; student {tuple(student.shape)}, "
                f"teacher {tuple(teacher.shape)}: tap both networks at the same stride"
            )
        # nearest resizing picks the same source pixel for every channel, so resizing the index map and then
        # one-hot encoding equals resizing the one-hot map, at a fraction of the cost
        small = F.interpolate(label.float(), size=student.shape[2:], mode="nearest")
        mask = label_one_hot(small, self.num_classes)
        if mask.shape[1] < 2:
            raise ValueError(f"label must have at least 2 classes, got one-hot shape {tuple(mask.shape)}")
        a_s = region_affinities(student, mask)
        a_t = region_affinities(teacher.detach(), mask)
        return reduce_batch((a_s - a_t).pow(2).mean(dim=1), self.reduction)
