"""Shared conversion framework for public downloads: cases in, NIfTI + an MSD-style datalist out.

A dataset reader (see :mod:`medkd.data.datasets`) lists :class:`Case` objects; :func:`convert` checks and
transforms every case (HU window, label mapping, 2D slice extraction, resize), splits them by patient and writes
``imagesTr/``, ``labelsTr/`` and ``datalist.json``. Everything is written to a temporary folder beside the
output folder and moved into place only when every case succeeded, so a failure leaves no partial output.

Volumes (CT, MRI) are written as NIfTI; natively 2D images (photographs: ultrasound, endoscopy, fundus) keep their
8-bit intensities and are written as PNG, grey or RGB, which MONAI's ``LoadImaged`` reads with PIL. A multi-channel
image has its channels on the last axis (``image.shape[:-1] == label.shape``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medkd.data.demo import nifti_bytes

__all__ = ["Case", "ConvertOptions", "LABEL_PRESETS", "apply_window", "map_labels", "resize_inplane", "split_cases",
           "convert"]

SPLITS = ("training", "validation", "test")
# Label presets. "organ": every foreground value -> 1 (EMKD organ task, label > 0); "tumour": value v -> max(v - 1, 0)
# (EMKD tumour task on LiTS/KiTS: 2 -> 1, 1 -> 0).
LABEL_PRESETS: dict[str, Callable[[int], int]] = {"organ": lambda v: int(v > 0), "tumour": lambda v: max(int(v) - 1, 0)}


@dataclass(frozen=True)
class Case:
    """One patient of a download.

    Args:
        case_id: patient id (written to every datalist entry as ``"case"``; splits never share a patient).
        image_path: the file named in errors about the image.
        label_path: the file named in errors about the label.
        load: returns ``(image, label, affine)``: the label, the image with the label's shape plus optionally a
            trailing channel axis (RGB, MRI sequences), and a 4x4 voxel-to-mm affine. A 3D label is a volume (2D
            extraction slices its last axis); a 2D label marks a natively 2D image, written as PNG.
        extra: fields copied into every datalist entry of the case (e.g. ``{"class": "benign"}``).
    """

    case_id: str
    image_path: Path
    label_path: Path
    load: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ConvertOptions:
    """Options of :func:`convert`.

    Args:
        dims: 2 writes axial slices (last axis) of every volume, 3 writes whole volumes. Natively 2D images are
            always written as they are (``dims=3`` is an error for them).
        slices: 2D only; ``"target"`` keeps only slices (or 2D images) whose mapped label has foreground,
            ``"all"`` keeps all.
        window: ``(low, high)`` intensity window (e.g. HU); values are clipped to it and mapped linearly to
            ``out_range``. ``None`` keeps intensities unchanged. Volumes only: 2D photographs stay 8-bit.
        resize: ``(height, width)`` of the first two (in-plane) axes of every written image and label: images
            linearly (antialiased when shrinking), labels by nearest neighbour; the affine's spacing follows.
            ``None`` keeps the size.
        out_range: range the window is mapped to.
        label_map: a preset name from :data:`LABEL_PRESETS` or a ``{raw: new}`` dict (unlisted values kept);
            ``None`` keeps raw labels.
        val_fraction / test_fraction: share of patients in validation / test when no standard split applies
            (with a standard split, validation is drawn from its non-test patients).
        seed: seed of the patient split and of the fraction subsets.
        labelled_fraction: share of training patients that keep labels; the others go to ``"unlabeled"``
            (image only).
        data_fraction: share of training patients kept at all (e.g. 0.5 for a student trained on 50% of data).
    """

    dims: int = 2
    slices: str = "target"
    window: tuple[float, float] | None = None
    out_range: tuple[float, float] = (-1.0, 1.0)
    resize: tuple[int, int] | None = None
    label_map: str | dict | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    labelled_fraction: float = 1.0
    data_fraction: float = 1.0

    def __post_init__(self):
        if self.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {self.dims!r}")
        if self.slices not in ("target", "all"):
            raise ValueError(f"slices must be 'target' or 'all', got {self.slices!r}")
        if isinstance(self.label_map, str) and self.label_map not in LABEL_PRESETS:
            raise ValueError(f"unknown label_map {self.label_map!r}; presets: {sorted(LABEL_PRESETS)} or a dict")
        if self.resize is not None and (len(self.resize) != 2 or min(int(v) for v in self.resize) < 1):
            raise ValueError(f"resize must be (height, width) of positive sizes, got {self.resize!r}")
        if self.window is not None and not float(self.window[0]) < float(self.window[1]):
            raise ValueError(f"window must be (low, high) with low < high, got {self.window!r}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("labelled_fraction", "data_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")


def apply_window(image: np.ndarray, window: Sequence[float], out_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
    """Clip ``image`` to ``window`` and map it linearly to ``out_range`` (float32)."""
    lo, hi = float(window[0]), float(window[1])
    a, b = float(out_range[0]), float(out_range[1])
    scaled = (np.clip(image.astype(np.float64), lo, hi) - lo) / (hi - lo)
    return (a + scaled * (b - a)).astype(np.float32)


def map_labels(label: np.ndarray, label_map: str | dict | None) -> np.ndarray:
    """Apply a preset name or ``{raw: new}`` dict to every value of ``label`` (uint8 result)."""
    label = np.asarray(label)
    if label_map is None:
        return label.astype(np.uint8)
    rule = LABEL_PRESETS[label_map] if isinstance(label_map, str) else lambda v: label_map.get(int(v), int(v))
    out = label.astype(np.uint8, copy=True)
    for value in np.unique(label):
        out[label == value] = rule(value)
    return out


def resize_inplane(array: np.ndarray, size: Sequence[int], nearest: bool) -> np.ndarray:
    """Resize the first two axes of ``array`` (``(H, W, ...)``) to ``size``; trailing axes are kept.

    ``nearest=True`` (labels) picks the nearest source pixel (``nearest-exact``: pixel centres aligned);
    otherwise the values are interpolated linearly, with antialiasing when shrinking. The dtype is kept
    (integer images are rounded and clipped to their range).
    """
    array = np.asarray(array)
    h, w, rest = array.shape[0], array.shape[1], array.shape[2:]
    size = (int(size[0]), int(size[1]))
    if (h, w) == size:
        return array
    x = torch.from_numpy(np.ascontiguousarray(array.reshape(h, w, -1).transpose(2, 0, 1)).astype(np.float32))[None]
    if nearest:
        y = torch.nn.functional.interpolate(x, size=size, mode="nearest-exact")
    else:
        y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    out = y[0].numpy().transpose(1, 2, 0).reshape(*size, *rest)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(array.dtype)


def _fraction_subset(ids: list[str], fraction: float, rng: np.random.Generator) -> set[str]:
    if fraction >= 1.0:
        return set(ids)
    keep = max(1, round(fraction * len(ids)))
    return {ids[i] for i in rng.permutation(len(ids))[:keep]}


def split_cases(case_ids: Sequence[str], options: ConvertOptions, standard: dict[str, str] | None = None) -> dict[str, str]:
    """Split of every patient: ``"training"``, ``"validation"``, ``"test"``, ``"unlabeled"`` or ``"unused"``.

    ``standard`` maps patient ids to ``"training"`` or ``"test"`` (a published split); patients it does not name
    are an error. Otherwise test and validation are drawn with ``options.seed``. Validation is then drawn from the
    non-test patients, and ``data_fraction`` / ``labelled_fraction`` subsets from the remaining training patients.
    """
    ids = sorted(case_ids)
    rng = np.random.default_rng(options.seed)
    if standard is not None:
        unknown = [c for c in ids if c not in standard]
        if unknown:
            raise ValueError(f"cases {unknown} are not in the standard split; use --split random to split by seed")
        test = {c for c in ids if standard[c] == "test"}
    else:
        test = {ids[i] for i in rng.permutation(len(ids))[: round(options.test_fraction * len(ids))]}
    rest = [c for c in ids if c not in test]
    val = {rest[i] for i in rng.permutation(len(rest))[: round(options.val_fraction * len(rest))]}
    train = [c for c in rest if c not in val]
    kept = _fraction_subset(train, options.data_fraction, rng)
    labelled = _fraction_subset(sorted(kept), options.labelled_fraction, rng)
    split = {c: "test" for c in test} | {c: "validation" for c in val}
    for c in train:
        split[c] = "training" if c in labelled else "unlabeled" if c in kept else "unused"
    return split


def _load_case(case: Case, allowed: set[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load and check one case; errors name the offending file."""
    for path in (case.image_path, case.label_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"case {case.case_id}: file not found: {path}")
    try:
        image, label, affine = case.load()
    except Exception as e:
        raise ValueError(f"case {case.case_id}: cannot read {case.image_path} / {case.label_path}: {e}") from e
    image, label = np.asarray(image), np.asarray(label)
    if label.ndim not in (2, 3):
        raise ValueError(f"case {case.case_id}: label {case.label_path} must be 2D or 3D, got shape {label.shape}")
    if image.shape != label.shape and image.shape[:-1] != label.shape:
        raise ValueError(f"case {case.case_id}: image {case.image_path} has shape {image.shape} but label "
                         f"{case.label_path} has shape {label.shape}")
    values = np.unique(label)
    bad = [v for v in values.tolist() if v != round(v) or (allowed is not None and int(v) not in allowed)]
    if bad:
        raise ValueError(f"case {case.case_id}: label {case.label_path} has unexpected values {bad[:10]}; "
                         f"expected {sorted(allowed) if allowed is not None else 'integers'}")
    return image, label, np.asarray(affine, dtype=np.float64)


def _case_items(case: Case, image, label, affine, options: ConvertOptions):
    """``(name, image, label, affine, slice index or None)`` for each output file of a case."""
    if label.ndim == 2:  # a natively 2D image
        if options.dims == 3:
            raise ValueError(f"case {case.case_id}: {case.image_path} is a 2D image; use dims=2")
        if options.slices == "target" and not label.any():
            return []
        return [(case.case_id, image, label, affine, None)]
    if options.dims == 3:
        return [(case.case_id, image, label, affine, None)]
    if image.ndim != label.ndim:
        raise ValueError(f"case {case.case_id}: 2D slices of the multi-channel volume {case.image_path} cannot be "
                         "written as 2D NIfTI; use dims=3")
    items = []
    for z in range(label.shape[-1]):
        if options.slices == "target" and not label[..., z].any():
            continue
        z_affine = affine.copy()
        z_affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, z]) + affine[:3, 3]
        items.append((f"{case.case_id}_z{z:03d}", image[..., z], label[..., z], z_affine, z))
    return items


def _png_bytes(array: np.ndarray, path: Path) -> bytes:
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array))):
            raise ValueError(f"{path}: a 2D image must hold 8-bit values to be written as PNG "
                             f"(range {array.min()}..{array.max()})")
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        raise ValueError(f"{path}: a 2D image needs 1, 3 or 4 channels, got {array.shape[-1]}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _scaled_affine(affine: np.ndarray, before: Sequence[int], after: Sequence[int]) -> np.ndarray:
    out = affine.copy()
    for axis in range(2):
        out[:3, axis] = affine[:3, axis] * before[axis] / after[axis]
    return out


def _write_tree(tmp: Path, cases: Sequence[Case], split: dict[str, str], options: ConvertOptions,
                allowed: set[int] | None) -> dict[str, list[dict]]:
    lists: dict[str, list[dict]] = {name: [] for name in (*SPLITS, "unlabeled")}
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    for number, case in enumerate(cases, 1):
        if split[case.case_id] == "unused":
            continue
        print(f"[prepare] case {number}/{len(cases)}: {case.case_id} ({split[case.case_id]})", flush=True)
        image, label, affine = _load_case(case, allowed)
        photo = label.ndim == 2
        if options.window is not None:
            if photo:
                raise ValueError(f"case {case.case_id}: window applies to volumes (CT); {case.image_path} is a 2D "
                                 "8-bit image")
            image = apply_window(image, options.window, options.out_range)
        label = map_labels(label, options.label_map)
        image = image if photo else image.astype(np.float32)
        for name, img, lab, aff, z in _case_items(case, image, label, affine, options):
            if options.resize is not None:
                aff = _scaled_affine(aff, lab.shape, options.resize)
                img = resize_inplane(img, options.resize, nearest=False)
                lab = resize_inplane(lab, options.resize, nearest=True)
            suffix = ".png" if photo else ".nii.gz"
            entry = {"image": f"imagesTr/{name}{suffix}", "label": f"labelsTr/{name}{suffix}", "case": case.case_id}
            if z is not None:
                entry["slice"] = z
            entry.update(case.extra)
            (tmp / entry["image"]).write_bytes(_png_bytes(img, case.image_path) if photo else nifti_bytes(img, aff))
            if split[case.case_id] == "unlabeled":
                del entry["label"]
            else:
                (tmp / entry["label"]).write_bytes(_png_bytes(lab, case.label_path) if photo else nifti_bytes(lab, aff))
            lists[split[case.case_id]].append(entry)
    return lists


def convert(
    cases: Sequence[Case],
    out: str | os.PathLike,
    options: ConvertOptions,
    allowed_labels: set[int] | None = None,
    standard_split: dict[str, str] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``cases`` as NIfTI + ``datalist.json`` to the new folder ``out``; returns the datalist path.

    Args:
        cases: the patients of a download (at least one).
        out: output folder; must not exist yet (it appears only when every case succeeded).
        options: see :class:`ConvertOptions`.
        allowed_labels: raw label values a label file may hold; others raise an error naming the file.
        standard_split: published ``{case_id: "training" | "test"}`` split, or ``None`` for a seeded split.
        metadata: extra top-level datalist fields (name, labels, reference, ...).

    Raises:
        FileExistsError: when ``out`` exists. FileNotFoundError / ValueError: naming the file of a bad case.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; remove it or choose another --out")
    if not cases:
        raise ValueError("no cases found to convert")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate case ids: {sorted({c for c in ids if ids.count(c) > 1})}")
    split = split_cases(ids, options, standard_split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        lists = _write_tree(tmp, cases, split, options, allowed_labels)
        if not lists["unlabeled"]:
            del lists["unlabeled"]
        datalist = {
            **(metadata or {}),
            "tensorImageSize": f"{options.dims}D",
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
            **{f"num{k[0].upper()}{k[1:]}": len(v) for k, v in lists.items()},
            **lists,
        }
        (tmp / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "datalist.json"
