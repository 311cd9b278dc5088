"""Small file helpers shared by the data preparation and the training engine: atomic writes and safe loads."""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from monai.data import NibabelWriter
from monai.transforms import Spacingd

__all__ = ["file_sha256", "atomic_write_bytes", "atomic_torch_save", "load_state_dict_file", "temp_files_of", "remove_stale_temp_files",
           "ShapeKeepingNibabelWriter", "MetaSafeSpacingd"]

_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp$")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    A crash leaves either the old file or the new one, never a truncated file. The file gets the usual
    permissions (``0o666`` minus the umask), not the ``0o600`` of a bare temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def temp_files_of(path: str | os.PathLike) -> list[Path]:
    """The temporary files (``.NAME.<uuid>.tmp``) that :func:`atomic_write_bytes` writes next to ``path``; after a
    kill they stay behind."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if (m := _TEMP.match(p.name)) and m["name"] == path.name)


def remove_stale_temp_files(*paths: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed writer of ``paths`` left behind (call it before the writer starts again,
    never while one writes); returns what was removed."""
    removed = []
    for path in paths:
        for tmp in temp_files_of(path):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` with the atomic-rename guarantee of :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state_dict_file(path: str | os.PathLike, map_location: Any = "cpu", key: str | None = "model") -> dict:
    """Load a state dict saved by ``torch.save`` with ``weights_only=True``.

    Accepts a bare state dict (what MONAI's ``CheckpointSaver`` writes for a single object) or a dict holding it
    under ``key`` (what ``{"model": net}`` checkpoints and MONAI Label write).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file cannot be read as a weights-only checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"cannot read checkpoint {path} as a weights-only state dict: {e}") from e
    if key and isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
        ckpt = ckpt[key]
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks (checkpoints, large files, cache manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShapeKeepingNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes a one-channel image (a segmentation) with the spatial shape it has.

    ``SaveImage`` squeezes every trailing singleton axis (``squeeze_end_dims``) to drop the channel axis, which also
    drops the last spatial axis of a one-slice 3D volume (32×48×1 came back as 32×48). This writer keeps the spatial
    axes and drops only a channel axis of size 1; pass it as ``SaveImaged(writer=...)``.
    """

    def set_data_array(self, data_array, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs):
        shape = tuple(data_array.shape)
        spatial = shape if channel_dim is None else shape[:channel_dim] + shape[channel_dim:][1:]
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if channel_dim is None or shape[channel_dim] == 1:
            self.data_obj = self.data_obj.reshape(spatial)


class MetaSafeSpacingd(Spacingd):
    """MONAI's ``Spacingd`` (same arguments, same inverse) that tolerates non-dictionary ``<key>_*`` entries.

    After resampling a NIfTI image, ``Spacingd`` calls ``.update()`` on every data entry whose name starts with
    ``"<key>_"``, assuming each is a metadata dictionary; MONAI Label's inference requests carry ``image_path`` (a
    string), so the served bundles' ``inference.json`` failed there. This subclass sets such entries aside during the
    call and puts them back unchanged.
    """

    def __call__(self, data, lazy: bool | None = None):
        d = dict(data)
        aside = {k: d.pop(k) for k in list(d) if isinstance(k, str) and any(
            k.startswith(f"{key}_") for key in self.keys) and not isinstance(d[k], dict)}
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out
