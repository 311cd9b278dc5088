"""Distillation of the teacher's softened predictions by relation (DIST) and by soft-label Dice."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

from medkd.losses._utils import check_dense, check_reduction, reduce_batch

__all__ = ["DISTLoss", "SoftDiceDistillation", "pearson_distance"]


def _check_logits(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    check_dense(name, student, teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ"
        )
    if student.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes on the channel axis, got shape {tuple(student.shape)}")


def pearson_distance(x: torch.Tensor, y: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """``1 - r`` with ``r`` the Pearson correlation of ``x`` and ``y`` along ``dim`` (the other axes are instances).

    ``r`` is the cosine similarity of the mean-centred vectors, ``eps`` is added to the product of their norms (a
    constant vector has ``r = 0``, distance 1). Invariant to ``x -> a x + b`` with ``a > 0`` constant along ``dim``.

    Returns:
        the distances, shape of ``x`` without ``dim``.
    """
    xc = x - x.mean(dim=dim, keepdim=True)
    yc = y - y.mean(dim=dim, keepdim=True)
    r = (xc * yc).sum(dim=dim) / (xc.norm(dim=dim) * yc.norm(dim=dim) + eps)
    return 1.0 - r


class DISTLoss(nn.Module):
    """DIST: distillation from a stronger teacher by the relations of the softened predictions (Huang et al.,
    "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022), in its dense (segmentation) form.

    With ``y = softmax(logits / T)`` over the class axis for student and teacher, every pixel/voxel of every sample
    is one instance:

    - **inter-class relation**: at each pixel, ``1 - pearson(y_s[:, p], y_t[:, p])`` over the ``C`` classes,
      averaged over the pixels of the whole batch;
    - **intra-class relation**: for each class ``c``, ``1 - pearson(y_s[c], y_t[c])`` over all ``B · H · W[· D]``
      pixels of the batch (the probability maps of that class), averaged over the classes;
    - ``loss = T² · (beta · inter + gamma · intra)``.

    This follows the authors' segmentation loss, which flattens ``(B, C, H, W)`` into ``B·H·W`` instances of ``C``
    classes (no temperature there, i.e. ``T = 1``, the paper's setting for Cityscapes), and their classification
    loss for ``T != 1``, which scales both relations by ``T²``. The Pearson correlation is invariant to a per-pixel
    positive affine change of the probabilities (inter) and a per-class one (intra), so DIST matches the relations
    of the teacher's predictions rather than their exact values, which a smaller student can follow more easily.

    The intra-class relation pools the pixels of the whole batch, so the loss is one value per batch (no per-sample
    ``reduction``). Computed in float32; the teacher is detached: gradients reach the student only.

    Args:
        beta: weight of the inter-class relation (paper: 1).
        gamma: weight of the intra-class relation (paper: 1).
        temperature: softmax temperature ``T`` (paper, segmentation: 1).
        eps: added to the product of the norms in the Pearson correlation.

    Shapes:
        student, teacher: logits (B, C, H, W[, D]) with C ≥ 2; returns a scalar.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, eps: float = 1e-8):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if beta < 0 or gamma < 0 or beta + gamma == 0:
            raise ValueError(f"beta and gamma must be >= 0 and not both 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma, self.temperature, self.eps = float(beta), float(gamma), float(temperature), float(eps)

    def relations(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unweighted, unscaled ``(inter, intra)`` relations of two logit maps."""
        _check_logits(type(self).__name__, student, teacher)
        t = self.temperature
        y_s = F.softmax(student.float() / t, dim=1)
        with torch.no_grad():
            y_t = F.softmax(teacher.float() / t, dim=1)
        inter = pearson_distance(y_s, y_t, dim=1, eps=self.eps).mean()
        classes = student.shape[1]
        y_s_c = y_s.transpose(0, 1).reshape(classes, -1)
        y_t_c = y_t.transpose(0, 1).reshape(classes, -1)
        intra = pearson_distance(y_s_c, y_t_c, dim=1, eps=self.eps).mean()
        return inter, intra

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        inter, intra = self.relations(student, teacher)
        return (self.temperature**2) * (self.beta * inter + self.gamma * intra)


class SoftDiceDistillation(nn.Module):
    """Soft-label Dice distillation: the Dice loss of the student's prediction against the teacher's probabilities.

    Built on MONAI's ``DiceLoss(softmax=True, soft_label=True)``: the target is ``softmax(teacher / T)`` and the input
    ``student / T`` (softmax inside the Dice loss). With ``soft_label=True`` MONAI uses the L1 form of the overlap
    (Wang et al., "Dice Semimetric Losses: Optimizing the Dice Score with Soft Labels", MICCAI 2023; "Jaccard
    Metric Losses", NeurIPS 2023), which is 0 exactly when the two probability maps are equal (up to the
    smoothing terms), unlike the product form with soft targets. No ``T²`` scaling: the Dice loss is bounded in
    [0, 1] whatever ``T`` (the papers use ``T = 1``). The papers' recipe mixes the label and the teacher half and half
    (``0.5 · Dice(label) + 0.5 · Dice(teacher)``): the label part is the task loss.

    Args:
        temperature: softmax temperature ``T`` of both networks (default 1).
        include_background: include class 0 in the Dice (as the bundles' task loss does).
        batch: one Dice per class over the whole batch (as the bundles' task loss, the default) instead of one per
            sample; a batch Dice has no per-sample values, so ``reduction`` other than ``"mean"`` needs ``batch=False``.
        smooth_nr, smooth_dr: MONAI's smoothing terms of the numerator and the denominator.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for the per-sample values (B,)
            (the last two with ``batch=False``); the Dice losses are averaged over the classes.

    Shapes:
        student, teacher: logits (B, C, H, W[, D]) with C ≥ 2. The teacher is detached: gradients reach the student
        only.
    """

    def __init__(self, temperature: float = 1.0, include_background: bool = True, batch: bool = True,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, reduction: str = "mean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.reduction = check_reduction(reduction)
        if batch and reduction != "mean":
            raise ValueError(f"reduction={reduction!r} (per-sample values) needs batch=False: a batch Dice has no "
                             "per-sample values")
        self.temperature, self.batch = float(temperature), bool(batch)
        self.dice = DiceLoss(include_background=include_background, softmax=True, soft_label=True, batch=batch,
                             smooth_nr=smooth_nr, smooth_dr=smooth_dr, reduction="none")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        _check_logits(type(self).__name__, student, teacher)
        t = self.temperature
        with torch.no_grad():
            target = F.softmax(teacher.float() / t, dim=1)
        per_class = self.dice(student.float() / t, target)  # (B, C, 1, ...) or, with batch=True, (C, 1, ...)
        if self.batch:
            return per_class.mean()
        return reduce_batch(per_class.flatten(1).mean(dim=1), self.reduction)
