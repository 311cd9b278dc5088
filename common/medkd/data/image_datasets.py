"""Readers of 2D image downloads in their released layout: ``busi``, ``cvc_clinicdb``, ``chasedb1``, ``drive``,
``stare``, ``m2caiseg``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from medkd.data.download import Download

__all__ = ["IMAGE_READERS"]

IMAGE_READERS: dict[str, Callable[[Path], Download]] = {}
