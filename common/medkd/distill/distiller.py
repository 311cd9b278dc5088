"""The Distiller: student + optional frozen teacher + taps + weighted KD terms + task loss, as one module."""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from medkd.distill.taps import FeatureTaps
from medkd.distill.teacher import LiveTeacher, TeacherSource, first_tensor
from medkd.distill.terms import LossTerm, parse_key

__all__ = ["Distiller"]


class Distiller(nn.Module):
    """One KD training forward: teacher features (no grad), student forward with taps, task loss and KD terms.

    ``forward(image, label, labelled=None)`` returns a dict with ``pred`` (student logits), ``loss`` (task +
    weighted terms, differentiable), ``loss_task``, and for every term ``loss_<name>`` (weighted) and
    ``raw_<name>`` (unweighted), ``raw_<name>_<key>`` for every scalar a loss module reports in its
    ``extra_scalars`` dict (e.g. a learnable temperature), plus ``features`` (the feature dict, for adversary
    steps). Everything that is trained (student, term adapters) is inside this module, so wrapping it in DDP
    all-reduces all of it.

    Guarantees:
        - the teacher is loaded strictly from ``teacher_ckpt`` at construction (missing/mismatching file: error),
          has ``requires_grad=False``, stays in eval mode whatever ``train()`` is called with, and runs under
          ``torch.no_grad()``;
        - every tap named by a term exists (error listing the available names otherwise);
        - :meth:`trainable_parameters` is the student's parameters plus every term's.

    Args:
        student: the student network (also what ``network_def`` builds in the bundle configs).
        task_loss: supervised loss ``task_loss(student_logits, label)`` (e.g. MONAI ``DiceFocalLoss``).
        terms: the KD recipe, a sequence of :class:`LossTerm` (empty for plain supervised training).
        teacher: a teacher network (wrapped in :class:`LiveTeacher`) or a :class:`TeacherSource`; ``None`` for
            supervised or self-distillation runs.
        teacher_ckpt: state-dict file of the teacher network (required with a teacher network).
        student_taps / teacher_taps: feature name -> tap spec; a name used by a term but absent here is taken
            as the tap spec itself (an alias such as ``low`` or a dotted module path).
        extra_taps: ``{"s": names, "t": names}`` tapped whatever the terms read (for subclasses whose
            :meth:`features` needs them, e.g. GKD's bottlenecks).

    Subclasses change what a step computes by overriding :meth:`features` (the loss part of :meth:`forward` stays
    the same) and list the feature names they produce in :attr:`derived_features`.

    The teacher is not a registered sub-module (``distiller.teacher`` is a plain reference): wrapping the Distiller
    in ``DistributedDataParallel`` wraps the student and the term adapters only, and the Distiller's ``to()`` does
    not move the teacher (place it on the device before passing it in).

    Semi-supervised batches: ``labelled`` (B,) bool marks samples with a label; the task loss and every term
    that reads ``label`` see only those samples, the other terms see the whole batch.
    """

    #: feature names (``s.<name>`` / ``t.<name>``) that a subclass's :meth:`features` computes itself: not taps.
    derived_features: tuple[str, ...] = ()
    #: whether the teacher outputs may come from a cache (:meth:`use_teacher_cache`); subclasses that run the teacher
    #: on anything but the batch image (e.g. GKD's views) set it False and say why in :attr:`teacher_cache_refusal`.
    supports_teacher_cache: bool = True
    teacher_cache_refusal: str = ""

    def __init__(
        self,
        student: nn.Module,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        terms: Sequence[LossTerm] = (),
        teacher: nn.Module | TeacherSource | None = None,
        teacher_ckpt: str | os.PathLike | None = None,
        student_taps: dict[str, str] | None = None,
        teacher_taps: dict[str, str] | None = None,
        *,
        extra_taps: dict[str, Sequence[str]] | None = None,
    ):
        super().__init__()
        self.student = student
        self.task_loss = task_loss
        terms = [t for t in (terms or []) if t is not None]
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"KD term names must be unique, got {names}")
        self.terms = nn.ModuleList(terms)

        needed: dict[str, set[str]] = {side: set((extra_taps or {}).get(side, ())) for side in ("s", "t")}
        for term in terms:
            for key in term.inputs:
                side, name = parse_key(key)
                if side and name != "logits" and name not in self.derived_features:
                    needed[side].add(name)
        uses_teacher = bool(needed["t"]) or any(k.startswith("t.") for t in terms for k in t.inputs)
        if uses_teacher and teacher is None:
            users = [t.name for t in terms if any(k.startswith("t.") for k in t.inputs)]
            raise ValueError(f"KD terms {users} read teacher features but no teacher was given")

        if teacher is not None and not isinstance(teacher, TeacherSource):
            taps = {n: (teacher_taps or {}).get(n, n) for n in sorted(needed["t"])}
            teacher = LiveTeacher(teacher, teacher_ckpt, taps)
        # Held by reference, not registered as a sub-module: DistributedDataParallel (which wraps this module in the
        # multi-GPU configs) never sees the frozen teacher (no buffer broadcasts of its BatchNorm statistics), and
        # ``to()``/``state_dict()`` of the Distiller cover what is trained only. The bundles place the teacher on the
        # device themselves.
        object.__setattr__(self, "teacher", teacher)
        self.uses_teacher = uses_teacher
        self.student_taps = FeatureTaps(
            student, {n: (student_taps or {}).get(n, n) for n in sorted(needed["s"])}, role="student"
        )

    def use_teacher_cache(self, cache) -> None:
        """Serve the teacher outputs from a cache (offline KD) instead of running the teacher.

        The run's live teacher stays (never run on images) to check the cache: same checkpoint (sha256), every tap
        the terms read cached at the same place; a mismatch is an error naming it. The batches must carry the cached
        outputs (``t.logits``, ``t.<tap>`` keys; :class:`medkd.distill.cache.TeacherViews` puts them there), passed to
        :meth:`forward` as ``teacher_outputs``.

        Args:
            cache: a teacher cache folder (``python -m medkd cache-teacher``) or a ``TeacherCache``.
        """
        from medkd.distill.cache import CachedTeacher

        if not self.supports_teacher_cache:
            raise ValueError(self.teacher_cache_refusal or f"{type(self).__name__} cannot use a teacher cache")
        if self.teacher is None or not self.uses_teacher:
            raise ValueError(
                "teacher_cache is set but this recipe reads no teacher output (self-distillation or supervised "
                "training): remove teacher_cache"
            )
        if not isinstance(self.teacher, CachedTeacher):
            object.__setattr__(self, "teacher", CachedTeacher(cache, self.teacher))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student parameters followed by every KD term's own parameters (adapters); never the teacher's."""
        yield from (p for p in self.student.parameters() if p.requires_grad)
        yield from (p for p in self.terms.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(False)
        return self

    def features(self, image: torch.Tensor, label: torch.Tensor | None = None,
                 teacher_outputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The feature dict of one step: ``image``, ``label``, teacher outputs (``t.*``), student logits and taps.

        ``teacher_outputs``: the cached teacher outputs of this batch (offline KD, see :meth:`use_teacher_cache`)."""
        features: dict[str, torch.Tensor] = {"image": image}
        if label is not None:
            features["label"] = label
        if self.uses_teacher:
            if teacher_outputs:
                from medkd.distill.cache import CachedTeacher

                if not isinstance(self.teacher, CachedTeacher):
                    raise ValueError("the batch carries cached teacher outputs but the Distiller runs a live teacher: "
                                     "set teacher_cache for the trainer too (the bundles' teacher_cache key does both)")
                features.update(self.teacher(image, teacher_outputs))  # type: ignore[misc]
            else:
                features.update(self.teacher(image))  # type: ignore[misc]
        with self.student_taps.capture() as taps:
            logits = first_tensor(self.student(image))
        self.student_taps.check_captured(taps)
        features["s.logits"] = logits
        features.update({f"s.{k}": v for k, v in taps.items()})
        return features

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None, labelled: torch.Tensor | None = None,
                teacher_outputs: dict[str, torch.Tensor] | None = None) -> dict:
        features = self.features(image, label, teacher_outputs)
        logits = features["s.logits"]
        mask = None if labelled is None else labelled.to(device=logits.device, dtype=torch.bool).view(-1)
        labelled_features = features if mask is None else {k: v[mask] for k, v in features.items()}
        has_labels = label is not None and (mask is None or bool(mask.any()))

        out: dict = {"pred": logits, "features": features}
        if has_labels:
            task = self.task_loss(labelled_features["s.logits"], labelled_features["label"])
            task = task.mean() if task.ndim else task
        else:
            task = logits.sum() * 0.0  # keeps the graph (and DDP) happy on label-free batches
        total = task
        out["loss_task"] = task.detach()
        for term in self.terms:
            if term.needs_label and not has_labels:
                raw = logits.sum() * 0.0
            else:
                raw = term(labelled_features if term.needs_label else features)
            weighted = term.weight * raw
            total = total + weighted
            out[f"loss_{term.name}"] = weighted.detach()
            out[f"raw_{term.name}"] = raw.detach()
            for key, value in getattr(term.loss, "extra_scalars", {}).items():  # e.g. a learnable temperature
                out[f"raw_{term.name}_{key}"] = value.detach()
        out["loss"] = total
        return out
