"""The papers' evaluation protocols as plain functions and small accumulators.

Each protocol reproduces what the released evaluation code computes, so that numbers are comparable with the paper
that used it. The protocols are **not** comparable with each other (different thresholds, crops and pooling):

- :class:`EMKDProtocol`: EMKD (Qin et al., TMI 2021), per-case Dice/VOE/RVD over the listed slices, threshold 0.4.
- :class:`TransUNetProtocol`: TransUNet's Synapse protocol (also Graph Flow's Synapse protocol), medpy Dice and HD95
  per organ and case, with TransUNet's empty-mask conventions.
- :class:`GraphFlowProtocol`: Graph Flow's Gastric protocol, pixel ACC and mIoU from one confusion matrix over the test
  set, on a 64x64 window.
- :class:`GKDProtocol`: GKD's ``test.py`` (Qi et al., JBHI 2024), ACC, Se, Sp, F1, IoU/mIoU from one confusion
  matrix over the test set, and the pixel-level ROC AUC of the foreground probability.
- :class:`PooledBinaryProtocol`: MTMS-CKD's dataset-pooled Dice/IoU/precision/recall.
- :func:`per_case_dice_hd95`: the project's common per-case Dice and HD95 (MONAI definitions).

Label maps are integer (or boolean) numpy arrays or torch tensors without a channel axis.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from medkd.io import atomic_write_bytes

__all__ = [
    "GASTRIC_CROP_START",
    "EMKDProtocol",
    "GKDProtocol",
    "GraphFlowProtocol",
    "PooledBinaryProtocol",
    "TransUNetProtocol",
    "center_crop_2d",
    "confusion_matrix",
    "emkd_binarize",
    "medpy_hd95",
    "mtms_binarize",
    "per_case_dice_hd95",
    "roc_auc",
    "transunet_case_metrics",
    "write_results",
]

#: Start row/column of Graph Flow's Gastric window, ``[95:159, 95:159]`` of the 256x256 image as released
#: (``test.py``); the exact centre of 256 would start at 96.
GASTRIC_CROP_START = 95


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _label_map(x, name: str) -> np.ndarray:
    x = _to_numpy(x)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise ValueError(f"{name} must be an integer or boolean label map, got dtype {x.dtype}")
    return x


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} and ground-truth shape {gt.shape} differ")


def _check_label_range(x: np.ndarray, num_classes: int, name: str) -> None:
    if x.size and (x.min() < 0 or x.max() >= num_classes):
        raise ValueError(f"{name} has labels outside [0, {num_classes}): min {x.min()}, max {x.max()}")


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background and one foreground class), got {num_classes}")


def _ratio(num: float, den: float) -> float:
    """``num / den`` as a float, NaN when ``den`` is 0."""
    return float(num) / float(den) if den else math.nan


# --------------------------------------------------------------------------------------------------------------- EMKD
def emkd_binarize(probabilities, threshold: float = 0.4, channel_dim: int = 0) -> np.ndarray:
    """EMKD's prediction: foreground where the softmax probability of channel 1 is strictly above ``threshold``.

    Follows ``utils/base_pl_model.py::measure`` of EagleMIT/EMKD (``softmax(output)[:, 1:] > 0.4``).

    Args:
        probabilities: softmax probabilities with at least 2 channels on ``channel_dim``, e.g. ``(C, H, W)`` for one
            slice or ``(B, C, H, W)`` with ``channel_dim=1``.
        threshold: strict threshold on the channel-1 probability (0.4 in EMKD).
        channel_dim: the channel axis.

    Returns:
        boolean mask, the input shape without the channel axis.
    """
    p = _to_numpy(probabilities)
    if p.ndim < 2:
        raise ValueError(f"probabilities need a channel axis and spatial axes, got shape {p.shape}")
    if p.shape[channel_dim] < 2:
        raise ValueError(f"probabilities need at least 2 channels on axis {channel_dim}, got shape {p.shape}")
    return np.take(p, 1, axis=channel_dim) > threshold


class EMKDProtocol:
    """EMKD's per-case Dice, VOE and RVD (Qin et al., "Efficient Medical Image Segmentation Based on Knowledge
    Distillation", IEEE TMI 2021; code ``utils/base_pl_model.py``, methods ``measure`` and ``test_epoch_end``).

    For each case the predicted (P), ground-truth (G) and intersection (I) voxel counts are summed over all of that
    case's slices given to :meth:`update` (EMKD lists only target-containing slices). Per case::

        Dice = (2I + 1) / (P + G + 1),  VOE = 2(P - I) / (P + G),  RVD = P / G - 1

    and :meth:`summary` averages them over the cases with G > 0. EMKD adds 1e-7 to the VOE and RVD denominators; here
    they are exact (G > 0 for every averaged case), so results differ by at most ~1e-7 relative. Binary task only.
    Plain numpy counting; no MONAI piece fits the +1 smoothing.

    Args:
        threshold: strict threshold on the softmax channel-1 probability when :meth:`update` gets probabilities.
        channel_dim: channel axis of those probabilities.
    """

    def __init__(self, threshold: float = 0.4, channel_dim: int = 0) -> None:
        self.threshold = threshold
        self.channel_dim = channel_dim
        self._counts: dict[Hashable, np.ndarray] = {}

    def update(self, case_id: Hashable, pred, gt) -> None:
        """Add slices of one case.

        Args:
            case_id: the case (volume) the slices belong to.
            pred: softmax probabilities, ``gt``'s shape with a channel axis inserted at ``channel_dim`` (thresholded
                with :func:`emkd_binarize`), or a binary mask / label map of ``gt``'s shape (foreground = nonzero).
            gt: binary mask or label map (foreground = nonzero), e.g. ``(H, W)`` or ``(S, H, W)``.
        """
        gt = _label_map(gt, "gt") != 0
        pred = _to_numpy(pred)
        if pred.ndim == gt.ndim + 1:
            if np.delete(np.array(pred.shape), self.channel_dim).tolist() != list(gt.shape):
                raise ValueError(
                    f"probabilities shape {pred.shape} is not ground-truth shape {gt.shape} with a channel axis at "
                    f"{self.channel_dim}"
                )
            pred = emkd_binarize(pred, self.threshold, self.channel_dim)
        else:
            _check_same_shape(pred, gt)
            pred = _label_map(pred, "pred") != 0
        counts = np.array([pred.sum(), gt.sum(), np.logical_and(pred, gt).sum()], dtype=np.int64)
        self._counts[case_id] = self._counts.get(case_id, 0) + counts

    def per_case(self) -> list[dict]:
        """One row per case: ``case``, ``P``, ``G``, ``I`` and float ``dice``, ``voe``, ``rvd``.

        VOE is NaN when P + G = 0 and RVD is NaN when G = 0 (such cases are left out of :meth:`summary`).
        """
        rows = []
        for case_id, (p, g, i) in self._counts.items():
            rows.append(
                {
                    "case": case_id,
                    "P": int(p),
                    "G": int(g),
                    "I": int(i),
                    "dice": float((2.0 * i + 1.0) / (p + g + 1.0)),
                    "voe": _ratio(2 * (p - i), p + g),
                    "rvd": _ratio(p, g) - 1.0,
                }
            )
        return rows

    def summary(self) -> dict:
        """Means of ``dice``, ``voe``, ``rvd`` over the cases with G > 0 and their number ``num_cases``
        (means are NaN when there is none)."""
        rows = [r for r in self.per_case() if r["G"] > 0]
        out = {k: float(np.mean([r[k] for r in rows])) if rows else math.nan for k in ("dice", "voe", "rvd")}
        out["num_cases"] = len(rows)
        return out


# ---------------------------------------------------------------------------------------------------------- TransUNet
def _surface(mask: np.ndarray, connectivity: int) -> np.ndarray:
    footprint = generate_binary_structure(mask.ndim, connectivity)
    return mask & ~binary_erosion(mask, structure=footprint, iterations=1)


def medpy_hd95(pred, gt, spacing: Sequence[float] | float | None = None, connectivity: int = 1) -> float:
    """95th percentile of the symmetric surface distances, as ``medpy.metric.binary.hd95``.

    The surface of a mask is the mask minus its erosion by the ``connectivity`` footprint (voxels on the array edge
    count as surface). The distances from each pred-surface voxel to the nearest gt-surface voxel and from each
    gt-surface voxel to the nearest pred-surface voxel (scipy ``distance_transform_edt``) are **pooled** and their
    95th percentile (numpy linear interpolation) is returned. MONAI's ``compute_hausdorff_distance(percentile=95)``
    instead takes the max of the two directed 95th percentiles, which is >= this value; that is why this protocol
    does not use it.

    Args:
        pred: binary mask (nonzero = object), 2D or 3D.
        gt: binary mask of the same shape.
        spacing: voxel spacing per axis (or one number for all); None gives voxel units (TransUNet's setting).
        connectivity: footprint connectivity for the surface, 1 as in medpy.

    Raises:
        ValueError: on a shape mismatch or when either mask is empty (medpy raises RuntimeError there).
    """
    pred = _to_numpy(pred).astype(bool)
    gt = _to_numpy(gt).astype(bool)
    _check_same_shape(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("HD95 is undefined when the prediction or the ground truth is empty")
    pred_surface, gt_surface = _surface(pred, connectivity), _surface(gt, connectivity)
    d_pred_to_gt = distance_transform_edt(~gt_surface, sampling=spacing)[pred_surface]
    d_gt_to_pred = distance_transform_edt(~pred_surface, sampling=spacing)[gt_surface]
    return float(np.percentile(np.concatenate([d_pred_to_gt, d_gt_to_pred]), 95))


def transunet_case_metrics(pred, gt, num_classes: int, spacing: Sequence[float] | float | None = None) -> dict:
    """Per-organ Dice and HD95 of one case with TransUNet's conventions (``utils.py::calculate_metric_percase`` of
    TransUNet, also Graph Flow's ``test.py``).

    For each class c in 1..num_classes-1, with binary masks ``pred == c`` and ``gt == c``:

    - both non-empty: medpy Dice ``2|A∩B| / (|A| + |B|)`` and :func:`medpy_hd95`;
    - prediction non-empty, ground truth empty: (1, 0);
    - prediction empty (whatever the ground truth): (0, 0).

    Args:
        pred: predicted label map, e.g. ``(D, H, W)``.
        gt: ground-truth label map of the same shape.
        num_classes: number of classes including background (9 for Synapse).
        spacing: voxel spacing for HD95; None gives voxel units, as TransUNet.

    Returns:
        ``{"dice_class{c}": float, "hd95_class{c}": float, ...}`` for c in 1..num_classes-1.
    """
    _check_num_classes(num_classes)
    pred, gt = _label_map(pred, "pred"), _label_map(gt, "gt")
    _check_same_shape(pred, gt)
    _check_label_range(pred, num_classes, "pred")
    _check_label_range(gt, num_classes, "gt")
    out = {}
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        if p.any() and g.any():
            dice = 2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum())
            hd95 = medpy_hd95(p, g, spacing=spacing)
        elif p.any():
            dice, hd95 = 1.0, 0.0
        else:
            dice, hd95 = 0.0, 0.0
        out[f"dice_class{c}"], out[f"hd95_class{c}"] = float(dice), float(hd95)
    return out


class TransUNetProtocol:
    """TransUNet's Synapse protocol: :func:`transunet_case_metrics` per case, mean over cases per organ, then mean
    over organs (Chen et al., "TransUNet", arXiv 2102.04306; used by Graph Flow for Synapse).

    Args:
        num_classes: number of classes including background (9 for Synapse: 8 organs).
        spacing: voxel spacing for HD95; None gives voxel units, as TransUNet.
    """

    def __init__(self, num_classes: int, spacing: Sequence[float] | float | None = None) -> None:
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.spacing = spacing
        self._rows: list[dict] = []

    def update(self, case_id: Hashable, pred, gt) -> dict:
        """Score one whole case (label maps of the same shape); returns and stores its row."""
        row = {"case": case_id, **transunet_case_metrics(pred, gt, self.num_classes, self.spacing)}
        classes = range(1, self.num_classes)
        row["dice_mean"] = float(np.mean([row[f"dice_class{c}"] for c in classes]))
        row["hd95_mean"] = float(np.mean([row[f"hd95_class{c}"] for c in classes]))
        self._rows.append(row)
        return row

    def per_case(self) -> list[dict]:
        """One row per case: ``case``, ``dice_class{c}``, ``hd95_class{c}``, ``dice_mean``, ``hd95_mean``."""
        return list(self._rows)

    def summary(self) -> dict:
        """Per organ the mean over cases (``dice_class{c}``, ``hd95_class{c}``), then ``dice`` and ``hd95``, the mean
        of those over organs (TransUNet's reported numbers), and ``num_cases``."""
        if not self._rows:
            raise ValueError("no case was added")
        out = {}
        for c in range(1, self.num_classes):
            for m in ("dice", "hd95"):
                out[f"{m}_class{c}"] = float(np.mean([r[f"{m}_class{c}"] for r in self._rows]))
        for m in ("dice", "hd95"):
            out[m] = float(np.mean([out[f"{m}_class{c}"] for c in range(1, self.num_classes)]))
        out["num_cases"] = len(self._rows)
        return out


# --------------------------------------------------------------------------------------------------------- Graph Flow
def center_crop_2d(x, size: int = 64, start: int | None = None) -> np.ndarray:
    """Crop the last two axes to ``size x size``.

    Args:
        x: array or tensor with at least 2 dims, e.g. ``(H, W)`` or ``(B, H, W)``.
        size: side of the window.
        start: first row and column of the window; None centres it (``(H - size) // 2``). Graph Flow's Gastric
            protocol uses ``start=GASTRIC_CROP_START`` (95) on 256x256 images.
    """
    x = _to_numpy(x)
    if x.ndim < 2:
        raise ValueError(f"center_crop_2d needs at least 2 dims, got shape {x.shape}")
    h, w = x.shape[-2:]
    r0 = (h - size) // 2 if start is None else start
    c0 = (w - size) // 2 if start is None else start
    if size < 1 or r0 < 0 or c0 < 0 or r0 + size > h or c0 + size > w:
        raise ValueError(f"a {size}x{size} window starting at ({r0}, {c0}) does not fit in {h}x{w}")
    return x[..., r0 : r0 + size, c0 : c0 + size]


def confusion_matrix(pred, gt, num_classes: int, mask=None) -> np.ndarray:
    """The ``(num_classes, num_classes)`` confusion matrix of two label maps, rows ground truth, columns prediction
    (as the Graph Flow / GKD ``Evaluator``: ``bincount(num_classes * gt + pred)``).

    Ground-truth labels outside ``[0, num_classes)`` are ignored, as released; predicted labels outside it are an
    error. Numpy ``bincount``: MONAI's ``get_confusion_matrix`` gives one-vs-rest counts, not the full matrix.

    Args:
        pred: predicted label map, any shape (e.g. ``(H, W)``, ``(B, H, W)`` or ``(H, W, D)``).
        gt: ground-truth label map of the same shape.
        num_classes: number of classes including background.
        mask: optional boolean map of the same shape; only pixels where it is true are counted (e.g. a field of view).

    Returns:
        int64 array, ``matrix[g, p]`` = number of pixels with ground truth ``g`` predicted as ``p``.
    """
    _check_num_classes(num_classes)
    pred, gt = _label_map(pred, "pred"), _label_map(gt, "gt")
    _check_same_shape(pred, gt)
    if mask is not None:
        mask = _to_numpy(mask)
        if mask.shape != gt.shape:
            raise ValueError(f"mask shape {mask.shape} and ground-truth shape {gt.shape} differ")
        pred, gt = pred[mask.astype(bool)], gt[mask.astype(bool)]
    _check_label_range(pred, num_classes, "pred")
    keep = (gt >= 0) & (gt < num_classes)
    idx = num_classes * gt[keep].astype(np.int64) + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


class GraphFlowProtocol:
    """Pixel ACC and mIoU from one confusion matrix accumulated over the whole test set, background included
    (Graph Flow, Zou et al., ``test.py::Evaluator``; Gastric images are scored on a 64x64 window).

    ACC = trace / total; IoU_c = M[c, c] / (row_c + col_c - M[c, c]); mIoU = nanmean over classes (NaN for a class
    absent from both). Ground-truth labels outside [0, num_classes) are ignored, as released. For two classes the
    summary also has the released ``precision``, ``recall``, ``tnr``, ``f1`` of class 1. Numpy ``bincount``: MONAI's
    ``get_confusion_matrix`` gives one-vs-rest counts, not the full matrix.

    Args:
        num_classes: number of classes including background (2 for Gastric).
        crop_size: side of the window applied to prediction and label before counting; None scores whole images.
        crop_start: first row/column of the window (see :func:`center_crop_2d`); ``GASTRIC_CROP_START`` reproduces
            the release.
    """

    def __init__(self, num_classes: int = 2, crop_size: int | None = None, crop_start: int | None = None) -> None:
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.crop_start = crop_start
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: ground truth, columns: prediction

    def update(self, pred, gt) -> None:
        """Add label maps ``(H, W)`` or ``(B, H, W)`` of the same shape (argmax predictions)."""
        pred, gt = _label_map(pred, "pred"), _label_map(gt, "gt")
        _check_same_shape(pred, gt)
        if self.crop_size is not None:
            pred = center_crop_2d(pred, self.crop_size, self.crop_start)
            gt = center_crop_2d(gt, self.crop_size, self.crop_start)
        self.matrix += confusion_matrix(pred, gt, self.num_classes)

    def summary(self) -> dict:
        """``acc``, ``miou`` and ``iou_class{c}`` (plus ``precision``, ``recall``, ``tnr``, ``f1`` for 2 classes)."""
        m = self.matrix
        if m.sum() == 0:
            raise ValueError("no pixel was counted")
        diag = np.diag(m).astype(float)
        union = m.sum(axis=0) + m.sum(axis=1) - diag
        iou = np.divide(diag, union, out=np.full_like(diag, np.nan), where=union > 0)
        out = {"acc": float(diag.sum() / m.sum()), "miou": float(np.nanmean(iou))}
        out.update({f"iou_class{c}": float(v) for c, v in enumerate(iou)})
        if self.num_classes == 2:
            tn, fp, fn, tp = m.ravel()
            precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
            out.update(
                precision=precision,
                recall=recall,
                tnr=_ratio(tn, tn + fp),
                f1=_ratio(2 * precision * recall, precision + recall),
            )
        return out


# ---------------------------------------------------------------------------------------------------------------- GKD
def roc_auc(scores, positives) -> float:
    """Exact area under the ROC curve of ``scores`` for the binary target ``positives``.

    The Mann-Whitney form: AUC = P(score of a random positive > score of a random negative) + 0.5 P(tie), computed
    from the positive and negative counts per distinct score (one sort, ``np.unique``), so it equals the trapezoidal
    area under sklearn's ``roc_curve`` (GKD's ``test.py``) and ``monai.metrics.compute_roc_auc``. MONAI's version
    walks the pixels in a Python loop, too slow for the millions of pixels of a test set; this one is vectorised.

    Args:
        scores: per-pixel scores (e.g. the softmax probability of a class), any shape.
        positives: boolean (or 0/1) target of the same shape.

    Returns:
        the AUC, NaN when there is no positive or no negative.
    """
    scores = _to_numpy(scores).reshape(-1)
    positives = _to_numpy(positives).reshape(-1)
    if scores.shape != positives.shape:
        raise ValueError(f"scores ({scores.size} values) and positives ({positives.size} values) differ in size")
    if not (np.issubdtype(positives.dtype, np.integer) or positives.dtype == np.bool_) or (
        positives.size and not np.isin(positives, (0, 1)).all()
    ):
        raise ValueError("positives must be a boolean or 0/1 array")
    if scores.size and not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    n_pos = int(np.count_nonzero(positives))
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse, weights=positives.astype(np.float64))
    neg = np.bincount(inverse).astype(np.float64) - pos
    negatives_below = np.cumsum(neg) - neg  # negatives with a strictly lower score
    return float(np.sum(pos * (negatives_below + 0.5 * neg)) / (float(n_pos) * float(n_neg)))


class GKDProtocol:
    """GKD's evaluation (Qi et al., "Exploring Generalizable Distillation for Efficient Medical Image Segmentation",
    IEEE JBHI 2024; the released ``test.py``): everything from **one** confusion matrix accumulated over every pixel
    (voxel) of the evaluated set, not from per-image means, plus the pixel-level ROC AUC.

    With M the confusion matrix (rows ground truth, columns argmax prediction; :func:`confusion_matrix`), per
    foreground class c one against the rest (TP = M[c, c], FN = row c - TP, FP = column c - TP, TN = the rest)::

        acc = trace(M) / sum(M)
        recall_class{c} (Se) = TP / (TP + FN),    tnr_class{c} (Sp) = TN / (TN + FP),
        precision_class{c} = TP / (TP + FP),      f1_class{c} = 2 Pre Se / (Pre + Se) = 2TP / (2TP + FP + FN)
        iou_class{c} = TP / (TP + FP + FN)  for every class c, background included
        miou = mean of iou_class{c} over ALL classes, background included (NaN classes, absent from both, left out)
        auc_class{c} = ROC AUC of the softmax probability of c against (gt == c), over the same pixels (:func:`roc_auc`)

    For a binary task the ``class1`` values are the paper's numbers. F1 is computed in its Dice form: it equals
    ``test.py``'s ``2 Pre Se / (Pre + Se)`` wherever that is defined, and is 0 rather than NaN when the class was
    predicted or present but never hit (TP = 0). A ratio with a zero denominator is NaN. ``test.py`` takes the AUC
    of the log-softmax, a monotone map of the probability, so the AUC is the same. Ground-truth labels outside
    ``[0, num_classes)`` are ignored (as the Graph Flow / GKD ``Evaluator``); a field-of-view ``mask`` restricts the
    counted pixels (``test.py`` uses none).

    The AUC needs every scored pixel's probability: ``auc=True`` keeps them (float32 and a boolean per pixel and
    foreground class) until :meth:`summary`.

    Args:
        num_classes: number of classes including background (2 in GKD: liver, vessel).
        auc: compute the AUC (needs ``prob`` in :meth:`update`); False skips it and its memory.
    """

    def __init__(self, num_classes: int = 2, auc: bool = True) -> None:
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.auc = bool(auc)
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self._scores: list[list[np.ndarray]] = [[] for _ in range(1, num_classes)]
        self._positives: list[list[np.ndarray]] = [[] for _ in range(1, num_classes)]

    def update(self, pred, gt, prob=None, mask=None) -> None:
        """Add pixels.

        Args:
            pred: argmax label map, e.g. ``(H, W)``, ``(B, H, W)`` or ``(H, W, D)``.
            gt: ground-truth label map of the same shape.
            prob: softmax probabilities with the class axis first, ``(num_classes, *gt.shape)``; needed when
                ``auc`` is on.
            mask: optional boolean map of ``gt``'s shape; only pixels where it is true are scored.
        """
        gt = _label_map(gt, "gt")
        if mask is not None:
            mask = _to_numpy(mask).astype(bool)
        self.matrix += confusion_matrix(pred, gt, self.num_classes, mask)
        if not self.auc:
            return
        if prob is None:
            raise ValueError("the GKD protocol's AUC needs the softmax probabilities (prob); pass auc=False to skip it")
        prob = _to_numpy(prob)
        if prob.shape != (self.num_classes, *gt.shape):
            raise ValueError(
                f"prob must have shape (num_classes, *gt.shape) = {(self.num_classes, *gt.shape)}, got {prob.shape}"
            )
        keep = (gt >= 0) & (gt < self.num_classes)
        if mask is not None:
            keep &= mask
        for k, c in enumerate(range(1, self.num_classes)):
            self._scores[k].append(prob[c][keep].astype(np.float32))
            self._positives[k].append(gt[keep] == c)

    def summary(self) -> dict:
        """``acc``, ``miou``, ``iou_class{c}`` for every class, and per foreground class ``recall_class{c}`` (Se),
        ``tnr_class{c}`` (Sp), ``precision_class{c}``, ``f1_class{c}``, ``auc_class{c}`` (when on) and the counts
        ``tp_class{c}``, ``fp_class{c}``, ``fn_class{c}``, ``tn_class{c}``; then the means over the foreground classes
        (``recall_mean``, ``tnr_mean``, ``precision_mean``, ``f1_mean``, ``iou_mean``, ``auc_mean``, NaN-aware)."""
        m = self.matrix
        total = int(m.sum())
        if total == 0:
            raise ValueError("no pixel was counted")
        diag = np.diag(m).astype(float)
        union = m.sum(axis=0) + m.sum(axis=1) - diag
        iou = np.divide(diag, union, out=np.full_like(diag, np.nan), where=union > 0)
        out: dict = {"acc": float(diag.sum() / total), "miou": float(np.nanmean(iou))}  # some class has pixels
        out.update({f"iou_class{c}": float(v) for c, v in enumerate(iou)})
        fg = range(1, self.num_classes)
        names = ["recall", "tnr", "precision", "f1", "iou"] + (["auc"] if self.auc else [])
        for k, c in enumerate(fg):
            tp = int(m[c, c])
            fn, fp = int(m[c].sum()) - tp, int(m[:, c].sum()) - tp
            tn = total - tp - fn - fp
            out[f"recall_class{c}"] = _ratio(tp, tp + fn)
            out[f"tnr_class{c}"] = _ratio(tn, tn + fp)
            out[f"precision_class{c}"] = _ratio(tp, tp + fp)
            out[f"f1_class{c}"] = _ratio(2 * tp, 2 * tp + fp + fn)
            if self.auc:
                scores = np.concatenate(self._scores[k]) if self._scores[k] else np.zeros(0, np.float32)
                positives = np.concatenate(self._positives[k]) if self._positives[k] else np.zeros(0, bool)
                out[f"auc_class{c}"] = roc_auc(scores, positives)
            out.update({f"tp_class{c}": tp, f"fp_class{c}": fp, f"fn_class{c}": fn, f"tn_class{c}": tn})
        for name in names:
            values = [out[f"{name}_class{c}"] for c in fg]
            finite = [v for v in values if not math.isnan(v)]
            out[f"{name}_mean"] = float(np.mean(finite)) if finite else math.nan
        return out


# ----------------------------------------------------------------------------------------------------------- MTMS-CKD
def mtms_binarize(logits, mode: str = "logits") -> np.ndarray:
    """MTMS-CKD's prediction mask from the segmentation logits.

    Args:
        logits: raw network output, any shape.
        mode: ``"logits"`` thresholds the raw logits at 0.5 as released (``inference.py``; equivalent to a sigmoid
            probability > 0.622); ``"sigmoid"`` thresholds the sigmoid probability at 0.5 (i.e. logits > 0), the
            intended convention.
    """
    x = _to_numpy(logits)
    if mode == "logits":
        return x > 0.5
    if mode == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x.astype(np.float64))) > 0.5
    raise ValueError(f"mode must be 'logits' or 'sigmoid', got {mode!r}")


class PooledBinaryProtocol:
    """MTMS-CKD's dataset-pooled binary metrics (Biswas, MTMS-Med-Seg-KD ``metrics.py``): TP, FP and FN are summed
    over all test images (empty ones included), then::

        Dice = 2TP / (2TP + FP + FN),  IoU = TP / (TP + FP + FN),  precision = TP / (TP + FP),  recall = TP / (TP + FN)

    A ratio with a zero denominator is NaN. Plain numpy counting.
    """

    def __init__(self) -> None:
        self.tp = self.fp = self.fn = 0

    def update(self, pred, gt) -> None:
        """Add binary masks / label maps of the same shape (foreground = nonzero); see :func:`mtms_binarize`."""
        pred, gt = _label_map(pred, "pred") != 0, _label_map(gt, "gt") != 0
        _check_same_shape(pred, gt)
        self.tp += int(np.sum(pred & gt))
        self.fp += int(np.sum(pred & ~gt))
        self.fn += int(np.sum(~pred & gt))

    def summary(self) -> dict:
        """``dice``, ``iou``, ``precision``, ``recall`` and the pooled ``tp``, ``fp``, ``fn``."""
        tp, fp, fn = self.tp, self.fp, self.fn
        return {
            "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": _ratio(tp, tp + fp + fn),
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }


# ------------------------------------------------------------------------------------------------------------- common
def per_case_dice_hd95(pred, gt, num_classes: int, spacing: Sequence[float] | float | None = None) -> dict:
    """The project's common per-case metrics: Dice and HD95 per foreground class of one 2D or 3D case.

    Builds on MONAI: ``monai.metrics.compute_dice`` and ``monai.metrics.compute_hausdorff_distance(percentile=95)``
    (HD95 = max of the two directed 95th percentiles of the surface distances; differs from :func:`medpy_hd95`).
    Empty masks are handled explicitly, per class c:

    - both empty: Dice NaN, HD95 NaN (class absent; left out of NaN-aware means);
    - exactly one empty: Dice 0.0, HD95 NaN (the distance is undefined; count these cases separately).

    Args:
        pred: predicted label map ``(H, W)`` or ``(D, H, W)``.
        gt: ground-truth label map of the same shape.
        num_classes: number of classes including background.
        spacing: voxel spacing for HD95 (one number or one per axis); None gives voxel units.

    Returns:
        ``{"dice_class{c}": float, "hd95_class{c}": float, ...}`` for c in 1..num_classes-1.
    """
    _check_num_classes(num_classes)
    pred, gt = _label_map(pred, "pred"), _label_map(gt, "gt")
    _check_same_shape(pred, gt)
    if pred.ndim not in (2, 3):
        raise ValueError(f"label maps must be 2D or 3D without channel axis, got shape {pred.shape}")
    _check_label_range(pred, num_classes, "pred")
    _check_label_range(gt, num_classes, "gt")
    classes = np.arange(1, num_classes)
    p1 = torch.from_numpy(pred[None, None] == classes.reshape((1, -1) + (1,) * pred.ndim)).float()
    g1 = torch.from_numpy(gt[None, None] == classes.reshape((1, -1) + (1,) * gt.ndim)).float()
    dice = compute_dice(p1, g1, include_background=True, ignore_empty=False)[0]
    p_any, g_any = p1.flatten(2).any(-1)[0], g1.flatten(2).any(-1)[0]
    hd = torch.full((len(classes),), math.nan)
    both = p_any & g_any
    if both.any():
        hd[both] = compute_hausdorff_distance(
            p1[:, both], g1[:, both], include_background=True, percentile=95, spacing=spacing
        )[0]
    out = {}
    for k, c in enumerate(classes):
        out[f"dice_class{c}"] = math.nan if not (p_any[k] or g_any[k]) else float(dice[k])
        out[f"hd95_class{c}"] = float(hd[k])
    return out


# ------------------------------------------------------------------------------------------------------------ results
def _is_float(v) -> bool:
    return isinstance(v, (float, np.floating))


def write_results(
    rows: Sequence[dict], out_dir: str | os.PathLike, name: str, group_key: str | None = None
) -> tuple[Path, Path]:
    """Write per-case rows to ``<name>_per_case.csv`` and their summary to ``<name>_summary.csv`` in ``out_dir``,
    each atomically (:func:`medkd.io.atomic_write_bytes`).

    The per-case columns are the union of the rows' keys in first-seen order (missing cells left empty). The metric
    columns are those whose values are all floats; ids, class indices and counts (ints, strings) stay in the per-case
    file only. The summary has one line per metric: ``metric``, ``mean`` and ``std`` (NaN-aware, population std,
    ddof=0) over the non-NaN values, and ``n``, their number.

    Args:
        rows: one dict per case.
        out_dir: folder of the two files (created).
        name: file name prefix (the protocol).
        group_key: when given, every row carries this key (e.g. ``"domain"``): it becomes the first column of both
            files, and the summary holds one block of metric lines per group (groups in first-seen order), each over
            that group's rows only.

    Returns:
        the two paths written.
    """
    if not rows:
        raise ValueError("no rows to write")
    if group_key is not None:
        missing = [i for i, r in enumerate(rows) if group_key not in r]
        if missing:
            raise ValueError(f"group_key {group_key!r}: rows {missing[:10]} do not have it")
    columns: list[str] = [group_key] if group_key is not None else []
    for row in rows:
        columns += [k for k in row if k not in columns]
    metrics = [k for k in columns if all(k in r and _is_float(r[k]) for r in rows)]
    groups: dict = {}
    for row in rows:
        groups.setdefault(None if group_key is None else row[group_key], []).append(row)

    per_case = io.StringIO()
    writer = csv.DictWriter(per_case, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)

    summary = io.StringIO()
    writer = csv.writer(summary, lineterminator="\n")
    writer.writerow(([group_key] if group_key is not None else []) + ["metric", "mean", "std", "n"])
    for group, group_rows in groups.items():
        for k in metrics:
            values = np.array([r[k] for r in group_rows], dtype=float)
            values = values[~np.isnan(values)]
            n = len(values)
            stats = [k, float(values.mean()) if n else math.nan, float(values.std()) if n else math.nan, n]
            writer.writerow(([group] if group_key is not None else []) + stats)

    out_dir = Path(out_dir)
    paths = out_dir / f"{name}_per_case.csv", out_dir / f"{name}_summary.csv"
    atomic_write_bytes(paths[0], per_case.getvalue().encode())
    atomic_write_bytes(paths[1], summary.getvalue().encode())
    return paths
