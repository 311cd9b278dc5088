"""Self-distillation losses of ACW-SKD (Yu et al., Sci. Rep. 2025): class-wise features built from an auxiliary
head's coarse prediction, inter-class prototype separation, masked feature reconstruction targets, and the
adversarial (learnable) temperature of CTKD (Li et al., AAAI 2023) behind a gradient-reversal layer.

ACW-SKD's code and method section are not public; the forms here are the reconstruction documented in the
``acw_skd_segmentation`` model card (which parts are published and which are this project's choices).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses._utils import check_dense, check_reduction, reduce_batch, resize_to

__all__ = [
    "AdversarialTemperatureKD",
    "FeatureReconstructionLoss",
    "InterClassSeparation",
    "LearnableTemperature",
    "UpsampledLoss",
    "class_wise_features",
    "cosine_ramp",
    "grad_reverse",
]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def grad_reverse(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Gradient-reversal layer as CTKD uses it: the identity forward; backward multiplies the incoming gradient
    by ``factor``. It does not negate by itself: the caller passes a negative factor (0 ... -1) to reverse."""
    return _GradReverse.apply(x, float(factor))


def cosine_ramp(epoch: int, start: float = 0.0, end: float = -1.0, epochs: int = 10) -> float:
    """CTKD's cosine schedule of the reversal factor: ``end + (start - end) * (cos(pi * e / epochs) + 1) / 2`` with
    ``e = min(epoch, epochs)``; epoch 0 gives ``start``, epochs ``>= epochs`` give ``end`` (1-based Ignite epochs)."""
    if epochs <= 0:
        return float(end)
    e = min(max(int(epoch), 0), int(epochs))
    return float(end + (start - end) * (math.cos(math.pi * e / epochs) + 1.0) / 2.0)


class LearnableTemperature(nn.Module):
    """CTKD's global learnable temperature: ``tau = t_start + t_end * sigmoid(GRL(theta, factor))``.

    ``theta`` (one scalar, initialised to ``init``) is trained by the student's optimiser; the gradient-reversal
    factor follows :func:`cosine_ramp` from ``factor_start`` to ``factor_end`` over ``ramp_epochs`` epochs (set by
    :meth:`set_epoch`, which :class:`medkd.engines.TermSchedule` calls at every epoch start), so ``theta`` ascends
    the distillation loss the student descends: the temperature makes the task harder as training goes on.

    Args:
        t_start: lowest temperature (1). t_end: range above it (20: tau in (1, 21), 15.62 at ``init`` 1).
        init: initial ``theta``. ramp_epochs, factor_start, factor_end: the reversal schedule (10, 0, -1).
        learnable: ``False`` keeps tau fixed at its initial value (no parameter; the ablation without the module).
    """

    def __init__(self, t_start: float = 1.0, t_end: float = 20.0, init: float = 1.0, ramp_epochs: int = 10,
                 factor_start: float = 0.0, factor_end: float = -1.0, learnable: bool = True):
        super().__init__()
        if t_start <= 0 or t_end < 0:
            raise ValueError(f"temperature needs t_start > 0 and t_end >= 0, got {t_start}, {t_end}")
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.ramp = (int(ramp_epochs), float(factor_start), float(factor_end))
        self.factor = float(factor_start)
        theta = torch.tensor(float(init))
        if learnable:
            self.theta = nn.Parameter(theta)
        else:
            self.register_buffer("theta", theta)

    def set_epoch(self, epoch: int) -> None:
        epochs, start, end = self.ramp
        self.factor = cosine_ramp(epoch, start, end, epochs)

    def forward(self) -> torch.Tensor:
        theta = grad_reverse(self.theta, self.factor) if self.theta.requires_grad else self.theta
        return self.t_start + self.t_end * torch.sigmoid(theta)


class AdversarialTemperatureKD(nn.Module):
    """ACW-SKD's adversarial temperature loss: pixel-wise logit distillation at a learnable temperature.

    ``tau² · mean over pixels/voxels of KL(softmax(teacher / tau) ‖ softmax(student / tau))`` with ``tau`` from a
    :class:`LearnableTemperature` (gradient reversal: the temperature is trained to *raise* this loss while the
    student lowers it). The teacher logits are detached (in ACW-SKD: the class-wise branch's logits teach the
    main head). The current ``tau`` is reported through :attr:`extra_scalars` (logged as ``raw_<term>_tau``).
    (Not :class:`PredictionMapDistillation`: that one builds the teacher side without a graph, but here ``tau``
    needs its gradient through both softmaxes.)

    Args:
        temperature: a :class:`LearnableTemperature` (default: CTKD's settings).
        reduction: over the batch, ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes: student, teacher (B, K, H, W[, D]), K >= 2, same shape.
    """

    def __init__(self, temperature: LearnableTemperature | None = None, reduction: str = "mean"):
        super().__init__()
        self.temperature = temperature if temperature is not None else LearnableTemperature()
        self.reduction = check_reduction(reduction)
        self.extra_scalars: dict[str, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.temperature.set_epoch(epoch)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        check_dense(type(self).__name__, student, teacher)
        if student.shape != teacher.shape or student.shape[1] < 2:
            raise ValueError(f"{type(self).__name__} needs equal (B, K>=2, ...) logits, got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        tau = self.temperature().float()
        log_p = F.log_softmax(student.float() / tau, dim=1)
        log_q = F.log_softmax(teacher.detach().float() / tau, dim=1)
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=1).flatten(1).mean(dim=1)
        self.extra_scalars = {"tau": tau.detach()}
        return reduce_batch(kl * tau * tau, self.reduction)


def class_wise_features(features: torch.Tensor, logits: torch.Tensor, eps: float = 1e-6,
                        detach_masks: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-wise features from a coarse prediction (the gather/scatter of OCR and IFVD, with predicted masks).

    ``M = softmax_k(logits)`` (resized to the feature size, bilinear/trilinear); class prototypes
    ``z_k = sum_i M_ki f_i / (sum_i M_ki + eps)``; every position gets its soft prototype
    ``f_cw_i = sum_k M_ki z_k``.

    Args:
        features: (B, C, *S). logits: (B, K, *S') coarse class logits (e.g. the auxiliary head's).
        eps: added to each class's mask mass. detach_masks: stop gradients through ``M``.

    Returns:
        ``(f_cw (B, C, *S), prototypes (B, K, C), mass (B, K))``; ``mass`` is each class's mask mass in pixels.
    """
    check_dense("class_wise_features", features, logits)
    masks = torch.softmax(resize_to(logits.float(), features.shape[2:]), dim=1)
    if detach_masks:
        masks = masks.detach()
    m = masks.flatten(2)  # (B, K, N)
    f = features.float().flatten(2)  # (B, C, N)
    mass = m.sum(dim=2)  # (B, K)
    prototypes = torch.bmm(m, f.transpose(1, 2)) / (mass.unsqueeze(2) + eps)  # (B, K, C)
    f_cw = torch.bmm(prototypes.transpose(1, 2), m)  # (B, C, N)
    return f_cw.view_as(features).to(features.dtype), prototypes, mass


class InterClassSeparation(nn.Module):
    """Inter-class prototype separation: mean over pairs of present classes of ``max(0, cos(z_k, z_l) - margin)²``.

    Prototypes ``z_k`` come from :func:`class_wise_features` of the feature map and the coarse logits, per sample;
    a class is present in a sample when its mask mass is at least ``min_mass`` pixels. Samples with fewer than two
    present classes contribute 0. This is ACW-SKD's "mitigating inter-class similarity" as reconstructed here.

    Args:
        margin: cosine similarity below which a pair is not penalised (0).
        min_mass: minimum mask mass (pixels/voxels) of a present class (1).
        reduction: over the batch.

    Shapes: features (B, C, *S), logits (B, K, *S').
    """

    def __init__(self, margin: float = 0.0, min_mass: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.margin, self.min_mass = float(margin), float(min_mass)
        self.reduction = check_reduction(reduction)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        _, prototypes, mass = class_wise_features(features, logits)
        u = F.normalize(prototypes, dim=2)
        sim = torch.bmm(u, u.transpose(1, 2))  # (B, K, K)
        present = (mass >= self.min_mass).float()
        pairs = present.unsqueeze(2) * present.unsqueeze(1)
        pairs = pairs * (1.0 - torch.eye(pairs.shape[1], device=pairs.device))
        penalty = (sim - self.margin).clamp_min(0).pow(2) * pairs
        per_sample = penalty.flatten(1).sum(1) / pairs.flatten(1).sum(1).clamp_min(1.0)
        return reduce_batch(per_sample, self.reduction)


class FeatureReconstructionLoss(nn.Module):
    """Mean squared error between a reconstruction and a detached target (ACW-SKD's FRM terms; MGD-style but
    averaged per element, weight 1, instead of MGD's sum / B with weight 2e-5).

    Shapes: reconstruction, target (B, C, *S), same shape; the target is detached.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if reconstruction.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: reconstruction {tuple(reconstruction.shape)} and target "
                             f"{tuple(target.shape)} differ")
        diff = reconstruction.float() - target.detach().float()
        return reduce_batch(diff.pow(2).flatten(1).mean(1), self.reduction)


class UpsampledLoss(nn.Module):
    """Apply a segmentation loss to logits resized to the label's spatial size (e.g. an auxiliary head that runs
    below full resolution): bilinear/trilinear, ``align_corners=False``; logits already at that size pass as is.

    Args:
        loss: any ``loss(logits, label)``, e.g. MONAI ``DiceCELoss``.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.loss(resize_to(logits, label.shape[2:]), label)
