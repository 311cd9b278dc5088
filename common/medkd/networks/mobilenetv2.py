"""MobileNetV2 (Sandler et al., CVPR 2018) as a segmentation backbone, and the two students built on it.

- :class:`MobileNetV2UNet`: the "Mobile U-Net" student of Graph Flow (Zou et al., IEEE TMI) and GKD (Qi et al.,
  IEEE JBHI 2024): MobileNetV2 encoder, transposed-conv + inverted-residual decoder with U-Net skips.
- :class:`MobileNetV2Seg`: EMKD's MobileNetV2 student (Qin et al., IEEE TMI 2021): output stride 8, no decoder.

Both share one backbone, :class:`MobileNetV2Backbone`, built from MONAI ``Convolution`` blocks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

__all__ = ["InvertedResidual", "MobileNetV2Backbone", "MobileNetV2UNet", "MobileNetV2Seg"]

# (expansion t, output channels c, repeats n) of the seven inverted-residual stages; strides are separate.
_STAGES = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))
_IMAGENET_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280
_RELU6 = ("relu6", {"inplace": False})


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
             act: tuple | None = _RELU6) -> Convolution:
    """Bias-free conv -> BatchNorm (-> ReLU6 unless ``act`` is None), "same" padding."""
    return Convolution(2, in_channels, out_channels, strides=stride, kernel_size=kernel_size, groups=groups,
                       act=act, norm="batch", bias=False)


def _init_fan_out_normal(module: nn.Module) -> None:
    """Conv and transposed-conv weights ~ N(0, 2 / (k_h * k_w * out_channels)), biases 0; BatchNorm (1, 0).

    The initialisation of the official MobileNetV2 U-Net (Graph Flow / GKD); for ``nn.Conv2d`` it is also
    ``kaiming_normal_(mode="fan_out")``, the initialisation of EMKD's MobileNetV2.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expansion (skipped when ``expansion == 1``) -> 3x3 depthwise ->
    linear 1x1 projection, each with BatchNorm (ReLU6 after the first two); identity shortcut when the stride is 1
    and the channels are unchanged. Built from MONAI ``Convolution`` blocks.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the depthwise conv (1 or 2).
        expansion: hidden channels = ``round(in_channels * expansion)``.

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 6):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expansion))
        layers = [] if expansion == 1 else [_conv_bn(in_channels, hidden)]
        layers += [_conv_bn(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
                   _conv_bn(hidden, out_channels, act=None)]
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return x + self.layers(x)
        return self.layers(x)


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 feature extractor (width 1.0), ``features`` = ``nn.Sequential`` of 19 modules:
    ``features[0]`` = 3x3 conv-BN-ReLU6 ``in_channels -> 32`` at stride 2; ``features[1:18]`` = the 17 inverted
    residuals of the stages (t, c, n) = (1,16,1), (6,24,2), (6,32,3), (6,64,4), (6,96,3), (6,160,3), (6,320,1);
    ``features[18]`` = 1x1 conv-BN-ReLU6 320 -> 1280. Built from MONAI ``Convolution`` blocks; no classifier.

    Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.

    Args:
        in_channels: input channels (1 for grey images; the first conv takes them directly).
        stage_strides: stride of the first block of each of the 7 stages. The ImageNet default
            ``(1, 2, 2, 2, 1, 2, 1)`` gives output stride 32; EMKD's ``(1, 1, 2, 1, 1, 2, 1)`` gives 8.

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, 1280, H / s, W / s)``, ``s = 2 * prod(stage_strides)``.
    """

    def __init__(self, in_channels: int = 1, stage_strides: Sequence[int] = _IMAGENET_STRIDES):
        super().__init__()
        if len(stage_strides) != len(_STAGES):
            raise ValueError(f"stage_strides needs {len(_STAGES)} values (one per stage), got {list(stage_strides)}")
        layers: list[nn.Module] = [_conv_bn(in_channels, _STEM_CHANNELS, kernel_size=3, stride=2)]
        channels = _STEM_CHANNELS
        for (expansion, out_channels, repeats), stride in zip(_STAGES, stage_strides):
            for i in range(repeats):
                layers.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expansion))
                channels = out_channels
        layers.append(_conv_bn(channels, _LAST_CHANNELS))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _UpStage(nn.Module):
    """Mobile U-Net decoder stage: ``InvertedResidual(cat[skip, ConvTranspose(k4, s2, p1)(x)])`` (expansion 6)."""

    def __init__(self, in_channels: int, skip_channels: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=4, stride=2, padding=1)
        self.fuse = InvertedResidual(2 * skip_channels, skip_channels, stride=1, expansion=6)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([skip, self.upsample(x)], dim=1))


class MobileNetV2UNet(nn.Module):
    """"Mobile U-Net": the MobileNetV2 U-Net student of Graph Flow and GKD (4.64 M parameters published).

    Encoder: :class:`MobileNetV2Backbone` (output stride 32) with skips taken after ``features[1]`` (x1, 16 @ H/2),
    ``features[3]`` (x2, 24 @ H/4), ``features[6]`` (x3, 32 @ H/8), ``features[13]`` (x4, 96 @ H/16) and
    ``features[18]`` (x5, 1280 @ H/32). Decoder ``up1..up4``: ConvTranspose(k4, s2, p1) to the skip's channels,
    concatenation ``[skip, upsampled]``, InvertedResidual(2c -> c, expansion 6); then ``conv_last`` 1x1 16 -> 3,
    ``conv_score`` 1x1 3 -> ``out_channels`` and bilinear x2 upsampling (align_corners=False). Initialisation as in
    the official code (:func:`_init_fan_out_normal`); no ImageNet weights. Built on MONAI ``Convolution`` blocks.

    ``forward(x) = decode(encode(x))``: GKD's DICD decodes a replaced bottleneck with the student's own skips,
    ``decode(skips[:-1] + [new_bottleneck])`` (the official ``forward(x, De)``).

    Differences from the official code (Graph Flow ``MobileNetV2_unet``, GKD ``MobileNetV2_unet``): ``forward``
    returns the logits only (features are read through ``tap_points``); the unused ImageNet classifier of the
    backbone (1280 -> 1000, 1.28 M parameters) is not built; plain BatchNorm instead of SyncBatchNorm.

    References: Zou et al., "Graph Flow: Cross-layer Graph Flow Distillation for Dual Efficient Medical Image
    Segmentation", IEEE TMI 2022 (arXiv 2203.08667); Qi et al., "Exploring Generalizable Distillation for
    Efficient Medical Image Segmentation", IEEE JBHI 2024 (arXiv 2207.12995).

    Args:
        in_channels: input channels.
        out_channels: number of classes (logit channels).

    Shapes: ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``, H and W multiples of 32.
    """

    tap_points = {
        "enc1": "backbone.features.1",
        "enc2": "backbone.features.3",
        "enc3": "backbone.features.6",
        "enc4": "backbone.features.13",
        "bottleneck": "backbone.features.18",
        "dec2": "up3",
        "low": "backbone.features.1",
        "high": "backbone.features.6",
    }

    def __init__(self, in_channels: int = 1, out_channels: int = 2):
        super().__init__()
        self.backbone = MobileNetV2Backbone(in_channels)
        self.skip_ends = [1, 3, 6, 13, 18]  # index of the last ``features`` module of x1..x5
        self.up1 = _UpStage(_LAST_CHANNELS, 96)
        self.up2 = _UpStage(96, 32)
        self.up3 = _UpStage(32, 24)
        self.up4 = _UpStage(24, 16)
        self.conv_last = nn.Conv2d(16, 3, kernel_size=1)
        self.conv_score = nn.Conv2d(3, out_channels, kernel_size=1)
        _init_fan_out_normal(self)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features ``[x1, x2, x3, x4, x5]`` at strides 2, 4, 8, 16, 32 (x5 = the 1280-channel bottleneck)."""
        skips: list[torch.Tensor] = []
        for i, layer in enumerate(self.backbone.features):
            x = layer(x)
            if i in self.skip_ends:
                skips.append(x)
        return skips

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, out_channels, H, W)`` from ``[x1, x2, x3, x4, bottleneck]`` as returned by :meth:`encode`."""
        d = self.up1(skips[4], skips[3])
        d = self.up2(d, skips[2])
        d = self.up3(d, skips[1])
        d = self.up4(d, skips[0])
        logits = self.conv_score(self.conv_last(d))
        return F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class MobileNetV2Seg(nn.Module):
    """EMKD's MobileNetV2 student: MobileNetV2 at output stride 8 and a 1x1 conv head, no decoder.

    The stages (6,24,2) and (6,64,4) run at stride 1 (stage strides ``(1, 1, 2, 1, 1, 2, 1)``), so the final
    1x1 conv-BN-ReLU6 (1280 channels) is at H/8; ``head`` (1x1 conv 1280 -> ``out_channels``) is applied there and
    the logits are upsampled bilinearly (align_corners=True) to the input size. Initialisation: kaiming-normal
    fan-out (:func:`_init_fan_out_normal`), as the official code. Built on MONAI ``Convolution`` blocks.

    Differences from the official code (EMKD ``networks/mobilenetv2.py``): the first conv takes ``in_channels``
    directly instead of the grey image replicated to 3 channels (the same function class, 576 parameters fewer
    for one input channel); the unused ImageNet classifier is not built; ``forward`` returns the logits only.

    Reference: Qin et al., "Efficient Medical Image Segmentation Based on Knowledge Distillation", IEEE TMI 2021
    (arXiv 2108.09987).

    Args:
        in_channels: input channels.
        out_channels: number of classes (logit channels).

    Shapes: ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``.
    """

    tap_points = {"low": "backbone.features.0", "high": "backbone.features.18", "bottleneck": "backbone.features.18"}

    def __init__(self, in_channels: int = 1, out_channels: int = 2):
        super().__init__()
        self.backbone = MobileNetV2Backbone(in_channels, stage_strides=(1, 1, 2, 1, 1, 2, 1))
        self.head = nn.Conv2d(_LAST_CHANNELS, out_channels, kernel_size=1)
        _init_fan_out_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
