"""GKD's dual contrastive graph distillation (DCGD) on MSAN semantic vectors.

X. Qi et al., "Exploring Generalizable Distillation for Efficient Medical Image Segmentation", IEEE JBHI 2024
(arXiv:2207.12995). No loss code was released; the formulas follow the project's reconstruction
(``reference/methods/gkd.md`` section 5.3): every sample is seen as an anchor view and ``N`` augmented views, the
same views by teacher and student; each view gives one MSAN vector (:class:`medkd.networks.AlignmentNetwork`).
Two graphs of cosine similarities are built per model and the student's graph is matched to the teacher's:

* intra-coupling (a star around each anchor, contrastive over the batch);
* inter-coupling (a complete graph over the augmented views, self-similarity excluded).

A recipe uses one :class:`ContrastiveGraphDistillation` instance per graph, so each is a switchable, separately
logged term.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses._utils import check_reduction, reduce_batch

__all__ = ["ContrastiveGraphDistillation"]

GRAPHS = ("intra", "inter")
MODES = ("batch", "sample")


def _row_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(t) || softmax(s))`` of every row of two ``(R, M)`` logit matrices: ``(R,)``."""
    log_t = F.log_softmax(teacher_logits, dim=1)
    log_s = F.log_softmax(student_logits, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1)


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The ``(M, M - 1)`` matrix of a square ``(M, M)`` matrix without its diagonal (row ``i`` keeps ``j != i``)."""
    n = m.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=m.device)
    return m[keep].reshape(n, n - 1)


class ContrastiveGraphDistillation(nn.Module):
    """One graph of GKD's dual contrastive graph distillation (DCGD) (Qi et al., IEEE JBHI 2024).

    Inputs are ``(B, N + 1, d)`` vectors, index 0 of axis 1 the anchor view of each sample and ``1..N`` its
    augmented views. Vectors are L2-normalised along ``d``; ``tau`` is ``temperature``; ``X`` is the teacher ``T``
    or the student ``S``; the teacher is detached. Computed with autocast off, in float32 or the inputs' wider dtype.

    ``mode="batch"`` (the default; contrastive over the batch):

    * ``graph="intra"`` (star around each anchor): for anchor ``b`` the candidates are all ``B*N`` augmented vectors
      of the batch, ``p_{X,b}(j) = softmax_j(v_{X,b,0} . v_{X,j} / tau)``; the row value is
      ``KL(p_{T,b} || p_{S,b})``, one per anchor: ``B`` rows.
    * ``graph="inter"`` (complete graph over the augmented views): for augmented node ``i``,
      ``q_{X,i}(j) = softmax_{j != i}(v_{X,i} . v_{X,j} / tau)``; the row value is ``KL(q_{T,i} || q_{S,i})``:
      ``B*N`` rows. Needs ``B*N >= 2``.

    A row whose softmax has a single candidate (intra with ``B*N = 1``, inter with ``B*N = 2``) is always zero.

    ``mode="sample"`` (graphs from each sample's own ``N + 1`` views; works with ``B = 1``): edge weights are the
    cosine similarities themselves, star edges ``v_0 . v_a`` (``a = 1..N``, intra) or complete-graph edges
    ``v_a . v_b`` (``1 <= a < b <= N``, inter; needs ``N >= 2``), and the row value of a sample is the mean squared
    difference between its teacher and student edge weights: ``B`` rows. ``temperature`` is not used here.

    Reduction: ``"mean"`` averages the row values (over anchors, nodes or samples), ``"sum"`` adds them, ``"none"``
    returns them: ``(B,)`` except for batch-mode inter, ``(B*N,)`` in node order ``(b, a)``, ``b`` major. The loss is
    zero when the student vectors equal the teacher vectors (up to positive per-vector scale).

    Args:
        graph: ``"intra"`` or ``"inter"``.
        temperature: ``tau`` of the batch-mode softmax (> 0); GKD's reconstruction uses 0.1.
        mode: ``"batch"`` or ``"sample"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, graph: str = "intra", temperature: float = 0.1, mode: str = "batch", reduction: str = "mean"):
        super().__init__()
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.graph, self.mode = graph, mode
        self.temperature = float(temperature)
        self.reduction = check_reduction(reduction)

    def _check(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        name = f"ContrastiveGraphDistillation(graph={self.graph!r}, mode={self.mode!r})"
        if student.ndim != 3 or teacher.ndim != 3:
            raise ValueError(f"{name} expects (B, N+1, d) vectors (index 0 = anchor view), got student "
                             f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
        if student.shape != teacher.shape:
            raise ValueError(f"{name}: student and teacher vectors differ in shape: {tuple(student.shape)} vs "
                             f"{tuple(teacher.shape)}")
        b, views, _ = student.shape
        n = views - 1
        if n < 1:
            raise ValueError(f"{name} needs at least one augmented view besides the anchor (N >= 1), got "
                             f"{views} view(s) per sample, shape {tuple(student.shape)}")
        if self.graph == "inter" and self.mode == "sample" and n < 2:
            raise ValueError(f"{name} needs N >= 2 augmented views per sample to have an edge, got N = {n}")
        if self.graph == "inter" and self.mode == "batch" and b * n < 2:
            raise ValueError(f"{name} needs B*N >= 2 augmented nodes in the batch, got B = {b}, N = {n}; "
                             "use mode='sample' with N >= 2 or a larger batch")

    def forward(self, student_vectors: torch.Tensor, teacher_vectors: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_vectors: ``(B, N + 1, d)`` student MSAN vectors, index 0 of axis 1 the anchor view.
            teacher_vectors: ``(B, N + 1, d)`` teacher MSAN vectors of the same views (detached here).

        Returns:
            The reduced loss (see the class docstring for ``reduction="none"``).
        """
        self._check(student_vectors, teacher_vectors)
        with torch.autocast(device_type=student_vectors.device.type, enabled=False):
            dtype = torch.promote_types(student_vectors.dtype, torch.float32)
            s = F.normalize(student_vectors.to(dtype), dim=-1)
            t = F.normalize(teacher_vectors.detach().to(dtype), dim=-1)
            rows = self._sample_rows(s, t) if self.mode == "sample" else self._batch_rows(s, t)
        return reduce_batch(rows, self.reduction)

    def _batch_rows(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = s.shape[-1]
        aug_s, aug_t = s[:, 1:].reshape(-1, d), t[:, 1:].reshape(-1, d)
        if self.graph == "intra":
            logits_s = s[:, 0] @ aug_s.t() / self.temperature
            logits_t = t[:, 0] @ aug_t.t() / self.temperature
        else:
            logits_s = _off_diagonal(aug_s @ aug_s.t()) / self.temperature
            logits_t = _off_diagonal(aug_t @ aug_t.t()) / self.temperature
        return _row_kl(logits_t, logits_s)

    def _sample_rows(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.graph == "intra":
            edges_s = torch.einsum("bd,bad->ba", s[:, 0], s[:, 1:])
            edges_t = torch.einsum("bd,bad->ba", t[:, 0], t[:, 1:])
        else:
            n = s.shape[1] - 1
            a, b = torch.triu_indices(n, n, offset=1, device=s.device)
            gram_s = s[:, 1:] @ s[:, 1:].transpose(1, 2)
            gram_t = t[:, 1:] @ t[:, 1:].transpose(1, 2)
            edges_s, edges_t = gram_s[:, a, b], gram_t[:, a, b]
        return (edges_s - edges_t).pow(2).mean(dim=1)
