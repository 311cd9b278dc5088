"""An evaluator handler that measures GKD's Frechet Semantic Distance (FSD) on the evaluated images."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from medkd.distill.gkd import load_stage_file, output_of
from medkd.distill.teacher import LiveTeacher
from medkd.io import atomic_write_bytes
from medkd.metrics.fsd import frechet_semantic_distance
from medkd.networks.taps import resolve_tap

__all__ = ["FSDSaver"]

logger = logging.getLogger(__name__)


class FSDSaver:
    """Ignite handler: MSAN vectors of every evaluated image, then GKD's two FSD pairings, written to ``fsd.csv``.

    At every evaluator iteration it runs the student (and the teacher, when given) on the batch's input images up to
    the bottleneck (:func:`medkd.distill.output_of`; the decoders do not run) and encodes the bottlenecks with the
    frozen MSANs of the ``train_msan.json`` stage, one ``d``-vector per image. Images are grouped by ``group_key``
    (the ``domain`` that :func:`medkd.data.load_domains` writes; one group ``"all"`` without it). At the end it
    computes (:func:`medkd.metrics.frechet_semantic_distance`, PCA to ``min(n) - 1`` dimensions for small sets):

    - ``teacher_student`` per group: teacher vectors vs student vectors of the same images (lower: the student's
      representation is closer to the teacher's);
    - ``source_target`` for every group after the first: student vectors of the first group (the source domain) vs
      that group's (lower: more domain-invariant);

    writes ``<output_dir>/fsd.csv`` (pairing, group_a, group_b, fsd, dim, n_a, n_b) and logs the values.

    Args:
        student: the evaluated student (the bundle's ``network``; its weights are whatever the evaluator loaded).
        msan: ``ModuleDict(teacher=AlignmentNetwork, student=AlignmentNetwork)`` definitions; loaded from ``msan_ckpt``.
        msan_ckpt: the ACT stage's ``msan.pt``.
        output_dir: folder of ``fsd.csv``.
        student_tap, teacher_tap: the bottleneck taps (as in training).
        teacher, teacher_ckpt: the teacher network and weights (None: no teacher-student pairing).
        group_key: item key of the domain; image_key: the input image key of the batch.
    """

    def __init__(self, student: nn.Module, msan: nn.Module, msan_ckpt: str | os.PathLike, output_dir: str | os.PathLike,
                 student_tap: str = "bottleneck", teacher: nn.Module | None = None, teacher_ckpt: Any = None,
                 teacher_tap: str = "bottleneck", group_key: str | None = "domain", image_key: str = "image"):
        self.student = student
        self.student_module = resolve_tap(student, student_tap, "student")
        self.msan = load_stage_file(msan, msan_ckpt, "MSAN (alignment networks)", "train_msan.json")
        self.teacher = None
        if teacher is not None:
            self.teacher = LiveTeacher(teacher, teacher_ckpt).network  # strict loading, frozen, eval
            self.teacher_module = resolve_tap(teacher, teacher_tap, "teacher")
        self.output_dir = Path(output_dir)
        self.group_key, self.image_key = group_key, image_key
        self.vectors: dict[str, dict[str, list[torch.Tensor]]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.vectors = defaultdict(lambda: {"student": [], "teacher": []})

    def _images_and_groups(self, batch) -> tuple[torch.Tensor, list[str]]:
        """The input images (B, C, *S) and their groups, from a collated batch dict or MONAI's decollated list."""
        if isinstance(batch, dict):
            image = torch.as_tensor(batch[self.image_key])
            groups = batch.get(self.group_key, "all") if self.group_key else "all"
            groups = list(groups) if isinstance(groups, (list, tuple)) else [groups] * image.shape[0]
        else:
            image = torch.stack([torch.as_tensor(item[self.image_key]) for item in batch])
            groups = [item.get(self.group_key, "all") if self.group_key else "all" for item in batch]
        return image, [str(g) for g in groups]

    @torch.no_grad()
    def collect(self, engine: Engine) -> None:
        image, groups = self._images_and_groups(engine.state.batch)
        device = getattr(engine.state, "device", None) or next(self.student.parameters()).device
        image = image.as_subclass(torch.Tensor).to(device).float()
        was_training = self.student.training
        self.student.eval()
        try:
            v_s = self.msan["student"].encode(output_of(self.student, self.student_module, image)).cpu()
        finally:
            self.student.train(was_training)
        v_t = None
        if self.teacher is not None:
            v_t = self.msan["teacher"].encode(output_of(self.teacher, self.teacher_module, image.to(
                next(self.teacher.parameters()).device))).cpu()
        for i, group in enumerate(groups):
            self.vectors[group]["student"].append(v_s[i])
            if v_t is not None:
                self.vectors[group]["teacher"].append(v_t[i])

    def results(self) -> list[dict]:
        """One row per pairing: ``pairing``, ``group_a``, ``group_b``, ``fsd``, ``dim``, ``n_a``, ``n_b``."""
        rows, groups = [], list(self.vectors)
        for group in groups:
            s, t = self.vectors[group]["student"], self.vectors[group]["teacher"]
            if t and len(s) >= 2:
                value = frechet_semantic_distance(torch.stack(t), torch.stack(s))
                rows.append({"pairing": "teacher_student", "group_a": group, "group_b": group, **value.as_dict()})
        source = groups[0] if groups else None
        for group in groups[1:]:
            a, b = self.vectors[source]["student"], self.vectors[group]["student"]
            if len(a) >= 2 and len(b) >= 2:
                value = frechet_semantic_distance(torch.stack(a), torch.stack(b))
                rows.append({"pairing": "source_target", "group_a": source, "group_b": group, **value.as_dict()})
        return rows

    def write(self, engine: Engine | None = None) -> None:
        rows = self.results()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["pairing", "group_a", "group_b", "fsd", "dim", "n_a", "n_b"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.output_dir / "fsd.csv", buffer.getvalue().encode())
        for row in rows:
            logger.info(f"FSD {row['pairing']} {row['group_a']} vs {row['group_b']}: {row['fsd']:.4f} "
                        f"(dim {row['dim']}, n {row['n_a']}/{row['n_b']})")
