"""ERFNet (Romera et al., 2017), a factorised-convolution encoder-decoder student of EMKD and Graph Flow.

E. Romera, J. M. Alvarez, L. M. Bergasa, R. Arroyo, "ERFNet: Efficient Residual Factorized ConvNet for Real-Time
Semantic Segmentation", IEEE Transactions on Intelligent Transportation Systems 19(1):263-272, 2018 (IV 2017).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution

from medkd.networks.enet import ConvPoolDownsampler

__all__ = ["NonBottleneck1D", "ERFNet"]

_NORM = ("batch", {"eps": 1e-3})


class NonBottleneck1D(nn.Module):
    """ERFNet's "non-bottleneck-1D" residual block: two factorised 3x3 convolutions, ``relu(x + branch(x))``.

    Branch: (3, 1) conv, ReLU, (1, 3) conv, BatchNorm, ReLU, then the same pair dilated by ``dilation``, BatchNorm
    and spatial dropout. Convolutions have biases. Built from MONAI ``Convolution`` blocks.

    Args:
        channels: input and output channels.
        dilation: dilation of the second factorised pair.
        dropout: spatial dropout (``Dropout2d``) probability; 0 for none.

    Shapes:
        ``(B, channels, H, W)`` -> ``(B, channels, H, W)``.
    """

    def __init__(self, channels: int, dilation: int = 1, dropout: float = 0.0):
        super().__init__()

        def conv(kernel: tuple[int, int], dil: tuple[int, int], act, norm, drop=None) -> Convolution:
            return Convolution(2, channels, channels, kernel_size=kernel, dilation=dil, act=act, norm=norm,
                               dropout=drop, dropout_dim=2, bias=True)

        d = dilation
        self.branch = nn.Sequential(
            conv((3, 1), (1, 1), "relu", None),
            conv((1, 3), (1, 1), "relu", _NORM),
            conv((3, 1), (d, 1), "relu", None),
            conv((1, 3), (1, d), None, _NORM, dropout if dropout > 0 else None),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.branch(x))


def _upsampler(in_channels: int, out_channels: int) -> Convolution:
    """ERFNet's ``UpsamplerBlock``: 3x3 stride-2 transposed convolution (output padding 1), BatchNorm, ReLU."""
    return Convolution(2, in_channels, out_channels, strides=2, kernel_size=3, padding=1, output_padding=1,
                       is_transposed=True, act="relu", norm=_NORM, bias=True)


class ERFNet(nn.Module):
    """ERFNet for 2D segmentation (Romera et al., 2017), with taps for EMKD and Graph Flow.

    Encoder: downsampler (``in_channels`` -> 16, H/2), downsampler (16 -> 64, H/4), 5 non-bottleneck-1D(64),
    downsampler (64 -> 128, H/8), 8 non-bottleneck-1D(128) with dilations 2, 4, 8, 16, 2, 4, 8, 16. A downsampler
    is a 3x3 stride-2 convolution with ``out - in`` maps beside a 2x2 max-pool, BatchNorm, ReLU
    (:class:`~medkd.networks.enet.ConvPoolDownsampler`). Decoder: upsampler (128 -> 64, H/4) + 2
    non-bottleneck-1D(64), upsampler (64 -> 16, H/2) + 2 non-bottleneck-1D(16), then a 2x2 stride-2 transposed
    convolution to the logits. Blocks build on MONAI ``Convolution``/``ADN``.

    Differences from the official codes:

    - EMKD's ERFNet returns only the logits, so it has no taps. This network declares taps (below); the low/high
      pair is EMKD's reference recommendation ([RECON]), enc2/dec2 are Graph Flow's.
    - The official encoder holds an ``output_conv`` (128 -> classes, used only for encoder-only pre-training and
      never in the segmentation forward); it is left out (258 parameters for 2 classes).
    - Dropout is the paper's (0.03 in the 64-channel stage, 0.3 in the 128-channel stage, none in the decoder), as
      in EMKD; Graph Flow's copy uses 0.1 in both encoder stages (``dropout=(0.1, 0.1)``).

    Parameters: 2,062,872 for ``in_channels=1, out_channels=2`` (Graph Flow README: 2.063 M, which counts the unused
    ``output_conv``: 2,063,130).

    Tap points (alias -> module; the module's output is the feature):
        ``low`` -> ``encoder.initial`` (16 @ H/2); ``enc2`` -> ``encoder.down2`` (the 16 -> 64 downsampler,
        64 @ H/4, Graph Flow's encoder ``layers[0]``); ``high`` and ``enc3`` -> ``encoder`` (128 @ H/8);
        ``dec2`` -> ``decoder.stage2`` (upsampler 128 -> 64 and its 2 blocks, 64 @ H/4, Graph Flow's decoder
        ``layers[2]``).

    Args:
        in_channels: input channels (< 16).
        out_channels: number of classes (logit channels).
        dropout: spatial dropout of the 64-channel and of the 128-channel encoder stages.

    Shapes:
        ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``; H and W must be multiples of 8.
    """

    tap_points = {
        "low": "encoder.initial",
        "enc2": "encoder.down2",
        "enc3": "encoder",
        "high": "encoder",
        "dec2": "decoder.stage2",
    }

    def __init__(self, in_channels: int = 1, out_channels: int = 2, dropout: Sequence[float] = (0.03, 0.3)):
        super().__init__()
        p64, p128 = float(dropout[0]), float(dropout[1])

        def downsampler(cin: int, cout: int) -> ConvPoolDownsampler:
            return ConvPoolDownsampler(cin, cout, act="relu", norm=_NORM, bias=True)

        self.encoder = nn.Sequential(OrderedDict(
            initial=downsampler(in_channels, 16),
            down2=downsampler(16, 64),
            stage2=nn.Sequential(*[NonBottleneck1D(64, 1, p64) for _ in range(5)]),
            down3=downsampler(64, 128),
            stage3=nn.Sequential(*[NonBottleneck1D(128, d, p128) for d in (2, 4, 8, 16, 2, 4, 8, 16)]),
        ))
        self.decoder = nn.Sequential(OrderedDict(
            stage2=nn.Sequential(_upsampler(128, 64), NonBottleneck1D(64), NonBottleneck1D(64)),
            stage1=nn.Sequential(_upsampler(64, 16), NonBottleneck1D(16), NonBottleneck1D(16)),
        ))
        self.head = nn.ConvTranspose2d(16, out_channels, 2, stride=2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))
