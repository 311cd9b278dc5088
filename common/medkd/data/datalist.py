"""MSD/Decathlon-style datalists: loading with clear errors, and an up-front check of every entry.

:func:`check_datalist` runs when a bundle builds its datasets, before any training step and before anything
is written, so a bad entry stops the run with a message naming the file and leaves earlier outputs untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage

__all__ = ["load_datalist", "check_datalist", "image_shape", "read_label"]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".img", ".hdr")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def load_datalist(path: str | os.PathLike, key: str = "training", base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Entries of ``key`` in the datalist JSON at ``path``, with relative paths joined to ``base_dir``.

    ``base_dir`` defaults to the datalist's folder. Errors name the file and the missing key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist file not found: {path}. Create one with `python -m medkd prepare demo --out DIR`.")
    with open(path) as f:
        content = json.load(f)
    if key not in content:
        raise KeyError(f"datalist {path} has no '{key}' list; it has {sorted(k for k, v in content.items() if isinstance(v, list))}")
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(base_dir or path.parent))


def _suffix(path: str) -> str:
    name = str(path).lower()
    return next((s for s in NIFTI_SUFFIXES + PIL_SUFFIXES if name.endswith(s)), Path(name).suffix)


def image_shape(path: str) -> tuple[int, ...]:
    """Array shape of an image file, from its header where the format allows (NIfTI, PNG/JPG/...)."""
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return tuple(int(s) for s in nib.load(path).shape)
    if suffix in PIL_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            bands = len(im.getbands())
            return (im.width, im.height) + ((bands,) if bands > 1 else ())
    return tuple(LoadImage(image_only=True)(path).shape)


def read_label(path: str) -> np.ndarray:
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return np.asarray(nib.load(path).dataobj)
    return np.asarray(LoadImage(image_only=True)(path))


def _spatial(shape: Sequence[int]) -> tuple[int, ...]:
    shape = list(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def check_datalist(
    items: Sequence[dict],
    num_classes: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    check_labels: bool = True,
) -> list[dict]:
    """Check every entry and return ``items`` unchanged (so a config can wrap the datalist with it).

    For each entry: the image (and label, when the entry has one) exists and is readable; image and label
    have the same spatial shape (a trailing channel axis on the image is allowed); with ``check_labels``, label
    values are integers in ``[0, num_classes)``.

    Raises:
        FileNotFoundError / ValueError: naming the entry and the file.
    """
    for i, item in enumerate(items):
        if image_key not in item:
            raise KeyError(f"datalist entry {i} has no '{image_key}' key: {item}")
        files = {k: item[k] for k in (image_key, label_key) if k in item}
        shapes = {}
        for key, path in files.items():
            if isinstance(path, (list, tuple)):  # multi-file images (e.g. several modalities): check each file
                for p in path:
                    if not os.path.isfile(p):
                        raise FileNotFoundError(f"datalist entry {i}: {key} file not found: {p}")
                path = path[0]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"datalist entry {i}: {key} file not found: {path}")
            try:
                shapes[key] = image_shape(path)
            except Exception as e:
                raise ValueError(f"datalist entry {i}: cannot read {key} file {path}: {e}") from e
        if label_key in shapes:
            img, lab = _spatial(shapes[image_key]), _spatial(shapes[label_key])
            if img != lab and img[:-1] != lab:
                raise ValueError(
                    f"datalist entry {i}: image {files[image_key]} has shape {shapes[image_key]} but label "
                    f"{files[label_key]} has shape {shapes[label_key]}"
                )
            if check_labels and num_classes is not None:
                values = np.unique(read_label(files[label_key]))
                bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))]
                if bad.size:
                    raise ValueError(
                        f"datalist entry {i}: label {files[label_key]} has values {bad[:10].tolist()} outside the "
                        f"classes 0..{num_classes - 1} (num_classes={num_classes})"
                    )
    return list(items)
