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

__all__ = ["load_datalist", "load_domains", "check_datalist", "image_shape", "image_geometry", "read_label", "Entries"]

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
    entries = Entries()
    entries.source = f"the '{key}' list of datalist {path}"
    if content[key]:  # MONAI's loader fails on an empty "test" list
        entries += load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(base_dir or path.parent))
    return entries


class Entries(list):
    """A list of datalist entries that remembers where it comes from (``source``), so that
    :func:`check_datalist` can name the list and the file of an empty or bad list."""

    source: str = "the datalist"



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


def image_geometry(path: str, shape: Sequence[int]) -> tuple[tuple[int, ...], int | None]:
    """(spatial shape, channels) of an image file of array ``shape``, as MONAI's ``LoadImage`` +
    ``EnsureChannelFirst`` will see it: NIfTI up to 3 spatial axes then channels (4th/5th axes); PNG/JPG 2 spatial axes
    then colour bands. ``channels`` is ``None`` for other formats (not checked)."""
    shape = tuple(int(s) for s in shape)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return shape[:3], int(np.prod(shape[3:])) if len(shape) > 3 else 1
    if suffix in PIL_SUFFIXES:
        return shape[:2], shape[2] if len(shape) > 2 else 1
    return shape, None


def _check_geometry(where: str, path: str, shape: Sequence[int], spatial_dims: int | None, in_channels: int | None) -> None:
    spatial, channels = image_geometry(path, shape)
    if spatial_dims is not None:
        dims = len(_spatial(spatial)) if spatial_dims == 2 else len(spatial)
        if dims != spatial_dims:
            raise ValueError(
                f"{where}: image {path} has shape {tuple(shape)}, a {dims}D image, but this bundle is {spatial_dims}D "
                f"(spatial_dims={spatial_dims}); use {spatial_dims}D images or a {dims}D recipe"
            )
    if in_channels is not None and channels is not None and channels != in_channels:
        raise ValueError(
            f"{where}: image {path} has {channels} channel(s) (shape {tuple(shape)}) but the network takes "
            f"in_channels={in_channels}; convert the images or set --in_channels {channels}"
        )


def _read_values(where: str, key: str, path: str) -> np.ndarray:
    """Every voxel of ``path`` (which catches truncated and corrupt files), errors naming the entry and file."""
    try:
        return read_label(path)
    except Exception as e:
        raise ValueError(f"{where}: cannot read {key} file {path} ({type(e).__name__}: {e}); the file is truncated or "
                         "corrupt") from e


def check_datalist(
    items: Sequence[dict],
    num_classes: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    check_labels: bool = True,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    require_label: bool | None = None,
) -> list[dict]:
    """Check every entry and return ``items`` unchanged (so a config can wrap the datalist with it).

    The list must not be empty. For each entry: the image (and label, when the entry has one) exists and can be read
    completely (a truncated or corrupt file is an error here, not deep in dataset caching); every image value is
    finite (NaN/Inf would poison the loss or silently lower a validation Dice); image and label have the same
    spatial shape (a trailing channel axis on the image is allowed); with ``check_labels``, label values are
    integers in ``[0, num_classes)``; with ``spatial_dims`` / ``in_channels``, the image has that many spatial axes
    and channels as MONAI will load it (an RGB PNG for a 1-channel network, a 3D volume for a 2D bundle or a 2D image
    for a 3D bundle are refused).

    Args:
        items: the entries (what :func:`load_datalist` returns names its list and file in errors).
        num_classes: number of classes (label values ``0..num_classes-1``).
        image_key / label_key: entry keys of the image and label files.
        check_labels: check label values against ``num_classes``.
        spatial_dims / in_channels: the network's, ``None`` to skip.
        require_label: every entry must have ``label_key`` (training and validation lists); default: when at
            least one entry has one (an entry that lost its label among labelled ones).

    Raises:
        FileNotFoundError / KeyError / ValueError: naming the entry and the file.
    """
    source = getattr(items, "source", "the datalist")
    if not items:
        raise ValueError(f"{source} is empty: it needs at least one entry")
    if require_label is None:
        require_label = any(label_key in item for item in items)
    for i, item in enumerate(items):
        where = f"datalist entry {i} of {source}" if source != "the datalist" else f"datalist entry {i}"
        if image_key not in item:
            raise KeyError(f"{where} has no '{image_key}' key: {item}")
        if require_label and label_key not in item:
            raise KeyError(f"{where} has no '{label_key}' key (image {item[image_key]}); every entry of this list needs "
                           "a label")
        files = {k: item[k] for k in (image_key, label_key) if k in item}
        shapes = {}
        for key, path in files.items():
            paths = list(path) if isinstance(path, (list, tuple)) else [path]  # multi-file images: check each file
            for p in paths:
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{where}: {key} file not found: {p}")
                try:
                    shape = image_shape(p)
                except Exception as e:
                    raise ValueError(f"{where}: cannot read {key} file {p}: {e}") from e
                shapes.setdefault(key, shape)
                if key == image_key:
                    values = _read_values(where, key, p)
                    if not np.isfinite(values).all():
                        bad = int((~np.isfinite(values)).sum())
                        raise ValueError(f"{where}: image {p} has {bad} non-finite value(s) (NaN/Inf); fix or remove it")
                    if len(paths) == 1:
                        _check_geometry(where, p, shape, spatial_dims, in_channels)
            files[key] = paths[0]
        if label_key in shapes:
            img, lab = _spatial(shapes[image_key]), _spatial(shapes[label_key])
            # spatial parts as LoadImage reads them (a 2D NIfTI with channels is (H, W, 1, C), its label (H, W, 1))
            img_spatial = _spatial(image_geometry(files[image_key], shapes[image_key])[0])
            lab_spatial = _spatial(image_geometry(files[label_key], shapes[label_key])[0])
            if img != lab and img[:-1] != lab and img_spatial != lab_spatial:
                raise ValueError(
                    f"{where}: image {files[image_key]} has shape {shapes[image_key]} but label "
                    f"{files[label_key]} has shape {shapes[label_key]}"
                )
            if check_labels and num_classes is not None:
                values = np.unique(_read_values(where, label_key, files[label_key]))
                bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))]
                if bad.size:
                    raise ValueError(
                        f"{where}: label {files[label_key]} has values {bad[:10].tolist()} outside the "
                        f"classes 0..{num_classes - 1} (num_classes={num_classes})"
                    )
    return list(items)
