"""Helpers shared by the KD losses: batch reduction, shape checks, spatial resizing, label one-hot."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.utils import one_hot

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_batch(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a per-sample loss of shape (B,): ``mean`` over the batch, ``sum``, or ``none`` (kept as (B,))."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def check_dense(name: str, *tensors: torch.Tensor) -> None:
    """Every tensor must be (B, C, H, W[, D]) with one batch size."""
    for t in tensors:
        if t.ndim not in (4, 5):
            raise ValueError(f"{name} expects (B, C, H, W[, D]) tensors, got shape {tuple(t.shape)}")
    if len({t.shape[0] for t in tensors}) > 1:
        raise ValueError(f"{name}: batch sizes differ: {[tuple(t.shape) for t in tensors]}")


def resize_to(x: torch.Tensor, size) -> torch.Tensor:
    """Resize (B, C, *spatial) to ``size``: bilinear in 2D, trilinear in 3D, ``align_corners=False``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def label_one_hot(label: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """(B, 1, *spatial) class indices -> (B, K, *spatial) float one-hot; a (B, K>1, *spatial) label is taken as one-hot."""
    if label.shape[1] > 1:
        return label.float()
    if num_classes is None:
        raise ValueError("num_classes is required to one-hot encode a (B, 1, ...) label map")
    return one_hot(label.long(), num_classes=num_classes, dim=1).float()
