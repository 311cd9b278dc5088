"""ENet (Paszke et al., 2016), a lightweight encoder-decoder student of EMKD and Graph Flow.

A. Paszke, A. Chaurasia, S. Kim, E. Culurciello, "ENet: A Deep Neural Network Architecture for Real-Time Semantic
Segmentation", arXiv:1606.02147, 2016.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import ADN, Convolution
from monai.networks.layers.factories import Norm
from monai.networks.layers.utils import get_act_layer

__all__ = [
    "max_unpool2x2", "ConvPoolDownsampler", "RegularBottleneck", "DownsamplingBottleneck", "UpsamplingBottleneck", "ENet",
]


def _conv(in_channels: int, out_channels: int, act: tuple | str | None, **kwargs) -> Convolution:
    """Bias-free 2D convolution + BatchNorm (+ activation), ENet's unit layer."""
    return Convolution(2, in_channels, out_channels, act=act, norm=Norm.BATCH, bias=False, **kwargs)


def max_unpool2x2(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Undo a 2x2 stride-2 max-pool: each value of ``x`` goes to the position ``indices`` holds, zeros elsewhere.

    The same output as ``F.max_unpool2d(x, indices, 2)`` (a non-overlapping pool gives every output position at
    most one value), written as a scatter because, in torch 2.13, ``nn.MaxUnpool2d`` does not compile with
    ``torch.jit.script``, ``F.max_unpool2d`` fails under ``torch.jit.trace``, and the TorchScript-based ONNX
    exporter (``dynamo=False``) has no ``max_unpool2d``; the scatter works with all of them.

    Shapes:
        ``x`` and ``indices`` ``(B, C, H, W)`` (indices into the flattened ``2H x 2W`` map) -> ``(B, C, 2H, 2W)``.
    """
    b, c, h, w = x.shape
    flat = torch.zeros(b, c, 4 * h * w, dtype=x.dtype, device=x.device)
    return flat.scatter(2, indices.flatten(2), x.flatten(2)).view(b, c, 2 * h, 2 * w)


class ConvPoolDownsampler(nn.Module):
    """Halve the resolution with a strided 3x3 convolution and a 2x2 max-pool side by side.

    The convolution gives ``out_channels - in_channels`` maps, the max-pool passes the ``in_channels`` input maps
    through; both are concatenated, then normalised and activated. ENet's initial block and ERFNet's
    ``DownsamplerBlock`` are this block. Normalisation and activation are MONAI's ``ADN``.

    The convolution zero-pads one row on top and one column on the left only (``F.pad(x, (1, 0, 1, 0))``, then
    ``padding=0``) instead of the usual ``padding=1`` on all sides. For even H and W the output is the same
    (a stride-2 3x3 window never reaches the bottom/right padding), but its size is then ``(H - 2) // 2 + 1``,
    the very expression of the max-pool's, so ``torch.export`` (the ONNX exporter of torch >= 2.9) needs no
    "conv size == pool size" guard. With ``padding=1`` that guard, nested three times in ERFNet, made
    ``torch.onnx.export`` with dynamic height/width fail ("Eq(-x/8 + (((x/4)//2)), 0) cannot be solved").
    For odd H or W both paths now drop the last row/column (``padding=1`` raised a size mismatch instead).

    Args:
        in_channels: input channels; must be smaller than ``out_channels``.
        out_channels: output channels.
        act: activation name or ``(name, kwargs)`` for MONAI's ``Act`` factory.
        norm: normalisation name or ``(name, kwargs)`` for MONAI's ``Norm`` factory.
        bias: whether the convolution has a bias.

    Shapes:
        ``(B, in_channels, H, W)`` -> ``(B, out_channels, H // 2, W // 2)``.
    """

    def __init__(self, in_channels: int, out_channels: int, act: tuple | str = "prelu",
                 norm: tuple | str = Norm.BATCH, bias: bool = False):
        super().__init__()
        if not 0 < in_channels < out_channels:
            raise ValueError(f"need 0 < in_channels < out_channels, got {in_channels} and {out_channels}")
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=0, bias=bias)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.norm_act = ADN("NA", out_channels, act=act, norm=norm, norm_dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_act(torch.cat([self.conv(F.pad(x, (1, 0, 1, 0))), self.pool(x)], dim=1))


class RegularBottleneck(nn.Module):
    """ENet's residual bottleneck: ``act(x + expand(middle(project(x))))`` at constant resolution and width.

    ``project`` is a 1x1 convolution to ``channels // 4``; ``middle`` a 3x3 (optionally dilated) convolution, or
    an asymmetric pair ``(k, 1)`` then ``(1, k)``; ``expand`` a 1x1 convolution back to ``channels`` followed by
    spatial dropout. Convolutions are bias-free, each followed by BatchNorm; projection and middle also by the
    activation (paper Fig. 2b). Built from MONAI ``Convolution`` blocks.

    Args:
        channels: input and output channels.
        act: activation (MONAI ``Act`` name or ``(name, kwargs)``).
        dropout: spatial dropout (``Dropout2d``) probability after the expansion.
        dilation: dilation of the 3x3 middle convolution.
        asymmetric: kernel size ``k`` of an asymmetric ``(k, 1)`` + ``(1, k)`` middle pair; 0 for a square 3x3.

    Shapes:
        ``(B, channels, H, W)`` -> ``(B, channels, H, W)``.
    """

    def __init__(self, channels: int, act: tuple | str, dropout: float, dilation: int = 1, asymmetric: int = 0):
        super().__init__()
        inner = channels // 4
        if asymmetric:
            middle = nn.Sequential(
                Convolution(2, inner, inner, kernel_size=(asymmetric, 1), bias=False, conv_only=True),
                _conv(inner, inner, act, kernel_size=(1, asymmetric)),
            )
        else:
            middle = _conv(inner, inner, act, kernel_size=3, dilation=dilation)
        self.branch = nn.Sequential(
            _conv(channels, inner, act, kernel_size=1),
            middle,
            _conv(inner, channels, None, kernel_size=1, dropout=dropout, dropout_dim=2),
        )
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.branch(x))


class DownsamplingBottleneck(nn.Module):
    """ENet's downsampling bottleneck; returns the features and the max-pool indices the decoder unpools with.

    Main path: 2x2 max-pool (indices kept), zero-padded along channels to ``out_channels``. Branch: 2x2 stride-2
    projection to ``in_channels // 4``, 3x3 convolution, 1x1 expansion to ``out_channels`` with spatial dropout.
    Built from MONAI ``Convolution`` blocks.

    Args:
        in_channels: input channels.
        out_channels: output channels (``>= in_channels``).
        act: activation (MONAI ``Act`` name or ``(name, kwargs)``).
        dropout: spatial dropout probability after the expansion.

    Shapes:
        ``(B, in_channels, H, W)`` -> ``((B, out_channels, H/2, W/2), indices (B, in_channels, H/2, W/2))``.
    """

    def __init__(self, in_channels: int, out_channels: int, act: tuple | str, dropout: float):
        super().__init__()
        inner = in_channels // 4
        self.extra_channels = out_channels - in_channels
        self.pool = nn.MaxPool2d(2, stride=2, return_indices=True)
        self.branch = nn.Sequential(
            _conv(in_channels, inner, act, kernel_size=2, strides=2, padding=0),
            _conv(inner, inner, act, kernel_size=3),
            _conv(inner, out_channels, None, kernel_size=1, dropout=dropout, dropout_dim=2),
        )
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        main, indices = self.pool(x)
        main = F.pad(main, [0, 0, 0, 0, 0, self.extra_channels])
        return self.act(main + self.branch(x)), indices


class UpsamplingBottleneck(nn.Module):
    """ENet's upsampling bottleneck, doubling the resolution with the indices of its downsampling bottleneck.

    Main path: 1x1 convolution + BatchNorm to ``out_channels``, then max-unpooling with the stored indices
    (:func:`max_unpool2x2`).
    Branch: 1x1 projection to ``in_channels // 4``, 2x2 stride-2 transposed convolution, 1x1 expansion to
    ``out_channels`` with spatial dropout. Built from MONAI ``Convolution`` blocks.

    Args:
        in_channels: input channels.
        out_channels: output channels; must equal the channels the paired max-pool saw.
        act: activation (MONAI ``Act`` name or ``(name, kwargs)``).
        dropout: spatial dropout probability after the expansion.

    Shapes:
        ``(B, in_channels, H, W)`` and indices ``(B, out_channels, H, W)`` -> ``(B, out_channels, 2H, 2W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, act: tuple | str, dropout: float):
        super().__init__()
        inner = in_channels // 4
        self.main = _conv(in_channels, out_channels, None, kernel_size=1)
        self.branch = nn.Sequential(
            _conv(in_channels, inner, act, kernel_size=1),
            _conv(inner, inner, act, kernel_size=2, strides=2, padding=0, output_padding=0, is_transposed=True),
            _conv(inner, out_channels, None, kernel_size=1, dropout=dropout, dropout_dim=2),
        )
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.act(max_unpool2x2(self.main(x), indices) + self.branch(x))


# Stages 2 and 3: (dilation, asymmetric kernel) of each regular bottleneck, paper Table 1.
_DILATED_STAGE = ((1, 0), (2, 0), (1, 5), (4, 0), (1, 0), (8, 0), (1, 5), (16, 0))


class ENet(nn.Module):
    """ENet for 2D segmentation (Paszke et al., 2016), with taps for EMKD and Graph Flow.

    Layout (paper Table 1): initial block (3x3 stride-2 conv with ``16 - in_channels`` maps beside a 2x2
    max-pool of the input, 16 maps at H/2); stage 1 (downsampling bottleneck to 64 at H/4 + 4 regular); stage 2
    (downsampling bottleneck to 128 at H/8 + 8 regular/dilated/asymmetric bottlenecks); stage 3 (stage 2's 8
    bottlenecks again, without downsampling); stage 4 (upsampling bottleneck to 64 at H/4 + 2 regular); stage 5
    (upsampling bottleneck to 16 at H/2 + 1 regular); a 2x2 stride-2 transposed convolution to the logits. The
    encoder (initial block and stages 1-3) uses PReLU, the decoder ReLU, as in the paper. Bottlenecks build on
    MONAI ``Convolution``/``ADN`` blocks; the unpooling uses the max-pool indices of the paired downsampling
    bottleneck (:func:`max_unpool2x2`).

    This is the paper's network with Graph Flow's layer widths (its 0.349 M count). Differences from the official
    codes, chosen and documented here:

    - EMKD's ENet defines ``bottleneck3_5`` but never calls it in ``forward`` (stage 3 has 7 blocks). This network
      runs all 8 stage-3 bottlenecks.
    - Input channels: EMKD replicates a grey image to 3 channels inside its initial block (13 conv + 3 pool maps);
      Graph Flow's initial block takes 1 channel (15 conv + 1 pool map). Here ``in_channels`` is the channel count
      of the tensor given to ``forward`` and the conv gives ``16 - in_channels`` maps: ``in_channels=1`` is Graph
      Flow's initial block, ``in_channels=3`` fed with the grey slice repeated 3 times (e.g. MONAI
      ``RepeatChannel``) is EMKD's.
    - Initial-block pooling is the paper's non-overlapping 2x2 max-pool (Graph Flow: 3x3, stride 2, padding 1).
    - Final layer: 2x2 stride-2 transposed convolution without bias, as EMKD (Graph Flow: 3x3, 80 * out_channels
      more parameters).
    - Bottlenecks: one PReLU slope per layer (both official codes; the paper mentions one per feature map);
      projection width ``in_channels // 4`` (Graph Flow); no activation after the expansion (paper Fig. 2b; Graph
      Flow adds one); the asymmetric 5x1 + 1x5 pair shares one BatchNorm and activation (EMKD; Graph Flow has one
      after each). Dropout 0.01 in stage 1 and 0.1 from stage 2 on, decoder included (Graph Flow).
    - EMKD's ENet differs inside the blocks (its downsampling main path is a 1x1 convolution of the pooled map,
      not zero padding; its projections are ``out_channels // 4`` wide; PReLU in the decoder; dropout 0.1
      throughout); this network does not reproduce those.

    Parameters: 348,554 for ``in_channels=1, out_channels=2`` (Graph Flow README: 0.349 M; its extra BatchNorm
    and PReLU layers and 3x3 head account for the difference).

    Tap points (alias -> module; the module's output is the feature):
        ``low`` -> ``initial`` (16 @ H/2, EMKD's low tap); ``enc2`` -> ``stage1`` (64 @ H/4, Graph Flow's
        ``regular1_4``); ``high`` and ``enc3`` -> ``stage3`` (128 @ H/8, EMKD's high tap); ``dec2`` -> ``stage4``
        (64 @ H/4, Graph Flow's ``regular4_2``).

    Args:
        in_channels: input channels (< 16).
        out_channels: number of classes (logit channels).
        encoder_act: activation of the initial block and stages 1-3 (MONAI ``Act`` name or ``(name, kwargs)``).
        decoder_act: activation of stages 4-5.
        dropout: spatial dropout of stage 1 and of stages 2-5.

    Shapes:
        ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``; H and W must be multiples of 8.
    """

    tap_points = {"low": "initial", "enc2": "stage1", "enc3": "stage3", "high": "stage3", "dec2": "stage4"}

    def __init__(self, in_channels: int = 1, out_channels: int = 2, encoder_act: tuple | str = "prelu",
                 decoder_act: tuple | str = "relu", dropout: Sequence[float] = (0.01, 0.1)):
        super().__init__()
        p1, p2 = float(dropout[0]), float(dropout[1])
        self.initial = ConvPoolDownsampler(in_channels, 16, act=encoder_act)
        self.down1 = DownsamplingBottleneck(16, 64, encoder_act, p1)
        self.stage1 = nn.Sequential(*[RegularBottleneck(64, encoder_act, p1) for _ in range(4)])
        self.down2 = DownsamplingBottleneck(64, 128, encoder_act, p2)
        self.stage2 = self._dilated_stage(encoder_act, p2)
        self.stage3 = self._dilated_stage(encoder_act, p2)
        self.up4 = UpsamplingBottleneck(128, 64, decoder_act, p2)
        self.stage4 = nn.Sequential(*[RegularBottleneck(64, decoder_act, p2) for _ in range(2)])
        self.up5 = UpsamplingBottleneck(64, 16, decoder_act, p2)
        self.stage5 = RegularBottleneck(16, decoder_act, p2)
        self.head = nn.ConvTranspose2d(16, out_channels, 2, stride=2, bias=False)

    @staticmethod
    def _dilated_stage(act: tuple | str, dropout: float) -> nn.Sequential:
        return nn.Sequential(*[RegularBottleneck(128, act, dropout, d, k) for d, k in _DILATED_STAGE])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.initial(x)
        x, indices1 = self.down1(x)
        x = self.stage1(x)
        x, indices2 = self.down2(x)
        x = self.stage3(self.stage2(x))
        x = self.stage4(self.up4(x, indices2))
        x = self.stage5(self.up5(x, indices1))
        return self.head(x)
