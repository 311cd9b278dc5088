"""GKD's alignment networks: the model-specific alignment network (MSAN) and the pre-trained semantic autoencoder.

X. Qi et al., "Exploring Generalizable Distillation for Efficient Medical Image Segmentation", IEEE JBHI 2024
(arXiv:2207.12995; official code ``XingqunQi-lab/GKD-Framework``).

* :class:`AlignmentNetwork` (MSAN; TAN for the teacher, SAN for the student) turns one model's feature map into a
  ``d``-dimensional "semantic vector" (encoder) and decodes such a vector back into that model's feature space
  (header). Vectors of the teacher's and the student's MSAN live in the same ``d``-space, so a vector of one model
  can be decoded by the other model's header ("header exchange", GKD's cross distillation).
* :class:`SemanticAutoEncoder` (P-SAE) is an autoencoder of label maps whose bottleneck is an
  :class:`AlignmentNetwork`; its code is the domain-invariant target that regularises the MSAN vectors.

The released ``Mlp`` compresses every channel of a flattened feature map with ``Linear(HW, 64) -> GELU ->
Linear(64, 1)`` and hard-codes the batch size and a 16x16 latent. Here the spatial axes are first average-pooled
to a fixed ``grid`` (adaptive pooling), so one network accepts any feature size and any batch size; with a grid
equal to the feature size the pooling is the identity and the released design is recovered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Norm, Pool
from monai.networks.utils import one_hot
from monai.utils import ensure_tuple_rep

__all__ = ["AlignmentNetwork", "SemanticAutoEncoder"]

_INTERP = {2: "bilinear", 3: "trilinear"}


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return int(spatial_dims)


def _check_positive(name: str, value: int) -> int:
    if int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _spatial_mlp(n_in: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    """``Linear(n_in, hidden) -> GELU -> Dropout -> Linear(hidden, n_out) -> Dropout`` on the last axis (shared by
    every channel), the released ``Mlp`` layout."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out),
                         nn.Dropout(dropout))


class AlignmentNetwork(nn.Module):
    """GKD's model-specific alignment network (MSAN): feature map <-> ``d``-dimensional semantic vector.

    Encoder :meth:`encode`, for ``f`` of shape ``(B, C, H, W[, D])``:

    1. 1x1 convolution ``C -> d`` (+ batch norm when ``norm``);
    2. adaptive average pooling of the spatial axes to ``grid`` (any feature size works; a feature smaller than the
       grid is replicated), flattened to ``G = prod(grid)`` values per channel;
    3. a per-channel MLP over those ``G`` values, ``Linear(G, hidden) -> GELU -> Linear(hidden, 1)``, with weights
       shared by all channels (the released ``Mlp``), giving one scalar per channel: ``v`` of shape ``(B, d)``.

    Header :meth:`header`, for ``v`` of shape ``(B, d)`` and a target spatial size:

    1. per-channel MLP ``Linear(1, hidden) -> GELU -> Linear(hidden, G)``, reshaped to ``(B, d, *grid)``;
    2. linear / bilinear / trilinear interpolation (``align_corners=False``) to ``spatial_size``;
    3. batch norm over ``d`` when ``norm``, then a 1x1 convolution ``d -> C``: ``(B, C, *spatial_size)``.

    Because the header takes any ``d``-vector, a vector encoded by another MSAN with the same ``vector_dim`` (a
    different model with different channels and feature size) is decoded into *this* model's feature space: GKD's
    header exchange. Built on MONAI's ``Conv`` / ``Norm`` / ``Pool`` factories, so 2D and 3D share the class.

    In training mode PyTorch's batch norm needs more than one value per channel: a batch of one ``1x1[x1]``
    feature can only be encoded in ``eval()`` mode (or with ``norm=False``).

    Args:
        in_channels: channels ``C`` of the model's feature map (e.g. FANet ``c4``: 512, MobileNetV2-UNet ``x5``: 1280).
        vector_dim: ``d``, the length of the semantic vector (512 in GKD, matching the P-SAE code).
        spatial_dims: 2 or 3.
        grid: the pooled grid (one int for every axis, or one per axis); ``G = prod(grid)`` is the MLP input width.
        hidden: hidden width of both MLPs (64 in the released ``Mlp``).
        norm: batch norm after the input projection and before the output projection.
        dropout: dropout after each MLP layer (the released ``Mlp`` used 0.1; default 0).
    """

    def __init__(self, in_channels: int, vector_dim: int = 512, spatial_dims: int = 2,
                 grid: int | Sequence[int] = 8, hidden: int = 64, norm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.in_channels = _check_positive("in_channels", in_channels)
        self.vector_dim = _check_positive("vector_dim", vector_dim)
        self.hidden = _check_positive("hidden", hidden)
        grid_t = ensure_tuple_rep(grid, self.spatial_dims)
        self.grid = tuple(_check_positive("grid", g) for g in grid_t)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_cells = math.prod(self.grid)
        conv = Conv[Conv.CONV, self.spatial_dims]
        bn = Norm[Norm.BATCH, self.spatial_dims]
        self.project_in = conv(self.in_channels, self.vector_dim, kernel_size=1)
        self.norm_in = bn(self.vector_dim) if norm else nn.Identity()
        self.pool = Pool[Pool.ADAPTIVEAVG, self.spatial_dims](self.grid)
        self.down = _spatial_mlp(self.num_cells, self.hidden, 1, dropout)
        self.up = _spatial_mlp(1, self.hidden, self.num_cells, dropout)
        self.norm_out = bn(self.vector_dim) if norm else nn.Identity()
        self.project_out = conv(self.vector_dim, self.in_channels, kernel_size=1)

    def _check_feature(self, f: torch.Tensor) -> None:
        if f.ndim != self.spatial_dims + 2 or f.shape[1] != self.in_channels:
            raise ValueError(f"AlignmentNetwork(in_channels={self.in_channels}, spatial_dims={self.spatial_dims}) "
                             f"expects a (B, {self.in_channels}, *spatial) feature with {self.spatial_dims} spatial "
                             f"axes, got shape {tuple(f.shape)}")

    def pooled(self, f: torch.Tensor) -> torch.Tensor:
        """The projected, normalised and pooled feature ``(B, d, G)`` that the encoder MLP reads."""
        self._check_feature(f)
        g = self.pool(self.norm_in(self.project_in(f)))
        return g.flatten(2)

    def encode(self, f: torch.Tensor) -> torch.Tensor:
        """Semantic vector of a feature map: ``(B, C, *S) -> (B, d)``."""
        return self.down(self.pooled(f)).squeeze(-1)

    def header(self, v: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
        """Decode vectors ``(B, d)`` into this model's feature space: ``(B, C, *spatial_size)``."""
        if v.ndim != 2 or v.shape[1] != self.vector_dim:
            raise ValueError(f"AlignmentNetwork.header expects (B, {self.vector_dim}) vectors, got shape "
                             f"{tuple(v.shape)}")
        size = tuple(int(s) for s in spatial_size)
        if len(size) != self.spatial_dims or min(size) < 1:
            raise ValueError(f"spatial_size must be {self.spatial_dims} positive sizes, got {tuple(spatial_size)}")
        u = self.up(v.unsqueeze(-1)).reshape(v.shape[0], self.vector_dim, *self.grid)
        if size != self.grid:
            u = F.interpolate(u, size=size, mode=_INTERP[self.spatial_dims], align_corners=False)
        return self.project_out(self.norm_out(u))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v, header(v, f.shape[2:]))``: the vector and the reconstruction of ``f``."""
        v = self.encode(f)
        return v, self.header(v, f.shape[2:])


class SemanticAutoEncoder(nn.Module):
    """GKD's pre-trained semantic autoencoder (P-SAE): an autoencoder of one-hot label maps with an MSAN bottleneck.

    The input is a one-hot label map ``(B, K, H, W[, D])`` (the ground-truth mask, so the code carries no
    image-domain information). Encoder: MONAI ``Convolution`` blocks (3x3[x3], batch norm, ReLU) through
    ``channels``, the first with stride 1 and each further one with stride 2, so the bottleneck is at
    ``1 / 2**(len(channels) - 1)`` of the input size. Bottleneck: an :class:`AlignmentNetwork` ``(channels[-1] ->
    vector_dim)`` whose vector is the semantic code; its header decodes the code back to the bottleneck feature.
    Decoder: transposed-convolution blocks (stride 2, batch norm, ReLU) back up through the reversed channels, with
    **no skip connections** (as released, so everything passes through the code), then a 1x1 convolution to ``K``
    logits.

    Sizes not divisible by the total stride ``2**(len(channels) - 1)``: the input is padded at the end of each
    spatial axis by edge replication (a one-hot map stays one-hot) up to the next multiple, and the reconstruction
    is cropped back to the input size; :meth:`encode` pads the same way.

    Train it with cross-entropy between :meth:`forward`'s logits and the label map, then freeze it.

    Args:
        num_classes: ``K`` (background included).
        vector_dim: length ``d`` of the code (512 in GKD).
        spatial_dims: 2 or 3.
        channels: encoder widths, at least two; the last one is the bottleneck width.
        grid: the bottleneck MSAN's pooled grid (see :class:`AlignmentNetwork`).
        hidden: the bottleneck MSAN's MLP width.
    """

    def __init__(self, num_classes: int, vector_dim: int = 512, spatial_dims: int = 2,
                 channels: Sequence[int] = (16, 32, 64, 128), grid: int | Sequence[int] = 8, hidden: int = 64):
        super().__init__()
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.num_classes = _check_positive("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
        channels = tuple(channels)
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two widths (one downsampling), got {channels}")
        self.channels = tuple(_check_positive("channels", c) for c in channels)
        self.stride = 2 ** (len(self.channels) - 1)

        def block(cin, cout, stride, transposed=False):
            return Convolution(self.spatial_dims, cin, cout, strides=stride, kernel_size=3, act="RELU",
                               norm="BATCH", is_transposed=transposed)

        widths = (self.num_classes,) + self.channels
        self.encoder = nn.Sequential(*[block(widths[i], widths[i + 1], 1 if i == 0 else 2)
                                       for i in range(len(self.channels))])
        self.bottleneck = AlignmentNetwork(self.channels[-1], vector_dim, self.spatial_dims, grid, hidden)
        rev = self.channels[::-1]
        self.decoder = nn.Sequential(*[block(rev[i], rev[i + 1], 2, transposed=True) for i in range(len(rev) - 1)])
        self.head = Conv[Conv.CONV, self.spatial_dims](self.channels[0], self.num_classes, kernel_size=1)

    @property
    def vector_dim(self) -> int:
        return self.bottleneck.vector_dim

    def _features(self, onehot: torch.Tensor) -> torch.Tensor:
        if onehot.ndim != self.spatial_dims + 2 or onehot.shape[1] != self.num_classes:
            raise ValueError(f"SemanticAutoEncoder(num_classes={self.num_classes}, spatial_dims={self.spatial_dims}) "
                             f"expects a (B, {self.num_classes}, *spatial) one-hot map, got shape "
                             f"{tuple(onehot.shape)}")
        pad: list[int] = []
        for s in reversed(onehot.shape[2:]):  # F.pad lists the last axis first
            pad += [0, -s % self.stride]
        x = F.pad(onehot.float(), pad, mode="replicate") if any(pad) else onehot.float()
        return self.encoder(x)

    def encode(self, onehot: torch.Tensor) -> torch.Tensor:
        """Semantic code of a one-hot label map: ``(B, K, *S) -> (B, d)``."""
        return self.bottleneck.encode(self._features(onehot))

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        """Reconstruction logits ``(B, K, *S)`` of a one-hot label map ``(B, K, *S)`` (same spatial size)."""
        f = self._features(onehot)
        _, rec = self.bottleneck(f)
        logits = self.head(self.decoder(rec))
        crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in onehot.shape[2:])
        return logits[crop]

    def code(self, label: torch.Tensor) -> torch.Tensor:
        """Semantic code of an integer class map ``(B, 1, *S)`` with values in ``0..K-1``: ``(B, d)``."""
        return self.encode(self.one_hot(label))

    def one_hot(self, label: torch.Tensor) -> torch.Tensor:
        """The checked one-hot input ``(B, K, *S)`` of an integer class map ``(B, 1, *S)`` (values in ``0..K-1``)."""
        if label.ndim != self.spatial_dims + 2 or label.shape[1] != 1:
            raise ValueError(f"SemanticAutoEncoder expects a (B, 1, *spatial) class map with "
                             f"{self.spatial_dims} spatial axes, got shape {tuple(label.shape)}")
        if label.is_floating_point() and not torch.equal(label, label.round()):
            raise ValueError("SemanticAutoEncoder expects integer class indices, got non-integer values")
        values = torch.unique(label)
        bad = values[(values < 0) | (values >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"label values {bad.tolist()} are outside 0..{self.num_classes - 1} "
                             f"(num_classes={self.num_classes})")
        return one_hot(label.long(), num_classes=self.num_classes, dim=1)
