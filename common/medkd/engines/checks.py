"""Checks a training run makes before its first step, so that a mistake is an error naming the config key instead
of a failure deep in the loss or after the first epoch."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["output_channels", "check_output_channels", "check_writable"]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out:
        return _first_tensor(out[0])
    raise TypeError(f"network output of type {type(out).__name__} holds no tensor")


def output_channels(network: torch.nn.Module, in_channels: int, spatial_size: Sequence[int]) -> int:
    """Channels of ``network``'s (first) output for a zero input of shape ``(1, in_channels, *spatial_size)``, run in
    eval mode without gradients (no BatchNorm statistics change); the training mode is restored."""
    network = _unwrap(network)
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = network(torch.zeros(1, int(in_channels), *[int(s) for s in spatial_size], device=device))
    finally:
        network.train(was_training)
    return int(_first_tensor(out).shape[1])


def check_output_channels(distiller, num_classes: int, in_channels: int, roi_size: Sequence[int]) -> None:
    """The student (``network_def``) outputs ``num_classes`` channels, and so does a live teacher (``teacher_def``).

    Raises:
        ValueError: naming ``network_def`` / ``teacher_def`` and ``num_classes``.
    """
    student = getattr(distiller, "student", None)
    if student is None:
        return
    got = output_channels(student, in_channels, roi_size)
    if got != num_classes:
        raise ValueError(
            f"network_def (the student) outputs {got} channels but num_classes is {num_classes}: set network_def's "
            f"output channels (e.g. --network_def#out_channels {num_classes}) or num_classes so that they agree"
        )
    teacher = getattr(getattr(distiller, "teacher", None), "network", None)
    if isinstance(teacher, torch.nn.Module) and getattr(distiller, "uses_teacher", True):
        got_t = output_channels(teacher, in_channels, roi_size)
        if got_t != got:
            raise ValueError(
                f"teacher_def outputs {got_t} channels but the student (network_def) outputs {got} (num_classes "
                f"{num_classes}): a teacher must segment the same classes; check teacher_def and teacher_ckpt"
            )


def check_writable(*folders: str | os.PathLike) -> None:
    """Files can be written in each folder: it exists and takes a file (tried, then removed), or its nearest
    existing parent folder does (the folder itself is created later, by the writer). Nothing is left on disk.

    Raises:
        PermissionError / NotADirectoryError / OSError: naming the folder.
    """
    for folder in folders:
        folder = Path(folder)
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        probe = existing / f".write-test.{uuid.uuid4().hex}.tmp"
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, f"{existing} is a file, not a folder")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise type(e)(f"cannot write in the output folder {folder} ({e.strerror or e}); choose another folder "
                          "(--ckpt_dir / --output_dir) or fix its permissions") from e
