"""Readers of CT downloads in their released layout: ``kits19``, ``chaos`` (CT, DICOM series), ``flare22``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from medkd.data.download import Download

__all__ = ["CT_READERS"]

CT_READERS: dict[str, Callable[[Path], Download]] = {}
