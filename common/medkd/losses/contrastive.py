"""Contrastive feature distillation and binary logit KD of MTMS-CKD.

R. Biswas, "Multi-Task Multi-Scale Contrastive Knowledge Distillation for Efficient Medical Image Segmentation",
M.Tech thesis, 2024, arXiv:2406.03173 (official code: ``RisabBiswas/MTMS-Med-Seg-KD``).

MTMS-CKD distils three scales (encoder E-E, bottleneck B-B, last decoder layer D-D) with an instance-level InfoNCE
(van den Oord et al., arXiv:1807.03748): the student feature of image ``i`` is the query, the teacher feature of
the same image is its positive key and the teacher features of the other images of the batch are the negatives.
The engine builds one :class:`ContrastiveDistillation` term per scale. The released code has two defects that
this module fixes by default and can reproduce on request:

* the 1x1 channel projections are new, randomly initialised layers created at every step and never trained
  (``projection="random_each_step"`` reproduces it; ``"learned"`` is the default);
* its logit term (EMKD's softmax KD on single-channel logits) is identically zero; :class:`BinaryLogitKD` uses
  the two-class logits ``[0, z]`` instead.

:class:`SupervisedContrastiveDistillation` is a label-aware extension (Khosla et al., "Supervised Contrastive
Learning", NeurIPS 2020): positives are same-class regions or pixels. The released code uses no labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses._utils import check_dense, check_reduction, reduce_batch, resize_to
from medkd.losses.logits import PredictionMapDistillation

__all__ = ["BinaryLogitKD", "ContrastiveDistillation", "SupervisedContrastiveDistillation", "info_nce"]

PROJECTIONS = ("learned", "random_each_step", "frozen", "none")
PROJECTION_SIDES = ("student", "teacher", "both")
POOLINGS = ("flatten", "avg")
GRANULARITIES = ("region", "pixel")


def _conv1x1(spatial_dims: int):
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return float(temperature)


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float, symmetric: bool = False) -> torch.Tensor:
    """Per-sample InfoNCE with in-batch negatives.

    ``loss_i = -log( exp(cos(q_i, k_i) / tau) / sum_j exp(cos(q_i, k_j) / tau) )``: cross-entropy of row ``i`` of
    the (B, B) cosine-similarity matrix with target ``i``. This is ``info_nce.InfoNCE`` (``negative_keys=None``)
    of the package the MTMS code imports, before its batch mean. Computed in float32 (autocast off).

    Args:
        query: (B, ...) student vectors (flattened per sample).
        key: (B, ...) teacher vectors, same flattened length.
        temperature: ``tau`` (> 0).
        symmetric: also use each key as a query against all queries and average both directions.

    Returns:
        (B,) per-sample losses.
    """
    if query.shape[0] != key.shape[0] or query[0].numel() != key[0].numel():
        raise ValueError(f"info_nce needs one batch size and one vector length, got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if query.shape[0] < 2:
        raise ValueError("info_nce needs at least 2 samples (the other images of the batch are the negatives); "
                         "use drop_last=True in the training loader")
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(query.float().flatten(1), dim=1)
        k = F.normalize(key.float().flatten(1), dim=1)
        logits = q @ k.t() / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.t(), target, reduction="none"))
    return loss


class _Projection(nn.Module):
    """The 1x1 channel projections of the contrastive losses (see :class:`ContrastiveDistillation` for the modes).

    ``student`` / ``teacher`` hold the projection layers of each side (``None`` where that side is not
    projected, and always ``None`` for ``"random_each_step"``, whose layers are drawn in :meth:`draw`).
    """

    def __init__(self, student_channels: int, teacher_channels: int, embed_channels: int | None, mode: str,
                 side: str | None, spatial_dims: int, seed: int):
        super().__init__()
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if embed_channels is not None and int(embed_channels) < 1:
            raise ValueError(f"embed_channels must be a positive integer or None, got {embed_channels}")
        if mode not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {mode!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if side is None:
            side = "both" if embed_channels is not None else "student"
        if side not in PROJECTION_SIDES:
            raise ValueError(f"projection_side must be one of {PROJECTION_SIDES} or None, got {side!r}")
        if (side == "both") != (embed_channels is not None):
            raise ValueError("embed_channels is required with projection_side='both' and only allowed with it "
                             f"(got projection_side={side!r}, embed_channels={embed_channels})")
        s_ch, t_ch = int(student_channels), int(teacher_channels)
        self.mode, self.side, self.spatial_dims = mode, side, spatial_dims
        self.shapes: dict[str, tuple[int, int]] = {}
        if mode == "none":
            if embed_channels is not None or s_ch != t_ch:
                raise ValueError(f"projection='none' needs equal channel counts and no embed_channels, got student "
                                 f"{s_ch}, teacher {t_ch}, embed_channels {embed_channels}")
        elif side == "student":
            self.shapes["student"] = (s_ch, t_ch)
        elif side == "teacher":
            self.shapes["teacher"] = (t_ch, s_ch)
        else:
            self.shapes = {"student": (s_ch, int(embed_channels)), "teacher": (t_ch, int(embed_channels))}
        self.out_channels = self.shapes["student"][1] if "student" in self.shapes else s_ch
        generator = torch.Generator().manual_seed(int(seed)) if mode == "frozen" else None
        for name in ("student", "teacher"):
            layer = None
            if name in self.shapes and mode in ("learned", "frozen"):
                layer = _conv1x1(spatial_dims)(*self.shapes[name], kernel_size=1)
                if generator is not None:  # PyTorch's default init bound 1/sqrt(fan_in), drawn from a fixed seed
                    bound = 1.0 / math.sqrt(self.shapes[name][0])
                    with torch.no_grad():
                        layer.weight.uniform_(-bound, bound, generator=generator)
                        layer.bias.uniform_(-bound, bound, generator=generator)
                    layer.requires_grad_(False)
            self.register_module(name, layer)

    def draw(self, in_channels: int, out_channels: int, like: torch.Tensor) -> nn.Module:
        """A new default-initialised 1x1 convolution (global torch RNG) on ``like``'s device and dtype, not trained."""
        layer = _conv1x1(self.spatial_dims)(in_channels, out_channels, 1, device=like.device, dtype=like.dtype)
        return layer.requires_grad_(False)

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.shapes:
            return x
        layer = self.draw(*self.shapes[name], like=x) if self.mode == "random_each_step" else getattr(self, name)
        if name == "teacher" and self.mode != "learned":
            with torch.no_grad():
                return layer(x)
        return layer(x)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._project("student", student), self._project("teacher", teacher.detach())


def _check_features(loss: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> None:
    name = type(loss).__name__
    check_dense(name, student, teacher)
    proj = loss.projection
    for who, x, channels in (("student", student, loss.student_channels), ("teacher", teacher, loss.teacher_channels)):
        if x.ndim != proj.spatial_dims + 2:
            raise ValueError(f"{name} was built with spatial_dims={proj.spatial_dims} but the {who} feature has shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{name} was built for {channels} {who} channels, got {who} feature {tuple(x.shape)}")


class ContrastiveDistillation(nn.Module):
    """Instance-level InfoNCE feature distillation, one scale of MTMS-CKD (Biswas, arXiv:2406.03173).

    Each image's feature map becomes one vector (student: query; teacher: key); the positive of image ``i`` is
    the teacher vector of image ``i`` and the negatives are the teacher vectors of the other images of the batch:
    ``loss_i = -log softmax_j(cos(q_i, k_j) / tau)[i]`` (:func:`info_nce`). One instance per scale (E-E, B-B,
    D-D), each reading its own pair of taps.

    Steps: (1) 1x1 channel projection(s) (below); (2) ``pooling="flatten"`` (default, as in the released code):
    the teacher map is resized to the student's spatial size (bilinear/trilinear, ``align_corners=False``, as the
    code's bottleneck resize; the 1x1 projection commutes with it) and both maps are flattened **per sample** to
    C*H*W[*D] vectors (the released code reshaped with the global batch size 20, which mixes samples of a smaller
    final batch); ``"avg"``: global average pooling to a C vector, no resize (a lighter option for D-D, where
    flattened vectors have millions of entries); (3) L2 normalisation of each vector over its full length;
    (4) InfoNCE, optionally symmetric (average with the teacher-as-query direction).

    Projections (``projection``):

    * ``"learned"`` (default, the intended behaviour): 1x1 convolutions created once as submodules of this loss,
      so they are trained with the student (the Distiller hands every term's parameters to the optimiser) and are
      saved in the training state, never in the exported student. The teacher map is detached; a teacher-side
      learned projection is trained through the loss (CRD-style embedding).
    * ``"random_each_step"`` (the as-released behaviour): new default-initialised 1x1 convolutions are drawn from
      the global torch RNG at every forward and thrown away; the loss owns no parameters. **Not the default**:
      the projections are never trained, so the target changes randomly every step (a non-stationary objective
      that cannot converge to an alignment) and any learned alignment lives only in the student. A student-side
      random projection still passes gradients to the student, as in the released D-D term; its weights take
      no gradient here (the released code computed and discarded them, which changes nothing for the student).
    * ``"frozen"``: fixed projections drawn once from ``seed`` with PyTorch's default initialisation range and
      never trained (the spec's alternative: fixed, seeded teacher-side projectors).
    * ``"none"``: no projection (equal channel counts), e.g. the released T2-S1 D-D term.

    ``projection_side``: ``"student"`` (default with ``embed_channels=None``; student -> teacher channels, the
    FitNets/CRD convention), ``"teacher"`` (teacher -> student channels), or ``"both"`` (both sides ->
    ``embed_channels``; the default when ``embed_channels`` is given; the student layer is drawn first). The
    released code projects the teacher at B-B and E-E and the student at D-D (T1 teachers); to reproduce a
    released term use ``projection="random_each_step"`` with that side, ``pooling="flatten"`` and the released
    temperature (0.4; 0.1 for T1-S2).

    Args:
        student_channels: channels of the student tap.
        teacher_channels: channels of the teacher tap.
        embed_channels: common embedding width when both sides are projected; ``None`` projects one side onto
            the other's width.
        temperature: InfoNCE temperature ``tau`` (MTMS-CKD: 0.4; 0.1 for the T1-S2 recipe).
        projection: ``"learned"``, ``"random_each_step"``, ``"frozen"`` or ``"none"`` (above).
        projection_side: ``"student"``, ``"teacher"``, ``"both"`` or ``None`` (automatic, above).
        pooling: ``"flatten"`` (default) or ``"avg"`` (above).
        symmetric: average the student->teacher and teacher->student InfoNCE (an option; the code is one-way).
        spatial_dims: 2 or 3 (selects Conv2d / Conv3d projections; inputs must match).
        seed: seed of the ``"frozen"`` projections (ignored by the other modes).
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student (B, Cs, *spatial_s), teacher (B, Ct, *spatial_t) with B >= 2; spatial sizes may differ (the
        teacher is resized for ``"flatten"``). Returns a scalar (or (B,) with ``reduction="none"``).
    """

    def __init__(self, student_channels: int, teacher_channels: int, embed_channels: int | None = None,
                 temperature: float = 0.4, projection: str = "learned", projection_side: str | None = None,
                 pooling: str = "flatten", symmetric: bool = False, spatial_dims: int = 2, seed: int = 0,
                 reduction: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.student_channels, self.teacher_channels = int(student_channels), int(teacher_channels)
        self.temperature = _check_temperature(temperature)
        self.pooling, self.symmetric = pooling, bool(symmetric)
        self.reduction = check_reduction(reduction)
        self.projection = _Projection(student_channels, teacher_channels, embed_channels, projection, projection_side,
                                      spatial_dims, seed)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        _check_features(self, student, teacher)
        s, t = self.projection(student, teacher)
        if self.pooling == "flatten":
            t = resize_to(t, s.shape[2:])
            q, k = s.flatten(1), t.flatten(1)
        else:
            q, k = s.flatten(2).mean(dim=2), t.flatten(2).mean(dim=2)
        return reduce_batch(info_nce(q, k, self.temperature, self.symmetric), self.reduction)


class SupervisedContrastiveDistillation(nn.Module):
    """Label-aware (supervised) contrastive feature distillation, an extension of MTMS-CKD.

    The thesis calls its loss "supervised contrastive", but the released code is instance-level
    (:class:`ContrastiveDistillation`). This variant uses the labels as in SupCon (Khosla et al., NeurIPS 2020),
    across networks: anchors are student embeddings, keys are teacher embeddings, and the positives of an anchor
    are all keys of its class (in any image of the batch); the keys of the other classes are the negatives.
    For an anchor ``a`` with positives ``P(a)`` among all keys ``A``::

        loss_a = -1/|P(a)| * sum_{p in P(a)} log( exp(cos(s_a, t_p)/tau) / sum_{j in A} exp(cos(s_a, t_j)/tau) )

    (SupCon's L_out; no key is excluded from ``A`` because anchors and keys come from different networks). A
    sample's loss is the mean over its anchors. After the 1x1 projection(s) (same modes as
    :class:`ContrastiveDistillation`) the teacher map is resized to the student's spatial size, and the label is
    resized to it with nearest interpolation. Embeddings are built by ``granularity``:

    * ``"region"`` (default): one prototype per (image, class present in the image) = mean embedding over the
      class region; each prototype is an anchor (student) / key (teacher). Memory O(B*K*C).
    * ``"pixel"``: pixel embeddings at a random subset of positions, ``min(N, max(1, max_pixels // B))`` per
      image (N = positions of the feature map; each image draws its own positions, the same ones for student and
      teacher; all positions, without sampling, when they fit). ``max_pixels`` bounds the (M, M) similarity
      matrix, M = anchors in the batch.

    Args:
        student_channels, teacher_channels: channels of the two taps.
        num_classes: number of classes including background (labels must lie in ``[0, num_classes)``).
        embed_channels, projection, projection_side, spatial_dims, seed: as in :class:`ContrastiveDistillation`.
        temperature: ``tau`` (default 0.4 as MTMS-CKD's InfoNCE).
        granularity: ``"region"`` or ``"pixel"`` (above).
        max_pixels: bound on the anchors per batch for ``"pixel"`` (default 4096).
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student (B, Cs, *spatial_s), teacher (B, Ct, *spatial_t), label (B, 1, *spatial_l) class indices or
        (B, K, *spatial_l) one-hot (arg-maxed). Returns a scalar (or (B,) with ``reduction="none"``).
    """

    def __init__(self, student_channels: int, teacher_channels: int, num_classes: int = 2,
                 embed_channels: int | None = None, temperature: float = 0.4, projection: str = "learned",
                 projection_side: str | None = None, granularity: str = "region", max_pixels: int = 4096,
                 spatial_dims: int = 2, seed: int = 0, reduction: str = "mean"):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if int(max_pixels) < 1:
            raise ValueError(f"max_pixels must be a positive integer, got {max_pixels}")
        self.student_channels, self.teacher_channels = int(student_channels), int(teacher_channels)
        self.num_classes, self.granularity, self.max_pixels = int(num_classes), granularity, int(max_pixels)
        self.temperature = _check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.projection = _Projection(student_channels, teacher_channels, embed_channels, projection, projection_side,
                                      spatial_dims, seed)

    def _class_map(self, label: torch.Tensor, size) -> torch.Tensor:
        if label.ndim != self.projection.spatial_dims + 2:
            raise ValueError(f"label must be (B, 1 or K, *spatial) like the features, got {tuple(label.shape)}")
        idx = label.argmax(dim=1, keepdim=True) if label.shape[1] > 1 else label
        idx = F.interpolate(idx.float(), size=tuple(size), mode="nearest").long().flatten(1)  # (B, N)
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"label values must lie in [0, {self.num_classes}), got [{low}, {high}]")
        return idx

    def _regions(self, s, t, idx):
        b = s.shape[0]
        onehot = F.one_hot(idx, self.num_classes).transpose(1, 2).float()  # (B, K, N)
        counts = onehot.sum(dim=2)
        present = counts > 0
        s_proto = torch.bmm(onehot, s.transpose(1, 2)) / counts.clamp_min(1.0)[..., None]  # (B, K, C)
        t_proto = torch.bmm(onehot, t.transpose(1, 2)) / counts.clamp_min(1.0)[..., None]
        classes = torch.arange(self.num_classes, device=s.device).expand(b, -1)
        samples = torch.arange(b, device=s.device)[:, None].expand(-1, self.num_classes)
        return s_proto[present], t_proto[present], classes[present], samples[present]

    def _pixels(self, s, t, idx):
        b, c, n = s.shape
        per_image = min(n, max(1, self.max_pixels // b))
        if per_image < n:
            pick = torch.rand(b, n, device=s.device).argsort(dim=1)[:, :per_image]
            s = s.gather(2, pick[:, None].expand(-1, c, -1))
            t = t.gather(2, pick[:, None].expand(-1, t.shape[1], -1))
            idx = idx.gather(1, pick)
        samples = torch.arange(b, device=s.device).repeat_interleave(per_image)
        return s.transpose(1, 2).reshape(b * per_image, c), t.transpose(1, 2).reshape(b * per_image, -1), \
            idx.reshape(-1), samples

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        _check_features(self, student, teacher)
        if label.shape[0] != student.shape[0]:
            raise ValueError(f"label batch {label.shape[0]} differs from feature batch {student.shape[0]}")
        s, t = self.projection(student, teacher)
        t = resize_to(t, s.shape[2:])
        idx = self._class_map(label, s.shape[2:])
        with torch.autocast(device_type=s.device.type, enabled=False):
            s, t = s.float().flatten(2), t.float().flatten(2)
            pick = self._regions if self.granularity == "region" else self._pixels
            anchors, keys, classes, samples = pick(s, t, idx)
            logits = F.normalize(anchors, dim=1) @ F.normalize(keys, dim=1).t() / self.temperature
        positives = (classes[:, None] == classes[None, :]).float()
        per_anchor = -(F.log_softmax(logits, dim=1) * positives).sum(dim=1) / positives.sum(dim=1)
        b = student.shape[0]
        totals = per_anchor.new_zeros(b).index_add(0, samples, per_anchor)
        counts = per_anchor.new_zeros(b).index_add(0, samples, torch.ones_like(per_anchor))
        return reduce_batch(totals / counts, self.reduction)


class BinaryLogitKD(nn.Module):
    """Logit distillation that also works for single-channel (sigmoid) outputs, the fixed PMD term of MTMS-CKD.

    MTMS-CKD's released logit term (EMKD's softmax KD over the channel axis) is identically zero for its
    single-channel logits. Here a single-channel logit map ``z`` becomes the two-class logits ``[0, z]``, so that
    per pixel/voxel::

        loss = T^2 * KL(softmax([0, z_t] / T) || softmax([0, z_s] / T))
             = T^2 * [ q log(q / p) + (1 - q) log((1 - q) / (1 - p)) ],  q = sigmoid(z_t / T), p = sigmoid(z_s / T)

    (equal to the BCE between ``q`` and ``p`` minus the teacher's entropy, a constant for the student), averaged
    over pixels/voxels and reduced over the batch. For C >= 2 channels it is the per-pixel softmax KD
    :class:`~medkd.losses.PredictionMapDistillation` with the same temperature and reduction.

    Args:
        temperature: ``T`` (default 4, the temperature of the code's PMD term, as the spec recommends).
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for per-sample values (B,).

    Shapes:
        student, teacher: logits (B, C, H, W[, D]) of one shape. The teacher is detached. Returns a scalar (or
        (B,) with ``reduction="none"``).
    """

    def __init__(self, temperature: float = 4.0, reduction: str = "mean"):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.softmax_kd = PredictionMapDistillation(self.temperature, reduction)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        check_dense(type(self).__name__, student, teacher)
        if student.shape != teacher.shape:
            raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
        if student.shape[1] >= 2:
            return self.softmax_kd(student, teacher)
        t = self.temperature
        z_s = student.float() * (1.0 / t)
        with torch.no_grad():
            z_t = teacher.float() * (1.0 / t)
            q = torch.sigmoid(z_t)
            neg_entropy = (q * F.logsigmoid(z_t) + (1 - q) * F.logsigmoid(-z_t)).flatten(1).mean(dim=1)
        cross = (q * F.logsigmoid(z_s) + (1 - q) * F.logsigmoid(-z_s)).flatten(1).mean(dim=1)
        return reduce_batch((neg_entropy - cross) * (t * t), self.reduction)
