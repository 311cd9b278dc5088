"""Distillation of region-level relations computed from the ground-truth regions."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses._utils import check_dense, check_reduction, label_one_hot, reduce_batch

__all__ = ["RegionAffinityDistillation", "region_affinities", "region_centroids"]


def region_centroids(feature: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid of ``feature`` over each region of ``mask``, and the region sizes.

    Args:
        feature: (B, C, *spatial).
        mask: (B, K, *spatial) one-hot regions at the feature's size, channel 0 = background.

    Returns:
        centroids (B, K, C) and counts (B, K). Following EMKD's code, foreground sums are divided by ``count + 1``
        and the background by its count (guarded to at least 1: identical when background is present, a zero
        centroid instead of NaN when it is absent). The sums run in float32 even under autocast (a region sum
        over ~10^5 positions overflows float16).
    """
    with torch.autocast(device_type=feature.device.type, enabled=False):
        f = feature.float().flatten(2)  # (B, C, N)
        m = mask.float().flatten(2)  # (B, K, N)
        sums = torch.bmm(m, f.transpose(1, 2))  # (B, K, C)
    counts = m.sum(dim=2)
    denom = torch.cat([counts[:, :1].clamp_min(1.0), counts[:, 1:] + 1.0], dim=1)
    return sums / denom[..., None], counts


def region_affinities(feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (eps 1e-8) between the background centroid and each foreground-class centroid: (B, K - 1)."""
    cents, _ = region_centroids(feature, mask)
    return F.cosine_similarity(cents[:, :1].expand_as(cents[:, 1:]), cents[:, 1:], dim=2, eps=1e-8)


class RegionAffinityDistillation(nn.Module):
    """Region affinity distillation (RAD) of EMKD (Qin et al., TMI 2021).

    For each sample and each network, the centroid of the network's own feature over the background and over
    each foreground class (ground truth one-hot, resized to the feature size with nearest interpolation) is
    computed; the affinity is the cosine between the background and a foreground centroid. The loss is the
    squared difference of student and teacher affinities, averaged over foreground classes (a binary task has
    one), then reduced over the batch. A class absent from a sample has a zero centroid and contributes zero
    affinity to both networks, as in the official code (so it dilutes the mean).

    Args:
        num_classes: number of classes including background, used to one-hot a (B, 1, ...) label map
            (a (B, K, ...) one-hot label is used as it is).
        pairs: ``"background"`` (default): background-vs-class affinities as above. ``"all"``: the cosine of every
            class pair i < j whose two classes are present in the sample, averaged over those pairs (a sample with
            none contributes 0); the reference notes' reconstruction for multi-class labels. Both equal the
            official binary loss for two classes when the foreground is present.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student (B, Cs, *spatial), teacher (B, Ct, *spatial) with the same spatial size (channels may differ),
        label (B, 1, *full_spatial) class indices or (B, K, *full_spatial) one-hot. The teacher is detached.
    """

    def __init__(self, num_classes: int | None = None, pairs: str = "background", reduction: str = "mean"):
        super().__init__()
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
        if pairs not in ("background", "all"):
            raise ValueError(f"pairs must be 'background' or 'all', got {pairs!r}")
        self.num_classes = num_classes
        self.pairs = pairs
        self.reduction = check_reduction(reduction)

    def _all_pairs(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c_s, counts = region_centroids(student, mask)
        c_t, _ = region_centroids(teacher, mask)
        i, j = torch.triu_indices(mask.shape[1], mask.shape[1], offset=1, device=mask.device)
        a_s = F.cosine_similarity(c_s[:, i], c_s[:, j], dim=2, eps=1e-8)
        a_t = F.cosine_similarity(c_t[:, i], c_t[:, j], dim=2, eps=1e-8)
        present = (counts[:, i] > 0) & (counts[:, j] > 0)
        return ((a_s - a_t).pow(2) * present).sum(dim=1) / present.sum(dim=1).clamp_min(1)

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
        if self.pairs == "all":
            return reduce_batch(self._all_pairs(student, teacher.detach(), mask), self.reduction)
        a_s = region_affinities(student, mask)
        a_t = region_affinities(teacher.detach(), mask)
        return reduce_batch((a_s - a_t).pow(2).mean(dim=1), self.reduction)
