"""MSD/Decathlon-style datalists: loading with clear errors, and an up-front check of every entry.

:func:`check_datalist` runs when a bundle builds its datasets, before any training step and before anything
is written, so a bad entry stops the run with a message naming the file and leaves earlier outputs untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage

__all__ = ["load_datalist", "load_domains", "check_datalist", "image_shape", "read_label"]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".img", ".hdr")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def load_datalist(path: str | os.PathLike, key: str = "training", base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Entries of ``key`` in the datalist JSON at ``path``, with relative paths joined to ``base_dir``.

    ``base_dir`` defaults to the datalist's folder. Errors name the file and the missing key. An empty list gives
    ``[]``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist file not found: {path}. Create one with `python -m medkd prepare demo --out DIR`.")
    with open(path) as f:
        content = json.load(f)
    if key not in content:
        raise KeyError(f"datalist {path} has no '{key}' list; it has {sorted(k for k, v in content.items() if isinstance(v, list))}")
    if not content[key]:  # MONAI's loader fails on an empty "test" list
        return []
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(base_dir or path.parent))



def load_domains(
    domains: Mapping[str, str | os.PathLike], split: str = "test", key: str = "domain"
) -> list[dict]:
    """The ``split`` entries of several datasets ("domains"), concatenated for one cross-domain evaluation run.

    Each domain is read as :func:`load_datalist` reads one dataset (relative paths joined to the datalist's folder).
    Every entry is tagged with ``entry[key] = name`` (what :class:`medkd.engines.ProtocolSaver` groups by with
    ``group_key=key``), and its ``case`` id, when it has one, becomes ``"<name>:<case>"``, so that case ids are unique
    across domains (two datasets written by ``python -m medkd prepare`` may both have a ``sub-000``). Entries
    without ``case`` keep none (the evaluation names them by their image file). The result is a plain list of
    dicts, so :func:`check_datalist` checks it like any other datalist.

    Example (in a bundle's evaluate config: train on one domain, test on it and on a shifted copy)::

        "$medkd.data.check_datalist(medkd.data.load_domains({'clean': @dataset_dir, 'shift': 'data/demo2d_shift'},
         @eval_split), @num_classes)"

    Args:
        domains: domain name -> dataset folder holding ``datalist.json``, or the path of a datalist file; entries
            keep the mapping's order.
        split: the datalist list to read from every domain (``"test"``, ``"validation"``, ...).
        key: the entry key that receives the domain name.

    Raises:
        ValueError: no domain, a bad domain name or key, or an empty ``split`` in a domain.
        FileNotFoundError / KeyError: a domain whose folder or datalist is missing or lacks ``split``, naming it.
    """
    if not isinstance(domains, Mapping) or not domains:
        raise ValueError(f"domains must be a non-empty mapping of domain name -> dataset folder, got {domains!r}")
    if not (isinstance(key, str) and key) or key in ("image", "label", "case"):
        raise ValueError(f"key must be an entry key other than 'image', 'label' and 'case', got {key!r}")
    items: list[dict] = []
    for name, source in domains.items():
        if not (isinstance(name, str) and name) or ":" in name:
            raise ValueError(f"domain names must be non-empty strings without ':', got {name!r}")
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"domain {name!r}: {path} does not exist (expected a dataset folder or a datalist file)"
            )
        datalist = path / "datalist.json" if path.is_dir() else path
        try:
            entries = load_datalist(datalist, split)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"domain {name!r}: {e}") from e
        except KeyError as e:
            raise KeyError(f"domain {name!r}: {e.args[0]}") from e
        if not entries:
            raise ValueError(f"domain {name!r}: the '{split}' list of {datalist} is empty")
        for entry in entries:
            entry[key] = name
            if entry.get("case") is not None:
                entry["case"] = f"{name}:{entry['case']}"
        items += entries
    return items

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
