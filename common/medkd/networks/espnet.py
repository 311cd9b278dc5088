"""ESPNet (Mehta et al., ECCV 2018), an efficient-spatial-pyramid student of EMKD, with its RUM decoder.

S. Mehta, M. Rastegari, A. Caspi, L. Shapiro, H. Hajishirzi, "ESPNet: Efficient Spatial Pyramid of Dilated
Convolutions for Semantic Segmentation", ECCV 2018.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import ADN, Convolution

__all__ = ["ESPBlock", "ESPNet"]

_NORM = ("batch", {"eps": 1e-3})


def _prelu(channels: int) -> tuple:
    return ("prelu", {"num_parameters": channels})


def _bn_prelu(channels: int) -> ADN:
    """ESPNet's ``BR``: BatchNorm (eps 1e-3) then PReLU with one slope per channel (MONAI ``ADN``)."""
    return ADN("NA", channels, act=_prelu(channels), norm=_NORM, norm_dim=2)


def _conv_bn_prelu(in_channels: int, out_channels: int, kernel_size: int, strides: int = 1) -> Convolution:
    """ESPNet's ``CBR``: bias-free convolution, BatchNorm, per-channel PReLU (MONAI ``Convolution``)."""
    return Convolution(2, in_channels, out_channels, strides=strides, kernel_size=kernel_size,
                       act=_prelu(out_channels), norm=_NORM, bias=False)


def _conv(in_channels: int, out_channels: int, kernel_size: int, strides: int = 1, dilation: int = 1) -> nn.Conv2d:
    """ESPNet's ``C``/``CDilated``: bias-free convolution with "same" padding."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=strides, padding=(kernel_size - 1) // 2 * dilation,
                     dilation=dilation, bias=False)


class ESPBlock(nn.Module):
    """Efficient spatial pyramid module: reduce, split, transform, hierarchical feature fusion (HFF), merge.

    A reduction convolution maps the input to ``n = out_channels // 5`` maps (1x1; 3x3 stride 2 when
    ``downsample``). Five 3x3 convolutions with dilations 1, 2, 4, 8, 16 read it: the first gives
    ``out_channels - 4n`` maps, the others ``n``; the outputs of dilations 2..16 are summed cumulatively (HFF), all
    five are concatenated to ``out_channels`` maps, the input is added when ``residual``, and BatchNorm + PReLU
    finish. ``downsample=True`` is the paper's strided ESP (``DownSamplerB``), ``downsample=False`` the ESP block
    (``DilatedParllelResidualBlockB``). Normalisation and activation are MONAI's ``ADN``.

    Args:
        in_channels: input channels.
        out_channels: output channels (>= 5).
        downsample: halve the resolution (3x3 stride-2 reduction) instead of a 1x1 reduction.
        residual: add the input before the normalisation (needs ``in_channels == out_channels`` and no
            downsampling).

    Shapes:
        ``(B, in_channels, H, W)`` -> ``(B, out_channels, H', W')`` with ``H' = ceil(H / 2)`` when ``downsample``.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool = False, residual: bool = True):
        super().__init__()
        n = out_channels // 5
        if n == 0:
            raise ValueError(f"an ESP block needs out_channels >= 5 (one map per branch), got {out_channels}")
        if residual and (downsample or in_channels != out_channels):
            raise ValueError("a residual ESP block keeps resolution and width")
        self.residual = residual
        self.reduce = _conv(in_channels, n, 3, strides=2) if downsample else _conv(in_channels, n, 1)
        self.first = _conv(n, out_channels - 4 * n, 3)
        self.dilated = nn.ModuleList([_conv(n, n, 3, dilation=2**k) for k in range(1, 5)])
        self.norm_act = _bn_prelu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.reduce(x)
        outputs = [self.first(reduced)]
        for branch in self.dilated:
            fused = branch(reduced)
            if len(outputs) > 1:  # HFF: add the running sum of the previous dilated branches
                fused = fused + outputs[-1]
            outputs.append(fused)
        merged = torch.cat(outputs, dim=1)
        if self.residual:
            merged = merged + x
        return self.norm_act(merged)


class ESPNet(nn.Module):
    """ESPNet for 2D segmentation (Mehta et al., ECCV 2018): the ESPNet-C encoder with the RUM-based decoder.

    Encoder: level 1 is a 3x3 stride-2 CBR (16 @ H/2), concatenated with the input image average-pooled to H/2
    and normalised (``b1``, 16 + in_channels @ H/2); level 2 is a strided ESP (64 @ H/4) and ``p`` ESP blocks,
    concatenated with the strided ESP's output and the image pooled to H/4 (``b2``, 128 + in_channels @ H/4);
    level 3 is a strided ESP (128 @ H/8) and ``q`` ESP blocks, concatenated with the strided ESP's output
    (``b3``, 256 @ H/8). Decoder: 1x1 classifier of ``b3`` + BatchNorm, 2x up-convolution; concatenated with a 1x1
    classifier of ``b2``; BR + a non-residual ESP block (``fusion_channels`` maps); 2x up-convolution + BR;
    concatenated with ``b1``, a 3x3 CBR and a final 2x up-convolution to the logits at input size. Built on
    MONAI ``Convolution``/``ADN``.

    Input channels: the input image is concatenated to the level-1 and level-2 features (input
    reinforcement), so ``b1``, ``b2``, the second strided ESP, the level-2 classifier and the final CBR grow with
    ``in_channels``. EMKD replicates its grey slice to 3 channels inside ``forward``; here ``in_channels`` is the
    channel count of the tensor given to ``forward``: ``in_channels=3`` fed with the slice repeated 3 times
    (e.g. MONAI ``RepeatChannel``) is EMKD's network exactly, ``in_channels=1`` is the same architecture on the
    single grey channel (the ``enc2`` tap then has 129 channels instead of 131).

    Differences from the official codes: the ESP block fusing levels 2 and 3 has ``classes`` output maps in the
    original code, which leaves its branches zero maps wide when ``classes < 5``; EMKD hard-codes 5. The default
    ``fusion_channels=None`` uses ``max(5, out_channels)``: EMKD's network for up to 5 classes, the original's
    (Mehta et al.'s code) from 5 classes on.
    EMKD's network returns ``(logits, low, high)``; this one returns the logits and exposes the features as taps.

    Parameters: 182,719 for ``in_channels=1, out_channels=2, p=2, q=3`` (183,725 with ``in_channels=3``, EMKD's
    network). No published figure; as a check, ``in_channels=3, out_channels=20, p=2, q=8`` gives 365,109, close
    to the about 0.36 M reported for the original ESPNet.

    Tap points (alias -> module; the module's output is the feature):
        ``low`` -> ``level1`` (level-1 CBR, 16 @ H/2, EMKD's low tap); ``enc2`` -> ``b2`` (level-2 BR,
        128 + in_channels @ H/4); ``high`` and ``enc3`` -> ``b3`` (BR of the level-3 concatenation, 256 @ H/8,
        EMKD's high tap).

    Args:
        in_channels: input channels.
        out_channels: number of classes (logit channels).
        p: number of ESP blocks at level 2.
        q: number of ESP blocks at level 3.
        fusion_channels: output maps of the decoder's ESP block (>= 5); ``None`` for ``max(5, out_channels)``.

    Shapes:
        ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``; H and W must be multiples of 8.
    """

    tap_points = {"low": "level1", "enc2": "b2", "enc3": "b3", "high": "b3"}

    def __init__(self, in_channels: int = 1, out_channels: int = 2, p: int = 2, q: int = 3,
                 fusion_channels: int | None = None):
        super().__init__()
        classes = out_channels
        fusion = max(5, classes) if fusion_channels is None else fusion_channels
        # encoder (ESPNet-C)
        self.level1 = _conv_bn_prelu(in_channels, 16, 3, strides=2)
        self.image_pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.b1 = _bn_prelu(16 + in_channels)
        self.level2_0 = ESPBlock(16 + in_channels, 64, downsample=True, residual=False)
        self.level2 = nn.Sequential(*[ESPBlock(64, 64) for _ in range(p)])
        self.b2 = _bn_prelu(128 + in_channels)
        self.level3_0 = ESPBlock(128 + in_channels, 128, downsample=True, residual=False)
        self.level3 = nn.Sequential(*[ESPBlock(128, 128) for _ in range(q)])
        self.b3 = _bn_prelu(256)
        # decoder (reduce-upsample-merge)
        self.level3_classifier = nn.Sequential(_conv(256, classes, 1), nn.BatchNorm2d(classes, eps=1e-3))
        self.up_l3 = nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False)
        self.level2_classifier = _conv(128 + in_channels, classes, 1)
        self.combine_l2_l3 = nn.Sequential(_bn_prelu(2 * classes), ESPBlock(2 * classes, fusion, residual=False))
        self.up_l2 = nn.Sequential(nn.ConvTranspose2d(fusion, classes, 2, stride=2, bias=False), _bn_prelu(classes))
        self.merge_l1 = _conv_bn_prelu(16 + in_channels + classes, classes, 3)
        self.classifier = nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image2 = self.image_pool(x)
        image4 = self.image_pool(image2)
        b1 = self.b1(torch.cat([self.level1(x), image2], dim=1))
        down2 = self.level2_0(b1)
        b2 = self.b2(torch.cat([self.level2(down2), down2, image4], dim=1))
        down3 = self.level3_0(b2)
        b3 = self.b3(torch.cat([down3, self.level3(down3)], dim=1))
        up3 = self.up_l3(self.level3_classifier(b3))
        up2 = self.up_l2(self.combine_l2_l3(torch.cat([self.level2_classifier(b2), up3], dim=1)))
        return self.classifier(self.merge_l1(torch.cat([up2, b1], dim=1)))
