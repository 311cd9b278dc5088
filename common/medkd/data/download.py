"""What every dataset reader shares: :class:`Download` and the file helpers whose errors name the file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from medkd.data.convert import Case

__all__ = ["Download", "read_or_fail", "nifti_pair", "strip_nifti"]


@dataclass
class Download:
    """What a reader finds in a download: cases, allowed raw labels, a standard split, metadata, option defaults."""

    cases: list[Case]
    allowed_labels: set[int]
    metadata: dict
    standard_split: dict[str, str] | None = None
    defaults: dict = field(default_factory=dict)


def read_or_fail(path: Path, reader: Callable):
    """``reader(path)``, with any failure re-raised as a ValueError that names ``path``."""
    try:
        return reader(path)
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def nifti_pair(image_path: Path, label_path: Path):
    """``(image float32, label raw, affine)`` of two NIfTI files; errors name the file."""
    image = read_or_fail(image_path, nib.load)
    label = read_or_fail(label_path, nib.load)
    return (read_or_fail(image_path, lambda _: image.get_fdata(dtype=np.float32)),
            read_or_fail(label_path, lambda _: np.asarray(label.dataobj)), image.affine)


def strip_nifti(name: str) -> str:
    """``"a.nii.gz"`` -> ``"a"``."""
    return re.sub(r"\.nii(\.gz)?$", "", name)
