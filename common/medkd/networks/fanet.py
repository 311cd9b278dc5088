"""FANet (``UnetSKA2``): the selective-kernel U-Net with strip pooling that Graph Flow and GKD use as teacher.

Built from the facts of the official ``networks/Unet_SKA2.py`` (XingqunQi-lab/GKD-Framework @ db30083; the same
network ships as bytecode in WrinkleXuan/Graph-FLow). Module names follow the official ones, so a checkpoint of
the official network loads with :func:`medkd.networks.weights.load_weights` after skipping the two things this
implementation drops (see :class:`FANet`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Norm

__all__ = ["FANet", "SKConv", "SKBlock", "SKDoubleConv", "StripPooling", "GatedStripPooling"]


def _conv_norm(
    in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], bias: bool = False, relu: bool = True
) -> nn.Sequential:
    """``Conv2d`` (size-preserving padding) -> ``BatchNorm2d`` [-> ``ReLU``], indexed 0, 1 (, 2)."""
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    layers = [
        Conv[Conv.CONV, 2](in_channels, out_channels, k, padding=(k[0] // 2, k[1] // 2), bias=bias),
        Norm[Norm.BATCH, 2](out_channels),
    ]
    if relu:
        layers.append(Act[Act.RELU]())
    return nn.Sequential(*layers)


class SKConv(nn.Module):
    """Selective-kernel convolution (Li et al., "Selective Kernel Networks", CVPR 2019) as used by FANet.

    Two branches, a 5x5 and a 3x3 convolution (bias, BN, ReLU), are summed; global average pooling and a
    1x1 conv (``channels -> channels // reduction``, bias, BN, ReLU) give a descriptor from which two 1x1 convs
    (bias) produce one attention logit per branch and channel; a softmax across the two branches weights the
    branch outputs, which are summed. Built on MONAI's layer factories.

    Args:
        channels: input and output channels C.
        reduction: channel reduction of the squeeze step.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        squeezed = channels // reduction
        self.conv1 = _conv_norm(channels, channels, 5, bias=True)  # 5x5 branch
        self.conv2 = _conv_norm(channels, channels, 3, bias=True)  # 3x3 branch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_se = _conv_norm(channels, squeezed, 1, bias=True)
        self.conv_ex1 = nn.Sequential(Conv[Conv.CONV, 2](squeezed, channels, 1))  # logits of the 5x5 branch
        self.conv_ex2 = nn.Sequential(Conv[Conv.CONV, 2](squeezed, channels, 1))  # logits of the 3x3 branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.stack([self.conv1(x), self.conv2(x)], dim=1)  # (B, 2, C, H, W)
        descriptor = self.conv_se(self.pool(branches.sum(dim=1)))  # (B, C // r, 1, 1)
        logits = torch.stack([self.conv_ex1(descriptor), self.conv_ex2(descriptor)], dim=1)  # (B, 2, C, 1, 1)
        return (branches * torch.softmax(logits, dim=1)).sum(dim=1)


class SKBlock(nn.Module):
    """Bottleneck-style residual block around an :class:`SKConv` (FANet's ``SKBlock``).

    1x1 conv (no bias) + BN + ReLU -> SKConv + BN + ReLU -> 1x1 conv (no bias) + BN, plus the shortcut (a 1x1
    conv + BN projection when the channel count changes, else identity), then ReLU. Built on MONAI's layer
    factories.

    Args:
        in_channels: input channels.
        out_channels: output channels (also the width of the SKConv).
        reduction: SKConv squeeze reduction.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 2):
        super().__init__()
        self.conv1 = _conv_norm(in_channels, out_channels, 1)
        self.conv2 = nn.Sequential(SKConv(out_channels, reduction), Norm[Norm.BATCH, 2](out_channels), Act[Act.RELU]())
        self.conv3 = _conv_norm(out_channels, out_channels, 1, relu=False)
        self.downsample = (
            _conv_norm(in_channels, out_channels, 1, relu=False) if in_channels != out_channels else nn.Identity()
        )
        self.relu = Act[Act.RELU]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.downsample(x))


class SKDoubleConv(nn.Module):
    """Two :class:`SKBlock` in a row (FANet's ``DoubleConv``; held in ``conv`` as in the official code).

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 2):
        super().__init__()
        self.conv = nn.Sequential(
            SKBlock(in_channels, out_channels, reduction), SKBlock(out_channels, out_channels, reduction)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _StripPoolingPaths(nn.Module):
    """The pooling paths shared by :class:`StripPooling` and :class:`GatedStripPooling`.

    ``conv1_1`` feeds the square-pooling path: a full-resolution 3x3 conv (``conv2_0``) and two adaptive average
    pools to ``pool_sizes[0]`` and ``pool_sizes[1]`` squares, each followed by a 3x3 conv (``conv2_1``,
    ``conv2_2``, ``pyramid_channels`` out) and nearest-neighbour upsampling back to (H, W). ``conv1_2`` feeds the
    strip path: averages over the whole height (1 x W) and the whole width (H x 1) with 1x3 / 3x1 convs
    (``conv2_3``, ``conv2_4``), upsampled, summed, ReLU, then the 3x3 conv + BN + ReLU ``conv2_6``.
    The subclasses mix the square-pooling maps (``conv2_5``) and fuse both paths (``conv3``).
    """

    def __init__(self, channels: int, pool_sizes: Sequence[int], pyramid_channels: int, mix_in_channels: int):
        super().__init__()
        c = channels
        self.pool1 = nn.AdaptiveAvgPool2d(int(pool_sizes[0]))
        self.pool2 = nn.AdaptiveAvgPool2d(int(pool_sizes[1]))
        self.conv1_1 = _conv_norm(c, c, 1)
        self.conv1_2 = _conv_norm(c, c, 1)
        self.conv2_0 = _conv_norm(c, c, 3, relu=False)
        self.conv2_1 = _conv_norm(c, pyramid_channels, 3, relu=False)
        self.conv2_2 = _conv_norm(c, pyramid_channels, 3, relu=False)
        self.conv2_3 = _conv_norm(c, c, (1, 3), relu=False)
        self.conv2_4 = _conv_norm(c, c, (3, 1), relu=False)
        self.conv2_5 = _conv_norm(mix_in_channels, c, 3)
        self.conv2_6 = _conv_norm(c, c, 3)
        self.conv3 = _conv_norm(2 * c, c, 1, relu=False)

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(full-resolution map, pooled map 1, pooled map 2, strip-path output), all at the size of ``x``."""
        size = [x.shape[2], x.shape[3]]
        square = self.conv1_1(x)
        strip = self.conv1_2(x)
        local = self.conv2_0(square)
        pooled1 = F.interpolate(self.conv2_1(self.pool1(square)), size=size, mode="nearest")
        pooled2 = F.interpolate(self.conv2_2(self.pool2(square)), size=size, mode="nearest")
        along_w = F.interpolate(self.conv2_3(strip.mean(dim=2, keepdim=True)), size=size, mode="nearest")
        along_h = F.interpolate(self.conv2_4(strip.mean(dim=3, keepdim=True)), size=size, mode="nearest")
        return local, pooled1, pooled2, self.conv2_6(F.relu(along_w + along_h))


class StripPooling(_StripPoolingPaths):
    """Strip pooling attention as used in FANet's decoder (official class ``StripPooling``).

    This is the mixed pooling module of Hou et al., "Strip Pooling: Rethinking Spatial Pooling for Scene
    Parsing", CVPR 2020 (SPNet's ``StripPooling``), with FANet's changes: the inner width equals ``in_channels``
    (SPNet: ``in_channels / 4``) and the pooled maps are upsampled nearest-neighbour (SPNet: bilinear,
    ``align_corners=True``). The square-pooling maps are summed, ReLU, ``conv2_5`` (3x3 + BN + ReLU); the
    result and the strip path are concatenated, fused by ``conv3`` (1x1 + BN) and added to the input, then ReLU.
    The official module also owns a ``gamma`` parameter that its forward never reads; it is not built here.
    Built on MONAI's layer factories.

    Args:
        in_channels: channels C of the input and output.
        pool_sizes: output sizes of the two square adaptive average pools.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, in_channels: int, pool_sizes: Sequence[int] = (3, 6)):
        super().__init__(in_channels, pool_sizes, pyramid_channels=in_channels, mix_in_channels=in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local, pooled1, pooled2, strip = self._paths(x)
        mixed = self.conv2_5(F.relu(local + pooled1 + pooled2))
        return F.relu(x + self.conv3(torch.cat([mixed, strip], dim=1)))


class GatedStripPooling(_StripPoolingPaths):
    """FANet's last strip pooling module (official class ``StripPooling2``), a variant of :class:`StripPooling`.

    Differences from :class:`StripPooling` (from the official source): the two pooled 3x3 convs (``conv2_1``,
    ``conv2_2``) output ``C // 2`` channels, and the full-resolution and pooled maps are concatenated (C + C/2 +
    C/2 = 2C channels) instead of summed before ``conv2_5`` (3x3, 2C -> C); the strip path's output multiplies
    the input (``x * strip``, a gate) before the concatenation with the mixed map and the ``conv3`` fusion.
    Residual add and final ReLU are as in :class:`StripPooling`. The official unused ``gamma`` is not built.
    Built on MONAI's layer factories.

    Args:
        in_channels: channels C of the input and output.
        pool_sizes: output sizes of the two square adaptive average pools.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, in_channels: int, pool_sizes: Sequence[int] = (3, 6)):
        super().__init__(in_channels, pool_sizes, pyramid_channels=in_channels // 2,
                         mix_in_channels=in_channels + 2 * (in_channels // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local, pooled1, pooled2, strip = self._paths(x)
        mixed = self.conv2_5(F.relu(torch.cat([local, pooled1, pooled2], dim=1)))
        return F.relu(x + self.conv3(torch.cat([mixed, x * strip], dim=1)))


class FANet(nn.Module):
    """FANet, the 3-pool selective-kernel U-Net with strip pooling (official ``UnetSKA2``), teacher of Graph Flow
    (Zou et al., IEEE TMI 42(4), 2023, arXiv 2203.08667) and GKD (Qi et al., IEEE JBHI 2024, arXiv 2207.12995).

    Encoder: ``conv1..conv4`` = :class:`SKDoubleConv` 1->64, 64->128, 128->256, 256->512 with max-pools
    ``pool1..pool3`` between them (bottleneck at H/8). Decoder: ``up7`` (ConvTranspose 2x2 s2, 512->256), concat
    ``c3``, ``conv7`` (512->256), ``pam1`` = :class:`StripPooling` (256, (3, 6)); ``up8`` (256->128), concat
    ``c2``, ``conv8`` (256->128), ``pam2`` = StripPooling(128, (12, 18)); ``up9`` (128->64), concat ``c1``,
    ``conv9`` (128->64), ``pam3`` = :class:`GatedStripPooling` (64, (3, 6)); head ``conv10`` = Dropout2d + 1x1
    conv (64 -> out_channels). Init: Xavier-uniform weights for every ``Conv2d`` (transposed convs keep PyTorch's
    default), BatchNorm gamma 1, beta 0. Built on MONAI's layer factories; the rest is what MONAI lacks.

    Differences from the official code:

    - ``SynchronizedBatchNorm2d`` -> ``nn.BatchNorm2d`` (same state-dict keys; convert with
      ``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training).
    - No in-place activations (features read by hooks are never overwritten).
    - The auxiliary head ``conv11`` (Dropout2d + 1x1 64 -> out_channels) is computed by the official forward but
      never used, and the three strip pooling modules' ``gamma`` scalars are never read; neither is built here.
      That is 65 * out_channels + 3 parameters fewer: for 1 in, 2 classes, 38,292,162 parameters here vs
      38,292,295 in the official module. To load an official checkpoint use
      ``load_weights(net, path, ignore=("conv11.", "pam1.gamma", "pam2.gamma", "pam3.gamma"))``.
    - The published "38.250 M" (Graph-FLow README) is a ``thop.profile`` count (``utils/Flops.py``, 1x256x256,
      printed with ``%.3f``), which gives zero parameters to module types it has no rule for: the
      ``SynchronizedBatchNorm2d`` layers (42,624 parameters) and the strip pooling modules' own ``gamma``. It
      counts the convolutions only: 38,249,668 official (with ``conv11``), 38,249,538 here; both print as 38.250 M.
      The full count here is 0.11 % above the published figure.
    - ``forward`` returns only the logits. The official forward returns ``(c3, up_7, logits)`` in the
      GKD-Framework source and the py36/py37 bytecode of Graph-FLow, but ``(c4, up_7, logits)`` in its py38
      bytecode (a known inconsistency: c4 has 512 channels, which Graph Flow's 256-channel paraphraser cannot
      take). The taps here follow the (c3, up_7) builds: ``enc2`` = ``conv3`` and ``dec2`` = ``up7``.

    Training needs batches of at least 2: every SKConv batch-normalises a 1x1 descriptor (as in the official
    network). Export: scripts with ``torch.jit.script``; ONNX export needs the default ``torch.export``-based exporter
    (``dynamo=True``): the legacy TorchScript-based exporter rejects the strip pooling's adaptive average pools,
    whose output sizes (3, 6, 12, 18) do not divide the feature sizes.

    Args:
        in_channels: input channels (1 in both papers).
        out_channels: number of classes K (logit channels).
        dropout: Dropout2d probability before the 1x1 head.
        sk_reduction: channel reduction of every SKConv's squeeze step.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``, H and W multiples of 8.

    Taps (``tap_points``): ``enc0`` = ``conv1`` (64 @ H), ``enc1`` = ``low`` = ``conv2`` (128 @ H/2),
    ``enc2`` = ``conv3`` (256 @ H/4; Graph Flow's encoder tap), ``enc3`` = ``high`` = ``bottleneck`` = ``conv4``
    (512 @ H/8; GKD's bottleneck), ``dec2`` = ``up7`` (256 @ H/4, the transposed-conv output before the concat;
    Graph Flow's decoder tap).
    """

    tap_points = {
        "enc0": "conv1",
        "enc1": "conv2",
        "low": "conv2",
        "enc2": "conv3",
        "enc3": "conv4",
        "high": "conv4",
        "bottleneck": "conv4",
        "dec2": "up7",
    }

    def __init__(self, in_channels: int = 1, out_channels: int = 2, dropout: float = 0.5, sk_reduction: int = 2):
        super().__init__()
        r = sk_reduction
        self.conv1 = SKDoubleConv(in_channels, 64, r)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = SKDoubleConv(64, 128, r)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = SKDoubleConv(128, 256, r)
        self.pool3 = nn.MaxPool2d(2)
        self.conv4 = SKDoubleConv(256, 512, r)
        self.up7 = Conv[Conv.CONVTRANS, 2](512, 256, 2, stride=2)
        self.conv7 = SKDoubleConv(512, 256, r)
        self.up8 = Conv[Conv.CONVTRANS, 2](256, 128, 2, stride=2)
        self.conv8 = SKDoubleConv(256, 128, r)
        self.up9 = Conv[Conv.CONVTRANS, 2](128, 64, 2, stride=2)
        self.conv9 = SKDoubleConv(128, 64, r)
        self.pam1 = StripPooling(256, (3, 6))
        self.pam2 = StripPooling(128, (12, 18))
        self.pam3 = GatedStripPooling(64, (3, 6))
        self.conv10 = nn.Sequential(nn.Dropout2d(dropout), Conv[Conv.CONV, 2](64, out_channels, 1))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=1.0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.conv1(x)
        c2 = self.conv2(self.pool1(c1))
        c3 = self.conv3(self.pool2(c2))
        c4 = self.conv4(self.pool3(c3))
        dec2 = self.pam1(self.conv7(torch.cat([self.up7(c4), c3], dim=1)))  # decoder at stride 2**2
        dec1 = self.pam2(self.conv8(torch.cat([self.up8(dec2), c2], dim=1)))
        dec0 = self.pam3(self.conv9(torch.cat([self.up9(dec1), c1], dim=1)))
        return self.conv10(dec0)
