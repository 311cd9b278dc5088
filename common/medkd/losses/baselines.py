"""Standard feature/logit KD baselines for dense prediction: AT, FitNet, CWD, SKD pair-wise, IFVD and FSP.

These are the comparison methods of the Graph Flow and GKD papers and the offline baselines of the CIRKD code base.
Vanilla pixel-wise logit KD is :class:`medkd.losses.PredictionMapDistillation`. Every loss here takes the student
first and the teacher second, detaches the teacher, works on 2D ``(B, C, H, W)`` and 3D ``(B, C, H, W, D)`` tensors,
and reduces over the batch with ``reduction`` (``"mean"``, ``"sum"``, or ``"none"`` for the per-sample values).
Where a loss owns a learned adapter (FitNet's regressor, CWD's channel adapter) it is a sub-module built from
MONAI's ``Conv`` factory, so the optimiser and DDP see it and it is never exported with the student.

Factor Transfer is not implemented: the reference notes give its paraphraser (architecture, MSE pretraining) but
neither the factor-transfer loss nor the student-side translator.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import Conv

from medkd.losses._utils import check_dense, check_reduction, reduce_batch, resize_to
from medkd.losses.attention import ImportanceMapsDistillation
from medkd.losses.graph import flow_matrix

__all__ = [
    "AttentionTransfer",
    "ChannelWiseDistillation",
    "FSPLoss",
    "FitNetHint",
    "IntraClassFeatureVariation",
    "PairwiseSimilarity",
]


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return int(spatial_dims)


def _conv1x1(in_channels: int, out_channels: int, spatial_dims: int) -> nn.Module:
    """A 1x1 (1x1x1) convolution without bias, MONAI's ``Conv[Conv.CONV, spatial_dims]``."""
    for name, value in (("student_channels", in_channels), ("teacher_channels", out_channels)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    return Conv[Conv.CONV, spatial_dims](int(in_channels), int(out_channels), kernel_size=1, bias=False)


def _check_pair(name: str, student: torch.Tensor, teacher: torch.Tensor, spatial_dims: int | None = None) -> None:
    check_dense(name, student, teacher)
    if student.ndim != teacher.ndim:
        raise ValueError(f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in "
                         "dimensionality")
    if spatial_dims is not None and student.ndim != spatial_dims + 2:
        raise ValueError(f"{name} was built for spatial_dims={spatial_dims} but got {student.ndim - 2}D tensors "
                         f"{tuple(student.shape)}")


def _check_channels(name: str, side: str, x: torch.Tensor, expected: int) -> None:
    if x.shape[1] != expected:
        raise ValueError(f"{name}: {side} has {x.shape[1]} channels, expected {expected} "
                         f"({side}_channels); got shape {tuple(x.shape)}")


class AttentionTransfer(ImportanceMapsDistillation):
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    The attention map of a feature is ``sum over channels of |F|^p`` (computed as the channel mean by
    :func:`medkd.losses.attention_map`; the factor ``1/C`` cancels in the normalisation), flattened and
    L2-normalised per sample. The loss is the squared difference of the student's and the teacher's normalised
    maps **averaged over positions** (the authors' code: ``(at(x) - at(y)).pow(2).mean()``), then reduced over the
    batch. It is EMKD's :class:`~medkd.losses.ImportanceMapsDistillation` (which sums over positions) divided by
    the number of positions of the teacher's map. Channel counts may differ: the map has one channel.

    Args:
        p: exponent (the paper's default and CIRKD's ``CriterionAT``: 2; GKD's baseline used 1; EMKD: 4).
        resize_feature: when spatial sizes differ, the student's attention *map* is resized to the teacher's size
            with :func:`~medkd.losses._utils.resize_to` (bilinear / trilinear, ``align_corners=False``; default);
            ``True`` resizes the student *feature* before computing its map instead.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student (B, Cs, *spatial_s), teacher (B, Ct, *spatial_t), 2D or 3D. The teacher is detached.
    """

    def __init__(self, p: float = 2.0, resize_feature: bool = False, reduction: str = "mean"):
        super().__init__(p=p, resize_feature=resize_feature, reduction=reduction)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return super().forward(student, teacher) / teacher[0, 0].numel()


class FitNetHint(nn.Module):
    """FitNets hint loss (Romero et al., ICLR 2015) with a learned 1x1 regressor, as CIRKD's ``CriterionFitNet``.

    The student feature goes through a 1x1 (1x1x1 in 3D) convolution without bias mapping ``student_channels`` to
    ``teacher_channels`` (owned by the loss, so it is trained with the student and never exported with it). If
    the spatial sizes differ, the regressed feature is resized to the teacher's size (bilinear / trilinear,
    ``align_corners=False``; a 1x1 convolution and this interpolation commute). The loss is the squared error
    averaged over channels and positions of each sample, then reduced over the batch.

    Args:
        student_channels: channels of the student feature.
        teacher_channels: channels of the teacher feature.
        spatial_dims: 2 or 3.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student (B, student_channels, *spatial_s), teacher (B, teacher_channels, *spatial_t). The teacher is
        detached.
    """

    def __init__(self, student_channels: int, teacher_channels: int, spatial_dims: int = 2, reduction: str = "mean"):
        super().__init__()
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.student_channels, self.teacher_channels = int(student_channels), int(teacher_channels)
        self.regressor = _conv1x1(student_channels, teacher_channels, self.spatial_dims)
        self.reduction = check_reduction(reduction)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_pair(name, student, teacher, self.spatial_dims)
        _check_channels(name, "student", student, self.student_channels)
        _check_channels(name, "teacher", teacher, self.teacher_channels)
        hint = resize_to(self.regressor(student), teacher.shape[2:]).float()
        diff = hint - teacher.detach().float()
        return reduce_batch(diff.pow(2).flatten(1).mean(dim=1), self.reduction)


class ChannelWiseDistillation(nn.Module):
    """Channel-wise distillation, CWD (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV
    2021), as mmrazor's ``ChannelWiseDivergence`` and CIRKD's ``CriterionCWD(norm_type='channel', divergence='kl')``.

    Each channel of a sample is turned into a distribution over its positions, ``phi(y_c) = softmax over H W [D] of
    y_c / tau``; the loss is ``tau^2 / (B C) * sum over b, c of KL(phi(y^T_{b,c}) || phi(y^S_{b,c}))``. Each KL is
    a sum over the positions of one distribution (the reference normalisation divides by ``B C``, not by the number
    of positions), so per sample the value is ``tau^2`` times the KL averaged over channels, then reduced over the
    batch (``"mean"`` reproduces the reference ``/ (N C)``). Works on logits or features.

    Args:
        temperature: ``tau`` (CIRKD's segmentation scripts: 4; mmrazor's Cityscapes config: 1).
        student_channels, teacher_channels: give both when the channel counts differ to add a learned 1x1
            (1x1x1) adapter without bias from student to teacher channels, owned by the loss (CIRKD's pattern).
            Equal counts (or ``None``) add no adapter.
        spatial_dims: 2 or 3 (used for the adapter).
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student (B, Cs, *spatial_s), teacher (B, Ct, *spatial_t). If the spatial sizes differ, the (adapted)
        student is resized to the teacher's size (bilinear / trilinear, ``align_corners=False``). The teacher is
        detached.
    """

    def __init__(self, temperature: float = 4.0, student_channels: int | None = None,
                 teacher_channels: int | None = None, spatial_dims: int = 2, reduction: str = "mean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("give both student_channels and teacher_channels (for the adapter) or neither, got "
                             f"student_channels={student_channels}, teacher_channels={teacher_channels}")
        self.temperature = float(temperature)
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.student_channels = None if student_channels is None else int(student_channels)
        self.teacher_channels = None if teacher_channels is None else int(teacher_channels)
        self.adapter = None
        if student_channels is not None and student_channels != teacher_channels:
            self.adapter = _conv1x1(student_channels, teacher_channels, self.spatial_dims)
        self.reduction = check_reduction(reduction)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_pair(name, student, teacher, self.spatial_dims)
        if self.student_channels is not None:
            _check_channels(name, "student", student, self.student_channels)
            _check_channels(name, "teacher", teacher, self.teacher_channels)
        if self.adapter is not None:
            student = self.adapter(student)
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in "
                             "channels; pass student_channels and teacher_channels to add an adapter")
        student = resize_to(student, teacher.shape[2:])
        t = self.temperature
        log_p = F.log_softmax(student.float().flatten(2) / t, dim=2)
        with torch.no_grad():
            log_q = F.log_softmax(teacher.detach().float().flatten(2) / t, dim=2)
            q = log_q.exp()
        kl = (q * (log_q - log_p)).sum(dim=2)  # (B, C): one KL per channel
        return reduce_batch(kl.mean(dim=1) * (t * t), self.reduction)


class PairwiseSimilarity(nn.Module):
    """Pair-wise distillation of structured KD, SKD (Liu et al., "Structured Knowledge Distillation for Semantic
    Segmentation", CVPR 2019), as its ``CriterionPairWiseforWholeFeatAfterPool``.

    Each feature is max-pooled into patches (window and stride ``max(1, int(size * scale))`` along every spatial
    axis of the teacher's map, ``ceil_mode=True``; SKD and GKD's baseline: ``scale=0.5``, i.e. a 2x2 grid of
    patches), L2-normalised along channels at every patch, and the ``N x N`` cosine-similarity matrix of the
    ``N`` patches is formed for student and teacher. The loss is the squared difference of the two matrices
    averaged over the ``N^2`` entries of each sample, then reduced over the batch. Channel counts may differ (the
    matrix is over positions); if the spatial sizes differ, the student feature is first resized to the
    teacher's size (bilinear / trilinear, ``align_corners=False``).

    SKD divides by a *detached* channel norm (plus 1e-8): same value, different gradient; here the norm is part
    of the graph (``F.normalize``, as CIRKD's ``CriterionStructuralKD``).

    Args:
        scale: pooling window as a fraction of the feature size, in (0, 1]; ``None`` for no pooling (memory and
            time grow with the square of the number of positions).
        pool: ``"max"`` (SKD) or ``"avg"``.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student (B, Cs, *spatial_s), teacher (B, Ct, *spatial_t). The teacher is detached.
    """

    def __init__(self, scale: float | None = 0.5, pool: str = "max", reduction: str = "mean"):
        super().__init__()
        if scale is not None and not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1] (or None for no pooling), got {scale}")
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        self.scale = None if scale is None else float(scale)
        self.pool = pool
        self.reduction = check_reduction(reduction)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return x
        kernel = tuple(max(1, int(s * self.scale)) for s in x.shape[2:])
        if self.pool == "max":
            pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
        else:
            pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
        return pool(x, kernel_size=kernel, stride=kernel, ceil_mode=True)

    def similarity(self, feature: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, N, N)`` cosine similarities between the pooled positions."""
        with torch.autocast(device_type=feature.device.type, enabled=False):  # float32 even under AMP
            f = F.normalize(self._pooled(feature.float()).flatten(2), dim=1, eps=1e-8)
            return torch.bmm(f.transpose(1, 2), f)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        _check_pair(type(self).__name__, student, teacher)
        sim_s = self.similarity(resize_to(student, teacher.shape[2:]))
        with torch.no_grad():
            sim_t = self.similarity(teacher.detach())
        return reduce_batch((sim_s - sim_t).pow(2).flatten(1).mean(dim=1), self.reduction)


class IntraClassFeatureVariation(nn.Module):
    """Intra-class feature variation distillation, IFVD (Wang et al., ECCV 2020), as CIRKD's ``CriterionIFV``.

    The label is resized to the feature size with nearest interpolation. For each network, sample and class the
    prototype is the masked mean of the feature (``sum / (count + 1e-6)``); the similarity map is the cosine
    (eps 1e-8) between each position's feature and its own class prototype. The loss is the squared difference
    of the student's and the teacher's similarity maps averaged over positions, then reduced over the batch.
    Positions whose label is outside ``[0, num_classes)`` (e.g. an ignore value 255) are compared with their own
    feature (cosine 1 in both networks), so they add zero but count in the average, as in CIRKD.

    No adapter is needed: each network is compared with its own prototypes, so the cosine maps do not depend on
    the channel counts. If the spatial sizes differ, the student feature is first resized to the teacher's size
    (bilinear / trilinear, ``align_corners=False``).

    Args:
        num_classes: number of classes including background.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Forward: ``loss(student, teacher, label)`` with student (B, Cs, *spatial_s), teacher (B, Ct, *spatial_t), label
    (B, 1, *spatial_label) class indices or (B, num_classes, *spatial_label) one-hot. The teacher is detached.
    """

    def __init__(self, num_classes: int, reduction: str = "mean"):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.reduction = check_reduction(reduction)

    @staticmethod
    def similarity_map(feature: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Cosine of every position's feature with its class prototype: (B, C, *sp), (B, K, *sp) -> (B, N)."""
        with torch.autocast(device_type=feature.device.type, enabled=False):  # class sums overflow float16
            f = feature.float().flatten(2)  # (B, C, N)
            m = masks.float().flatten(2)  # (B, K, N)
            protos = torch.bmm(m, f.transpose(1, 2)) / (m.sum(dim=2, keepdim=True) + 1e-6)  # (B, K, C)
            centres = torch.bmm(protos.transpose(1, 2), m) + (1.0 - m.sum(dim=1, keepdim=True)) * f  # (B, C, N)
            return F.cosine_similarity(f, centres, dim=1, eps=1e-8)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_pair(name, student, teacher)
        check_dense(name, student, label)
        if label.ndim != teacher.ndim or label.shape[1] not in (1, self.num_classes):
            raise ValueError(f"{name}: label must be (B, 1, ...) class indices or (B, {self.num_classes}, ...) one-hot "
                             f"with the features' dimensionality, got {tuple(label.shape)} for features "
                             f"{tuple(teacher.shape)}")
        if label.shape[1] > 1:
            label = label.argmax(dim=1, keepdim=True)
        size = teacher.shape[2:]
        small = F.interpolate(label.float(), size=size, mode="nearest")
        classes = torch.arange(self.num_classes, device=small.device, dtype=small.dtype)
        masks = (small == classes.view(1, -1, *([1] * len(size)))).float()  # (B, K, *size)
        sim_s = self.similarity_map(resize_to(student, size), masks)
        with torch.no_grad():
            sim_t = self.similarity_map(teacher.detach(), masks)
        return reduce_batch((sim_s - sim_t).pow(2).mean(dim=1), self.reduction)


class FSPLoss(nn.Module):
    """Flow of solution procedure, FSP (Yim et al., "A Gift from Knowledge Distillation", CVPR 2017).

    The FSP matrix of two taps of one network is ``G = F1 F2^T / N`` (``(B, C1, C2)``, ``N`` positions;
    :func:`medkd.losses.flow_matrix`). The loss is the paper's squared L2 distance between the student's and the
    teacher's matrices, summed over the ``C1 x C2`` entries of each sample, then reduced over the batch. One term
    is one pair of taps; the paper's sum over pairs is a sum of terms. If the two taps of one network differ in
    spatial size, the larger is adaptive-average-pooled to the smaller (the paper pairs taps of one size).
    The student's and teacher's matrices must have one shape: FSP has no adapter, so the paired taps need the
    same widths in both networks (e.g. via Graph Flow's paraphraser on the teacher side).

    Args:
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Forward: ``loss(s_first, s_second, t_first, t_second)``, each (B, C, *spatial), 2D or 3D. The teacher is
    detached.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_reduction(reduction)

    @staticmethod
    def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        size = tuple(min(a, b) for a, b in zip(first.shape[2:], second.shape[2:]))
        pool = F.adaptive_avg_pool2d if first.ndim == 4 else F.adaptive_avg_pool3d
        first = first if tuple(first.shape[2:]) == size else pool(first, size)
        second = second if tuple(second.shape[2:]) == size else pool(second, size)
        with torch.autocast(device_type=first.device.type, enabled=False):  # float32 even under AMP
            return flow_matrix(first.float(), second.float())

    def forward(self, s_first: torch.Tensor, s_second: torch.Tensor, t_first: torch.Tensor,
                t_second: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_dense(name, s_first, s_second, t_first, t_second)
        if len({x.ndim for x in (s_first, s_second, t_first, t_second)}) > 1:
            raise ValueError(f"{name}: taps differ in dimensionality: "
                             f"{[tuple(x.shape) for x in (s_first, s_second, t_first, t_second)]}")
        student = self.fsp_matrix(s_first, s_second)
        with torch.no_grad():
            teacher = self.fsp_matrix(t_first.detach(), t_second.detach())
        if student.shape != teacher.shape:
            raise ValueError(f"{name}: student FSP matrix {tuple(student.shape[1:])} and teacher FSP matrix "
                             f"{tuple(teacher.shape[1:])} differ; pair taps of equal widths in both networks")
        return reduce_batch((student - teacher).pow(2).flatten(1).sum(dim=1), self.reduction)
