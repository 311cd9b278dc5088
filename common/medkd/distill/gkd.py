"""GKD (Qi et al., IEEE JBHI 2024): the training objectives of its three stages and the distillation step.

- Stage 1, :class:`SemanticAutoEncoderObjective`: the pretrained semantic autoencoder (P-SAE) learns to reconstruct
  label maps through a ``d``-dimensional code.
- Stage 2, :class:`AlignmentConsistencyObjective`: Alignment Consistency Training (ACT) of the model-specific
  alignment networks (MSANs, :class:`medkd.networks.AlignmentNetwork`), one for the frozen teacher and one for a
  frozen, scratch-trained student.
- Stage 3, :class:`GKDDistiller`: the student learns with the task loss, Dual Contrastive Graph Distillation (DCGD)
  over augmented views and Domain-Invariant Cross Distillation (DICD) through exchanged MSAN headers; teacher and
  MSANs frozen.

No training code of GKD was published; what is reconstructed and every default is documented in the GKD bundle's
model card. Bottlenecks are reached through forward hooks (tap aliases or dotted module paths), so every network
with a tap works as teacher or student: "decoding" a network from another bottleneck means running it on the same
image with the bottleneck module's output replaced, which keeps the network's own skip connections.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.data.views import BatchViews
from medkd.distill.distiller import Distiller
from medkd.distill.teacher import LiveTeacher, first_tensor
from medkd.distill.terms import LossTerm
from medkd.io import load_state_dict_file
from medkd.networks.taps import resolve_tap

__all__ = [
    "AlignmentConsistencyObjective",
    "GKDDistiller",
    "SemanticAutoEncoderObjective",
    "decode_replacing",
    "load_stage_file",
    "output_of",
    "tap_channels",
]


class _Reached(Exception):
    """Raised by a forward hook to stop a forward pass once the wanted module has run."""


def output_of(network: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` (a sub-module of ``network``) for input ``x``; the rest of the forward is skipped."""
    found: list[torch.Tensor] = []

    def grab(_m, _args, output):
        found.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _Reached

    handle = module.register_forward_hook(grab)
    try:
        network(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError(f"module {type(module).__name__} did not run in {type(network).__name__}'s forward")
    return found[0]


def tap_channels(network: nn.Module, tap: str, spatial_size: Sequence[int], in_channels: int = 1) -> int:
    """The channel count of ``network``'s ``tap`` for an input of ``spatial_size`` (one probe forward, eval mode).

    Lets a config size the alignment networks from whatever teacher and student it names.
    """
    was_training = network.training
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    try:
        network.eval()
        with torch.no_grad():
            x = torch.zeros(1, int(in_channels), *[int(s) for s in spatial_size], device=device)
            return int(output_of(network, resolve_tap(network, tap), x).shape[1])
    finally:
        network.train(was_training)


@contextmanager
def _replaced_output(module: nn.Module, z: torch.Tensor) -> Iterator[None]:
    def replace(_m, _args, output):
        shape = (output[0] if isinstance(output, (tuple, list)) else output).shape
        if tuple(z.shape) != tuple(shape):
            raise ValueError(f"replacement of shape {tuple(z.shape)} for a module output of shape {tuple(shape)}")
        return z

    handle = module.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def decode_replacing(network: nn.Module, module: nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The logits of ``network(x)`` with the output of ``module`` (its bottleneck) replaced by ``z``.

    The encoder runs on ``x`` as usual, so every skip connection carries the network's own features of ``x``; only
    the bottleneck is exchanged (GKD's header exchange). Gradients flow into ``z`` (and into the network's
    parameters that require them).
    """
    with _replaced_output(module, z):
        return first_tensor(network(x))


def load_stage_file(module: nn.Module, path: str | os.PathLike, what: str, stage: str) -> nn.Module:
    """Load ``path`` into ``module`` strictly, then freeze it (no gradients, eval mode).

    A missing file is an error naming the stage config that writes it; a mismatching one names both.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} not found: {path}. Run the {stage} stage first (it writes this file); GKD never continues with "
            f"a random {what}."
        )
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        module.load_state_dict(load_state_dict_file(path, map_location=device), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{what} file {path} does not match its definition in the config: {e}") from None
    module.requires_grad_(False)
    return module.eval()


def _unit_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``‖a/‖a‖ − b/‖b‖‖²`` over the last axis."""
    return (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).pow(2).sum(-1).mean()


class SemanticAutoEncoderObjective(nn.Module):
    """Stage 1 of GKD: the P-SAE reconstructs one-hot label maps (cross-entropy against the label).

    ``forward(image, label)`` ignores the image (the autoencoder never sees appearance, so its code carries no
    domain information) and returns ``{"loss": CE, "loss_reconstruction": CE}``.

    Args:
        autoencoder: a :class:`medkd.networks.SemanticAutoEncoder` (its ``num_classes`` input and output channels).
    """

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.autoencoder(self.autoencoder.one_hot(label))
        loss = F.cross_entropy(logits.float(), label[:, 0].long())
        return {"loss": loss, "loss_reconstruction": loss.detach()}


class AlignmentConsistencyObjective(nn.Module):
    """Stage 2 of GKD, Alignment Consistency Training (ACT) of the teacher's and the student's MSANs.

    With ``f_T``, ``f_S`` the bottlenecks of the frozen teacher and the frozen scratch-trained student on image ``x``,
    ``v = E(f)`` the MSAN vectors, ``H`` the MSAN headers and ``z_P`` the frozen P-SAE's code of the label::

        rec   = mse(H_T(v_T), f_T) + mse(H_S(v_S), f_S)
        align = ‖unit(v_T) − unit(v_S)‖²                         (unit: L2-normalised per sample; = 2 − 2·cos)
        psae  = ‖unit(v_T) − unit(z_P)‖² + ‖unit(v_S) − unit(z_P)‖²
        task  = task_loss(D_T(H_T(v_S); skips of x), y) + task_loss(D_S(H_S(v_T); skips of x), y)
        loss  = rec_weight·rec + align_weight·align + psae_weight·psae + task_weight·task

    The squared distances are summed over the vector and averaged over the batch (the reference's ‖·‖², so they
    range over [0, 4] whatever ``d`` is); ``mse`` is the mean over elements. ``D_X(·; skips of x)`` is network X run on ``x`` with its bottleneck replaced (:func:`decode_replacing`): the
    exchanged headers must produce features each frozen decoder can segment from. Only the two MSANs train.

    Args:
        teacher, teacher_ckpt, teacher_tap: the teacher network, its weights, its bottleneck tap.
        student, student_ckpt, student_tap: the scratch-trained student (the no-KD baseline), its weights and tap.
        autoencoder, autoencoder_ckpt: the P-SAE (:class:`medkd.networks.SemanticAutoEncoder`) and its stage-1 file.
        teacher_msan, student_msan: :class:`medkd.networks.AlignmentNetwork` for each bottleneck (same vector size).
        task_loss: ``task_loss(logits, label)`` (e.g. the bundle's DiceFocal loss).
        rec_weight, align_weight, psae_weight, task_weight: α-style weights (reference default 1 each).
    """

    def __init__(self, teacher: nn.Module, teacher_ckpt, student: nn.Module, student_ckpt, autoencoder: nn.Module,
                 autoencoder_ckpt, teacher_msan: nn.Module, student_msan: nn.Module,
                 task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], teacher_tap: str = "bottleneck", student_tap: str = "bottleneck", rec_weight: float = 1.0,
                 align_weight: float = 1.0, psae_weight: float = 1.0, task_weight: float = 1.0):
        super().__init__()
        if not student_ckpt or not os.path.isfile(student_ckpt):
            raise FileNotFoundError(
                f"the scratch-trained student's weights were not found: {student_ckpt}. ACT aligns the teacher with a "
                "student trained without KD: run the train_baseline.json stage first (or point student_baseline_ckpt at "
                "a model.pt of the same network_def trained by bundles/supervised_segmentation)")
        frozen = {  # frozen (LiveTeacher: strict loading, no gradients, always eval): not part of this module's state
            "teacher": LiveTeacher(teacher, teacher_ckpt),
            "student": LiveTeacher(student, student_ckpt, role="student"),
            "autoencoder": load_stage_file(autoencoder, autoencoder_ckpt, "semantic autoencoder (P-SAE)",
                                           "pretrain_psae.json"),
            "teacher_bottleneck": resolve_tap(teacher, teacher_tap, "teacher"),
            "student_bottleneck": resolve_tap(student, student_tap, "student"),
        }
        for name, module in frozen.items():
            object.__setattr__(self, name, module)
        self.msan = nn.ModuleDict({"teacher": teacher_msan, "student": student_msan})
        self.task_loss = task_loss
        self.weights = {"rec": float(rec_weight), "align": float(align_weight), "psae": float(psae_weight),
                        "task": float(task_weight)}

    def train(self, mode: bool = True) -> "AlignmentConsistencyObjective":
        super().train(mode)
        for module in (self.teacher, self.student, self.autoencoder):
            module.eval()
        return self

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        t, s = self.teacher.network, self.student.network
        t_mod, s_mod = self.teacher_bottleneck, self.student_bottleneck
        with torch.no_grad():
            f_t, f_s = output_of(t, t_mod, image), output_of(s, s_mod, image)
            z_p = self.autoencoder.code(label)
        e_t, e_s = self.msan["teacher"], self.msan["student"]
        v_t, v_s = e_t.encode(f_t), e_s.encode(f_s)
        terms = {
            "rec": F.mse_loss(e_t.header(v_t, f_t.shape[2:]).float(), f_t.float())
            + F.mse_loss(e_s.header(v_s, f_s.shape[2:]).float(), f_s.float()),
            "align": _unit_distance(v_t, v_s),
            "psae": _unit_distance(v_t, z_p) + _unit_distance(v_s, z_p),
        }
        cross_t = decode_replacing(t, t_mod, image, e_t.header(v_s, f_t.shape[2:]))
        cross_s = decode_replacing(s, s_mod, image, e_s.header(v_t, f_s.shape[2:]))
        task = self.task_loss(cross_t, label) + self.task_loss(cross_s, label)
        terms["task"] = task.mean() if task.ndim else task
        loss = sum(self.weights[k] * v for k, v in terms.items())
        return {"loss": loss, **{f"loss_{k}": (self.weights[k] * v).detach() for k, v in terms.items()},
                **{f"raw_{k}": v.detach() for k, v in terms.items()}}


class GKDDistiller(Distiller):
    """Stage 3 of GKD: the student learns from the frozen teacher through the frozen MSANs.

    On top of the :class:`Distiller` feature dict (``s.logits``, ``t.logits`` and the terms' taps of the anchor batch)
    :meth:`features` computes what the terms read:

    - ``s.vectors`` / ``t.vectors`` ``(B, N+1, d)``: MSAN vectors ``E_S(f_S)`` / ``E_T(f_T)`` of the anchor image
      (index 0) and of its N augmented views (:class:`medkd.data.views.BatchViews`; the same views for both models).
      Gradients flow through the frozen ``E_S`` into the student's encoder. These feed DCGD
      (:class:`medkd.losses.ContrastiveGraphDistillation`, intra and inter graphs).
    - ``s.cross_logits``: the student decoder on the teacher's vector, ``D_S(H_S(v_T); student skips)`` (trains the
      student's decoder); ``t.cross_logits``: the frozen teacher decoder on the student's vector,
      ``D_T(H_T(v_S); teacher skips)`` (trains the student's encoder through the frozen decoder). DICD ties both to
      ``t.logits`` (pixel-wise KL, :class:`medkd.losses.PredictionMapDistillation` at temperature 1).

    Only what the terms read is computed (no views without a ``*.vectors`` term, no cross decoding without a
    ``*.cross_logits`` term). The student's anchor forward is exactly the one of plain training (the views go
    through separate forwards that stop at the bottleneck), so the task loss sees the same computation as the
    no-KD baseline. The MSANs are loaded strictly from ``msan_ckpt`` (the ``train_msan.json`` stage's file), frozen,
    always in eval mode, and, like the teacher, held outside the module tree (DDP never wraps them).

    Args:
        student, task_loss, terms, teacher, teacher_ckpt, student_taps, teacher_taps: as :class:`Distiller`.
        teacher_msan, student_msan: :class:`medkd.networks.AlignmentNetwork` definitions (architecture only).
        msan_ckpt: the ACT stage's file, the state of ``ModuleDict(teacher=teacher_msan, student=student_msan)``.
        student_tap, teacher_tap: the bottleneck taps the MSANs read (aliases or dotted paths).
        views: the augmented views (default: :class:`BatchViews` with its four kinds).
    """

    derived_features = ("vectors", "cross_logits")
    supports_teacher_cache = False
    teacher_cache_refusal = (
        "GKD cannot use a teacher cache: its teacher runs on augmented views made from each batch during training "
        "(dual contrastive graph distillation) and decodes the student's exchanged bottleneck (cross distillation), "
        "neither of which exists before the run. Remove teacher_cache, or use a recipe with a plain Distiller "
        "(e.g. configs/recipes/kd_logits.json or vanilla_kd.json), which can."
    )

    def __init__(self, student: nn.Module, task_loss: Callable, terms: Sequence[LossTerm], teacher: nn.Module,
                 teacher_ckpt, teacher_msan: nn.Module, student_msan: nn.Module, msan_ckpt,
                 student_tap: str = "bottleneck", teacher_tap: str = "bottleneck", views: BatchViews | None = None,
                 student_taps: dict[str, str] | None = None, teacher_taps: dict[str, str] | None = None):
        if teacher is None:
            raise ValueError("GKD distils from a teacher: teacher (and teacher_ckpt) are required")
        student_taps = {**(student_taps or {}), "gkd_bottleneck": student_tap}
        teacher_taps = {**(teacher_taps or {}), "gkd_bottleneck": teacher_tap}
        super().__init__(student, task_loss, terms, teacher, teacher_ckpt, student_taps, teacher_taps,
                         extra_taps={"s": ["gkd_bottleneck"], "t": ["gkd_bottleneck"]})
        if not isinstance(self.teacher, LiveTeacher):
            raise TypeError("GKDDistiller needs a live teacher network (its decoder runs on exchanged bottlenecks)")
        msan = load_stage_file(nn.ModuleDict({"teacher": teacher_msan, "student": student_msan}), msan_ckpt,
                               "MSAN (alignment networks)", "train_msan.json")
        object.__setattr__(self, "msan", msan)
        object.__setattr__(self, "student_bottleneck", resolve_tap(student, student_tap, "student"))
        object.__setattr__(self, "teacher_bottleneck", resolve_tap(self.teacher.network, teacher_tap, "teacher"))
        self.views = views if views is not None else BatchViews()
        read = {key for term in self.terms for key in term.inputs}
        self.needs_vectors = bool(read & {"s.vectors", "t.vectors"})
        self.needs_cross = bool(read & {"s.cross_logits", "t.cross_logits"})

    def train(self, mode: bool = True) -> "GKDDistiller":
        super().train(mode)
        self.msan.eval()
        return self

    def features(self, image: torch.Tensor, label: torch.Tensor | None = None,
                 teacher_outputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        features = super().features(image, label, teacher_outputs)
        f_s, f_t = features.pop("s.gkd_bottleneck"), features.pop("t.gkd_bottleneck")
        e_s, e_t = self.msan["student"], self.msan["teacher"]
        v_s = e_s.encode(f_s)
        with torch.no_grad():
            v_t = e_t.encode(f_t)
        if self.needs_vectors:
            views = torch.cat(self.views(image))
            n = len(self.views)
            view_s = e_s.encode(output_of(self.student, self.student_bottleneck, views))
            with torch.no_grad():
                view_t = e_t.encode(output_of(self.teacher.network, self.teacher_bottleneck, views))
            # (N·B, d) ordered view by view -> (B, N, d); the anchor vector goes first
            features["s.vectors"] = torch.cat([v_s[:, None], view_s.view(n, *v_s.shape).transpose(0, 1)], dim=1)
            features["t.vectors"] = torch.cat([v_t[:, None], view_t.view(n, *v_t.shape).transpose(0, 1)], dim=1)
        if self.needs_cross:
            features["s.cross_logits"] = decode_replacing(self.student, self.student_bottleneck, image,
                                                          e_s.header(v_t, f_s.shape[2:]))
            features["t.cross_logits"] = decode_replacing(self.teacher.network, self.teacher_bottleneck, image,
                                                          e_t.header(v_s, f_t.shape[2:]))
        return features
