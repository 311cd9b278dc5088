"""An evaluator handler that scores the test split with one of the papers' evaluation protocols.

The protocols themselves live in :mod:`medkd.metrics.protocols`; :class:`ProtocolSaver` feeds them from an Ignite
evaluator (MONAI ``SupervisedEvaluator``): it groups the evaluated items by patient (the datalist's ``"case"``), stacks
2D slices of a volume in ``"slice"`` order where a protocol scores volumes, optionally scores several groups of items
(e.g. the domains of a cross-domain evaluation, :func:`medkd.data.load_domains`) separately in one run, and writes CSV
results at the end of the evaluation.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.transforms import LoadImage

from medkd.io import atomic_write_bytes
from medkd.metrics.protocols import (
    EMKDProtocol,
    GKDProtocol,
    GraphFlowProtocol,
    PooledBinaryProtocol,
    TransUNetProtocol,
    mtms_binarize,
    per_case_dice_hd95,
    write_results,
)

__all__ = ["PROTOCOL_OPTIONS", "ProtocolSaver", "needs_probabilities"]

logger = logging.getLogger(__name__)

#: Every protocol name with its options and their defaults (the papers' settings).
PROTOCOL_OPTIONS: dict[str, dict[str, Any]] = {
    "dice_hd95": {"spacing": None},
    "emkd": {"threshold": 0.4},
    "transunet": {"spacing": None},
    "graph_flow": {"crop_size": None, "crop_start": None},
    "pooled_binary": {"binarize": "logits"},
    "gkd": {"fov_key": None, "auc": True},
}
#: Protocols whose numbers are pooled over the whole test set (written to ``<protocol>_pooled.csv``).
POOLED = ("graph_flow", "pooled_binary", "gkd")
#: Protocols that score whole volumes: 2D items of one case are stacked into a volume.
VOLUME_PROTOCOLS = ("dice_hd95", "transunet")


def _check_options(protocol: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    if protocol not in PROTOCOL_OPTIONS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {sorted(PROTOCOL_OPTIONS)}")
    options = dict(options or {})
    valid = PROTOCOL_OPTIONS[protocol]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"option(s) {unknown} do not apply to the evaluation protocol {protocol!r}; its options are "
            f"{sorted(valid) or 'none'}"
        )
    options = {**valid, **options}
    if "threshold" in options and not (
        isinstance(options["threshold"], numbers.Real) and 0.0 < options["threshold"] < 1.0
    ):
        raise ValueError(f"threshold must be a probability in (0, 1), got {options['threshold']!r}")
    if "binarize" in options and options["binarize"] not in ("logits", "sigmoid", "argmax"):
        raise ValueError(f"binarize must be 'logits', 'sigmoid' or 'argmax', got {options['binarize']!r}")
    if "spacing" in options:
        s = options["spacing"]
        ok = s is None or s == "meta" or isinstance(s, numbers.Real) or (
            isinstance(s, Sequence) and not isinstance(s, str) and all(isinstance(v, numbers.Real) for v in s)
        )
        if not ok:
            raise ValueError(f"spacing must be None (voxel units), a number, a list of numbers or 'meta', got {s!r}")
    for key in ("crop_size", "crop_start"):
        v = options.get(key)
        if v is not None and not (isinstance(v, numbers.Integral) and v >= (1 if key == "crop_size" else 0)):
            raise ValueError(f"{key} must be None or a {'positive' if key == 'crop_size' else 'non-negative'} integer, got {v!r}")
    if options.get("crop_start") is not None and options.get("crop_size") is None:
        raise ValueError("crop_start needs crop_size")
    fov_key = options.get("fov_key")
    if fov_key is not None and not (isinstance(fov_key, str) and fov_key):
        raise ValueError(f"fov_key must be None (no field-of-view mask) or an item key, got {options['fov_key']!r}")
    if "auc" in options and not isinstance(options["auc"], bool):
        raise ValueError(f"auc must be true or false, got {options['auc']!r}")
    return options


def needs_probabilities(protocol: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``protocol`` reads softmax probabilities (thresholds them, or ranks them for an AUC), so that the
    evaluator must keep them next to the argmax.

    Bundle configs use it to copy the probabilities (``CopyItemsd``) only when needed.
    """
    options = _check_options(protocol, options)
    return (
        protocol == "emkd"
        or (protocol == "pooled_binary" and options["binarize"] != "argmax")
        or (protocol == "gkd" and options["auc"])
    )


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.numpy()
    return np.asarray(x)


def _label_map(x, what: str) -> np.ndarray:
    """A channel-first map ``(C, *spatial)`` as a label map ``(*spatial)``: argmax of one-hot / probabilities
    (C > 1) or the single channel (C = 1)."""
    x = _numpy(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"{what} must be channel-first 2D or 3D, (C, H, W[, D]), got shape {x.shape}")
    m = x.argmax(axis=0) if x.shape[0] > 1 else x[0]
    if not np.issubdtype(m.dtype, np.integer):
        if not np.array_equal(m, np.round(m)):
            raise ValueError(f"{what} with one channel must hold integer labels")
        m = m.astype(np.int64)
    return m.astype(np.int16, copy=False)


def _affine_spacing(x, spatial_ndim: int, what: str) -> tuple[float, ...]:
    affine = getattr(x, "affine", None)
    if affine is None:
        raise ValueError(f"spacing 'meta' reads the voxel size from the {what}'s affine, but the {what} has no metadata")
    a = _numpy(affine).astype(float)
    k = a.shape[0] - 1
    if k < spatial_ndim:
        raise ValueError(
            f"spacing 'meta': the {what}'s affine is {k}D but the case is {spatial_ndim}D (2D files stacked into a "
            f"volume need a 3D affine); give the spacing as a list instead"
        )
    return tuple(float(v) for v in np.linalg.norm(a[:k, :k], axis=0)[:spatial_ndim])


def _file_stem(x) -> str | None:
    meta = getattr(x, "meta", None) or {}
    name = meta.get("filename_or_obj")
    if not name:
        return None
    name = Path(str(name)).name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".mha", ".nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _scalar(value) -> Any:
    """A datalist field as a plain Python value (collation may wrap numbers in one-element tensors or arrays)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    return value


class _GroupState:
    """What :class:`ProtocolSaver` accumulates for one group of items (all items when there are no groups)."""

    def __init__(self) -> None:
        self.items: dict[Any, list] = {}  # case -> [(slice, pred map, label map, spacing)] (volume protocols)
        self.counts: dict[Any, int] = {}  # case -> number of items
        self.per_case: dict[Any, list] = {}  # case -> per-class accumulators (graph_flow, pooled_binary, gkd)
        self.pooled: list = []  # accumulators over the whole group (per foreground class for emkd, pooled_binary)


class ProtocolSaver:
    """Ignite handler: scores an evaluation with one of the papers' protocols and writes CSV results.

    Builds on :mod:`medkd.metrics.protocols` (the protocol definitions) and MONAI's evaluator output layout
    (decollated per-item dicts after postprocessing). Per evaluated item it takes the prediction (``pred_key``:
    one-hot or probabilities ``(C, *spatial)``, or a label map ``(1, *spatial)``), the label (``label_key``, same
    layouts), the softmax probabilities (``prob_key``, only for protocols that read them), and the datalist's
    case id and slice index (``case_key``, ``slice_key``; read from the batch or the output item). At the end of the
    evaluation it writes ``<output_dir>/<protocol>_per_case.csv`` and ``<protocol>_summary.csv`` (mean, std and count
    of each metric over the cases, NaN left out; :func:`~medkd.metrics.protocols.write_results`) and logs the summary.

    Protocols (``protocol``) and their ``options`` (defaults = the papers' settings):

    - ``"dice_hd95"`` (the project's common one): per case and foreground class, MONAI Dice and HD95
      (:func:`~medkd.metrics.protocols.per_case_dice_hd95`) plus their means over classes (``dice_mean``,
      ``hd95_mean``, NaN-aware). Option ``spacing``: None (voxel units), a number or list, or ``"meta"`` (the voxel
      size from the label's affine).
    - ``"transunet"``: TransUNet's Synapse protocol (also Graph Flow's on Synapse), per case and organ medpy Dice and
      HD95 with TransUNet's empty-mask conventions; the summary's ``dice_mean`` / ``hd95_mean`` rows are the
      papers' numbers. Option ``spacing`` as above (None as TransUNet).
    - ``"emkd"``: EMKD's per-case Dice/VOE/RVD with foreground = softmax probability of the class strictly above
      ``threshold`` (0.4), counted over the case's listed slices; one-vs-rest per foreground class. Cases without
      ground truth of a class get NaN for that class (EMKD leaves them out of its means); the voxel counts stay in
      the per-case file (``P_class{c}``, ``G_class{c}``, ``I_class{c}``).
    - ``"graph_flow"``: Graph Flow's pixel ACC / mIoU from one confusion matrix over the whole test set, background
      included; 3D volumes are counted as their axial (last-axis) slices. Options ``crop_size`` / ``crop_start``:
      score only a ``crop_size`` square window of each slice (Graph Flow's Gastric setting: 64 at 95 on 256x256
      images); None scores whole slices.
    - ``"pooled_binary"``: MTMS-CKD's dataset-pooled Dice/IoU/precision/recall, one-vs-rest per foreground class.
      Option ``binarize``: ``"logits"`` (as released: the logit ``log(p / (1 - p))`` of the class probability
      above 0.5, i.e. p > 0.622; for a two-class softmax network that logit is ``z1 - z0``, what a sigmoid head
      outputs), ``"sigmoid"`` (p > 0.5) or ``"argmax"`` (the label map).
    - ``"gkd"``: GKD's ``test.py`` (:class:`~medkd.metrics.protocols.GKDProtocol`): ACC, mIoU (background
      included), and per foreground class Se (``recall_class{c}``), Sp (``tnr_class{c}``), precision, F1 (= the
      global Dice), IoU and the pixel-level ROC AUC of the class probability, all from one confusion matrix over every
      pixel/voxel of the evaluated set; the per-case file holds each case's Dice (``dice_class{c}``, ``dice_mean``).
      Options ``fov_key`` (None: every pixel is scored, as ``test.py``; else the item key of a field-of-view mask,
      nonzero inside, given as an array ``(1, *spatial)`` / ``(*spatial)`` or as an image file path, e.g. a datalist
      field, read with MONAI ``LoadImage``; only pixels inside are scored) and ``auc`` (True; False skips the AUC, so
      no probabilities are needed or kept).

    ``graph_flow``, ``pooled_binary`` and ``gkd`` pool over the test set: their paper numbers go to
    ``<output_dir>/<protocol>_pooled.csv`` (``metric,value``) and to the log; the per-case file holds metrics
    computed case by case.

    Cases: items sharing a ``case`` value form one case. ``dice_hd95`` and ``transunet`` score volumes: the 2D items
    of a case are stacked along a new last axis in ``slice`` order (gaps between listed slices are closed); a case
    of a single 2D item without ``slice`` (a natively 2D image) is scored in 2D. An item without ``case`` is its
    own case, named by its image file; ``emkd`` and ``transunet`` refuse 2D items without ``case`` (they score
    patients, not slices).

    Groups (cross-domain evaluation in one run): with ``group_key`` (e.g. ``"domain"``, the key
    :func:`medkd.data.load_domains` tags every item with), the items are split by that key's value and each group is
    scored on its own, exactly as if it had been evaluated alone (pooled numbers are pooled within the group). The
    files stay the same three, with ``group_key`` as their first column: one block of rows per group in the per-case,
    summary and pooled files (groups in the order they were first seen). Each logged line names its group.

    Args:
        protocol: one of ``PROTOCOL_OPTIONS``.
        num_classes: number of classes including background.
        output_dir: folder for the CSV files (created).
        options: protocol options (see above); options of other protocols are an error.
        pred_key, label_key, prob_key, case_key, slice_key, image_key: item keys.
        group_key: item key whose value splits the items into separately scored groups; None scores all together.
    """

    def __init__(
        self,
        protocol: str,
        num_classes: int,
        output_dir: str | os.PathLike,
        options: Mapping[str, Any] | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        prob_key: str = "prob",
        case_key: str = "case",
        slice_key: str = "slice",
        image_key: str = "image",
        group_key: str | None = None,
    ) -> None:
        self.options = _check_options(protocol, options)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if group_key is not None and not (isinstance(group_key, str) and group_key):
            raise ValueError(f"group_key must be None or an item key (e.g. 'domain'), got {group_key!r}")
        self.protocol = protocol
        self.num_classes = int(num_classes)
        self.output_dir = Path(output_dir)
        self.pred_key, self.label_key, self.prob_key = pred_key, label_key, prob_key
        self.case_key, self.slice_key, self.image_key = case_key, slice_key, image_key
        self.group_key = group_key
        self.needs_probabilities = needs_probabilities(protocol, self.options)
        self.rows: list[dict] = []
        self.pooled: dict | None = None
        self.reset()

    # ------------------------------------------------------------------------------------------------ ignite wiring
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self._groups: dict[Any, _GroupState] = {}  # group (None without group_key) -> its accumulators

    def collect(self, engine: Engine) -> None:
        """Add every item of the current iteration (``engine.state.batch`` / ``engine.state.output``)."""
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, Mapping):
            batch = decollate_batch(batch)
        if isinstance(output, Mapping):
            output = decollate_batch(output)
        for b, o in zip(batch, output):
            self.add({**b, **o} if isinstance(b, Mapping) else o)

    # ------------------------------------------------------------------------------------------------------- items
    def _where(self, item: Mapping) -> tuple[str | None, str]:
        name = _file_stem(item.get(self.image_key)) or _file_stem(item.get(self.label_key))
        return name, (f"item {name!r}" if name else "an item")

    def _group_of(self, item: Mapping) -> Any:
        if self.group_key is None:
            return None
        if self.group_key not in item:
            raise KeyError(
                f"the evaluation groups items by '{self.group_key}', but {self._where(item)[1]} has no "
                f"'{self.group_key}': tag every datalist entry with it (medkd.data.load_domains does) or set group_key to None"
            )
        return _scalar(item[self.group_key])

    def _case_of(self, item: Mapping, spatial_ndim: int) -> tuple[Any, int | None]:
        case, index = _scalar(item.get(self.case_key)), item.get(self.slice_key)
        index = None if index is None else int(_numpy(index).reshape(-1)[0])
        name, where = self._where(item)
        if case is None:
            if index is not None:
                raise ValueError(
                    f"{where} has a '{self.slice_key}' index but no '{self.case_key}': the slices of a volume need the "
                    f"patient id in every datalist entry ('{self.case_key}', as `python -m medkd prepare` writes it)"
                )
            if spatial_ndim == 2 and self.protocol in ("emkd", "transunet"):
                raise ValueError(
                    f"the evaluation protocol {self.protocol!r} scores whole cases (patients), but {where} is a 2D image "
                    f"without '{self.case_key}': add the patient id ('{self.case_key}') and the slice index "
                    f"('{self.slice_key}') to every datalist entry (`python -m medkd prepare` writes both)"
                )
            if name is None:
                raise ValueError(f"an item has neither '{self.case_key}' nor an image file name to name its case")
            case = name
        return case, index

    def _probabilities(self, item: Mapping) -> np.ndarray:
        if self.prob_key not in item:
            raise KeyError(
                f"the evaluation protocol {self.protocol!r} reads softmax probabilities, but the evaluator output "
                f"has no '{self.prob_key}': copy them before the argmax in the postprocessing, e.g. "
                f"CopyItemsd(keys='{self.pred_key}', names='{self.prob_key}') right after the softmax"
            )
        p = _numpy(item[self.prob_key]).astype(np.float32, copy=False)
        if p.shape[0] != self.num_classes:
            raise ValueError(f"'{self.prob_key}' has {p.shape[0]} channels, expected num_classes={self.num_classes}")
        return p

    def _fov(self, item: Mapping, shape: tuple[int, ...], case: Any) -> np.ndarray:
        """The field-of-view mask of an item (``fov_key``): an array or an image file, nonzero inside."""
        key = self.options["fov_key"]
        if key not in item:
            raise KeyError(
                f"the evaluation protocol {self.protocol!r} scores only the field of view '{key}', but case {case!r} "
                f"has no '{key}': add the mask file to every datalist entry (or set fov_key to None)"
            )
        fov = item[key]
        if isinstance(fov, (str, os.PathLike)):
            fov = LoadImage(image_only=True, ensure_channel_first=True)(str(fov))
        fov = _numpy(fov)
        if fov.ndim == len(shape) + 1:  # channel first; a colour mask counts where any channel is set
            fov = fov.any(axis=0)
        if fov.shape != shape:
            raise ValueError(
                f"field-of-view mask '{key}' of case {case!r} has shape {fov.shape}, but the label has spatial shape "
                f"{shape}"
            )
        return fov != 0

    def add(self, item: Mapping) -> None:
        """Add one evaluated item (a dict with prediction, label, case id and optionally slice index/probabilities)."""
        for key in (self.pred_key, self.label_key):
            if key not in item:
                raise KeyError(f"the evaluation protocol {self.protocol!r} needs '{key}' in every evaluated item")
        pred = _label_map(item[self.pred_key], f"'{self.pred_key}'")
        label = _label_map(item[self.label_key], f"'{self.label_key}'")
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {pred.shape} and label shape {label.shape} differ")
        group = self._group_of(item)
        case, index = self._case_of(item, label.ndim)
        state = self._groups.setdefault(group, _GroupState())
        state.counts[case] = state.counts.get(case, 0) + 1
        if self.protocol in VOLUME_PROTOCOLS:
            spacing = self.options["spacing"]
            if spacing == "meta":
                ndim = label.ndim + (1 if index is not None else 0)
                spacing = _affine_spacing(item[self.label_key], ndim, f"label of case {case!r}")
            state.items.setdefault(case, []).append((index, pred, label, spacing))
            return
        fg = range(1, self.num_classes)
        if self.protocol == "gkd":  # one confusion matrix: the pixels' arrangement does not matter
            mask = self._fov(item, label.shape, case) if self.options["fov_key"] else None
            prob = self._probabilities(item) if self.options["auc"] else None
            if prob is not None and prob.shape[1:] != label.shape:
                raise ValueError(f"'{self.prob_key}' has spatial shape {prob.shape[1:]}, the label {label.shape}")
            if not state.pooled:
                state.pooled = [GKDProtocol(self.num_classes, auc=self.options["auc"])]
            state.pooled[0].update(pred, label, prob, mask)
            per_case = state.per_case.setdefault(case, [GKDProtocol(self.num_classes, auc=False)])
            per_case[0].update(pred, label, mask=mask)
            return
        if label.ndim == 3:  # a volume: its axial slices, (D, H, W)
            pred, label = np.moveaxis(pred, -1, 0), np.moveaxis(label, -1, 0)
        if self.protocol == "graph_flow":
            crop = (self.options["crop_size"], self.options["crop_start"])
            if not state.pooled:
                state.pooled = [GraphFlowProtocol(self.num_classes, *crop)]
            if case not in state.per_case:
                state.per_case[case] = [GraphFlowProtocol(self.num_classes, *crop)]
            for acc in (state.pooled[0], state.per_case[case][0]):
                acc.update(pred, label)
            return
        if self.protocol == "emkd":
            p = self._probabilities(item)
            if label.ndim == 3:
                p = np.moveaxis(p, -1, 1)
            if not state.pooled:  # one EMKD accumulator per foreground class, each over all cases
                state.pooled = [EMKDProtocol(self.options["threshold"]) for _ in fg]
            for acc, c in zip(state.pooled, fg):
                acc.update(case, np.stack([1.0 - p[c], p[c]]), label == c)
            return
        # pooled_binary
        mode = self.options["binarize"]
        if mode == "argmax":
            masks = [pred == c for c in fg]
        else:
            p = self._probabilities(item).astype(np.float64)
            if label.ndim == 3:
                p = np.moveaxis(p, -1, 1)
            with np.errstate(divide="ignore", over="ignore"):
                masks = [mtms_binarize(np.log(p[c]) - np.log1p(-p[c]), mode) for c in fg]
        if not state.pooled:
            state.pooled = [PooledBinaryProtocol() for _ in fg]
        if case not in state.per_case:
            state.per_case[case] = [PooledBinaryProtocol() for _ in fg]
        for k, c in enumerate(fg):
            for acc in (state.pooled[k], state.per_case[case][k]):
                acc.update(masks[k], label == c)

    # ------------------------------------------------------------------------------------------------------ results
    def _volume(self, state: _GroupState, case) -> tuple[np.ndarray, np.ndarray, Any]:
        items = state.items[case]
        if len(items) == 1 and items[0][0] is None:
            return items[0][1], items[0][2], items[0][3]
        if any(index is None for index, *_ in items):
            raise ValueError(
                f"case {case!r} has {len(items)} items but not every one has a '{self.slice_key}' index: "
                f"{self.protocol!r} stacks the 2D slices of a case in slice order and needs the index in every entry"
            )
        if any(pred.ndim != 2 for _, pred, *_ in items):
            raise ValueError(f"case {case!r}: only 2D slices can be stacked into a volume, got several 3D items")
        indices = [index for index, *_ in items]
        if len(set(indices)) != len(indices):
            raise ValueError(f"case {case!r} lists the same slice index twice: {sorted(indices)}")
        shapes = {pred.shape for _, pred, *_ in items}
        if len(shapes) > 1:
            raise ValueError(f"case {case!r}: its slices have different shapes {sorted(shapes)}")
        items = sorted(items, key=lambda t: t[0])
        return np.stack([t[1] for t in items], axis=-1), np.stack([t[2] for t in items], axis=-1), items[0][3]

    def _compute_group(self, state: _GroupState) -> tuple[list[dict], dict | None]:
        """Per-case rows (sorted by case) and, for the pooled protocols, the pooled metrics of one group."""
        cases = sorted(state.counts, key=str)
        fg = range(1, self.num_classes)
        rows: list[dict] = []
        pooled = None
        if self.protocol == "dice_hd95":
            for case in cases:
                pred, label, spacing = self._volume(state, case)
                m = per_case_dice_hd95(pred, label, self.num_classes, spacing)
                m["dice_mean"] = _nanmean([m[f"dice_class{c}"] for c in fg])
                m["hd95_mean"] = _nanmean([m[f"hd95_class{c}"] for c in fg])
                rows.append({"case": case, "items": state.counts[case], **m})
        elif self.protocol == "transunet":
            for case in cases:
                pred, label, spacing = self._volume(state, case)
                row = TransUNetProtocol(self.num_classes, spacing).update(case, pred, label)
                rows.append({"case": case, "items": state.counts[case], **{k: v for k, v in row.items() if k != "case"}})
        elif self.protocol == "emkd":
            per_class = [{r["case"]: r for r in acc.per_case()} for acc in state.pooled]
            for case in cases:
                row = {"case": case, "items": state.counts[case]}
                for c, by_case in zip(fg, per_class):
                    r = by_case[case]
                    row.update({f"P_class{c}": r["P"], f"G_class{c}": r["G"], f"I_class{c}": r["I"]})
                    for m in ("dice", "voe", "rvd"):
                        row[f"{m}_class{c}"] = r[m] if r["G"] > 0 else math.nan
                rows.append(row)
        elif self.protocol == "graph_flow":
            rows = [{"case": case, "items": state.counts[case], **state.per_case[case][0].summary()} for case in cases]
            pooled = state.pooled[0].summary()
        elif self.protocol == "gkd":
            for case in cases:
                s = state.per_case[case][0].summary()
                dice = {f"dice_class{c}": s[f"f1_class{c}"] for c in fg}  # per-case Dice = the case's own F1
                rows.append({"case": case, "items": state.counts[case], **dice, "dice_mean": _nanmean(dice.values())})
            pooled = state.pooled[0].summary()
        else:  # pooled_binary
            names = ("dice", "iou", "precision", "recall", "tp", "fp", "fn")

            def by_class(accs) -> dict:
                out = {}
                for c, acc in zip(fg, accs):
                    s = acc.summary()
                    out.update({f"{m}_class{c}": s[m] for m in names})
                return out

            rows = [{"case": case, "items": state.counts[case], **by_class(state.per_case[case])} for case in cases]
            pooled = by_class(state.pooled)
            for m in names[:4]:
                pooled[f"{m}_mean"] = _nanmean([pooled[f"{m}_class{c}"] for c in fg])
        return rows, pooled

    def compute(self) -> tuple[list[dict], dict | None]:
        """Per-case rows (sorted by case) and, for the pooled protocols, the pooled metrics.

        With ``group_key``, the rows of each group (groups in first-seen order) carry the group in their first column
        ``group_key``, and the pooled metrics are ``{group: metrics}``.
        """
        if not self._groups:
            raise ValueError(f"the evaluation protocol {self.protocol!r} got no item to score")
        if self.group_key is None:
            return self._compute_group(self._groups[None])
        rows: list[dict] = []
        pooled: dict | None = {} if self.protocol in POOLED else None
        for group, state in self._groups.items():
            group_rows, group_pooled = self._compute_group(state)
            rows += [{self.group_key: group, **row} for row in group_rows]
            if pooled is not None:
                pooled[group] = group_pooled
        return rows, pooled

    def write(self, engine: Engine | None = None) -> tuple[Path, ...]:
        """Compute the protocol and write the CSV files; returns their paths."""
        self.rows, self.pooled = self.compute()
        paths = write_results(self.rows, self.output_dir, self.protocol, group_key=self.group_key)
        groups = list(self._groups)
        by_name = {str(g): g for g in groups}  # the summary file holds the groups as text
        with open(paths[1], newline="") as f:
            summary: dict[Any, dict[str, float]] = {}
            for r in csv.DictReader(f):
                group = by_name[r[self.group_key]] if self.group_key else None
                summary.setdefault(group, {})[r["metric"]] = float(r["mean"])
        pooled = {None: self.pooled} if self.group_key is None and self.pooled is not None else self.pooled
        for group in groups:
            where = f"{self.group_key} {group!r}, " if self.group_key else ""
            n = sum(1 for r in self.rows if self.group_key is None or r[self.group_key] == group)
            logger.info(
                f"Evaluation protocol {self.protocol!r}, {where}mean over {n} cases: "
                + ", ".join(f"{k}={v:.4f}" for k, v in summary.get(group, {}).items())
            )
            if pooled is not None:
                logger.info(
                    f"Evaluation protocol {self.protocol!r}, {where}pooled over its test set: "
                    + ", ".join(
                        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in pooled[group].items()
                    )
                )
        if pooled is not None:
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(([self.group_key] if self.group_key else []) + ["metric", "value"])
            for group in groups:
                writer.writerows(([group] if self.group_key else []) + [k, v] for k, v in pooled[group].items())
            pooled_path = self.output_dir / f"{self.protocol}_pooled.csv"
            atomic_write_bytes(pooled_path, text.getvalue().encode())
            paths = (*paths, pooled_path)
        logger.info(f"Evaluation protocol {self.protocol!r}: results in {self.output_dir}")
        return paths
