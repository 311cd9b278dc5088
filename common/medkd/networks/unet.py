"""The plain U-Nets of MTMS-CKD (Biswas, arXiv 2406.03173): students S1 / S2 and the multi-task teacher T1.

One implementation, :class:`SharedEncoderUNet`, serves all three: an encoder of Conv3x3-BN-ReLU blocks and
max-pools, a bottleneck block, and one or more decoders (ConvTranspose 2x2 stride 2, concat the skip, conv block,
1x1 head) that share the encoder and its skips. Facts from the official code (RisabBiswas/MTMS-Med-Seg-KD @ 6490ad4):
the students use one conv per level, the teacher two; convolutions carry biases.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution

__all__ = ["SharedEncoderUNet", "SmallUNet", "MultiTaskUNet"]


def _conv_block(in_channels: int, out_channels: int, convs: int) -> nn.Sequential:
    """``convs`` x (Conv3x3 with bias -> BatchNorm -> ReLU), the first mapping ``in_channels -> out_channels``."""
    return nn.Sequential(
        *[
            Convolution(2, in_channels if i == 0 else out_channels, out_channels, kernel_size=3, act="RELU",
                        norm="BATCH")
            for i in range(convs)
        ]
    )


class _EncoderLevel(nn.Module):
    """Conv block at the current stride, then its own 2x2 max-pool; returns ``(skip, pooled)``."""

    def __init__(self, in_channels: int, out_channels: int, convs: int):
        super().__init__()
        self.block = _conv_block(in_channels, out_channels, convs)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.block(x)
        return skip, self.pool(skip)


class _DecoderLevel(nn.Module):
    """ConvTranspose 2x2 stride 2 (``in -> out``), concat the skip (``out`` channels), conv block (``2 out -> out``)."""

    def __init__(self, in_channels: int, out_channels: int, convs: int):
        super().__init__()
        self.up = Convolution(2, in_channels, out_channels, strides=2, kernel_size=2, is_transposed=True,
                              conv_only=True, padding=0, output_padding=0)
        self.block = _conv_block(2 * out_channels, out_channels, convs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class _Decoder(nn.Module):
    """Decoder levels from the bottleneck up to full resolution, then a 1x1 head (with bias)."""

    def __init__(self, channels: Sequence[int], out_channels: int, convs: int):
        super().__init__()
        self.levels = nn.ModuleList(
            [_DecoderLevel(channels[k + 1], channels[k], convs) for k in reversed(range(len(channels) - 1))]
        )
        self.head = Convolution(2, channels[0], out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        k = len(skips)
        for level in self.levels:
            k -= 1
            x = level(x, skips[k])
        return self.head(x)


class SharedEncoderUNet(nn.Module):
    """2D U-Net whose encoder and skips feed one or more decoders, each with its own 1x1 head.

    Encoder level k (k = 0 .. L-1, L = ``len(channels) - 1``): ``convs_per_block`` x Conv3x3-BN-ReLU to
    ``channels[k]``, then MaxPool 2 (each pool its own module). Bottleneck: the same block to ``channels[L]`` at
    stride 2**L. Each decoder level: ConvTranspose 2x2 stride 2, concat the encoder skip, conv block. Decoder 0
    is the segmentation decoder (``out_channels`` logits, returned by ``forward``); decoder i > 0 produces
    ``aux_out_channels[i - 1]`` channels. Built on MONAI's ``Convolution`` block (conv, transposed conv, BN,
    ReLU); the multi-decoder wiring is what MONAI lacks.

    Args:
        in_channels: input channels.
        out_channels: segmentation logit channels.
        channels: block widths from full resolution to the bottleneck (at least 2 entries).
        convs_per_block: Conv-BN-ReLU layers per block.
        aux_out_channels: output channels of each extra decoder (none by default).

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``, H and W multiples of 2**L.

    Taps (``tap_points``): ``enc<k>`` (k = 1 .. L) = the pooled output of encoder level k - 1 (``channels[k-1]``
    @ H / 2**k); ``low`` = ``enc1``; ``high`` = ``enc3`` when L >= 3; ``bottleneck`` (``channels[L]`` @ H / 2**L);
    ``dec<k>`` (k = 0 .. L-1) = the segmentation decoder's level output at stride 2**k (``channels[k]`` @
    H / 2**k), ``dec0`` being the last decoder feature before the head.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        convs_per_block: int = 1,
        aux_out_channels: Sequence[int] = (),
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 entries (one level and the bottleneck), got {channels}")
        levels = len(channels) - 1
        widths_in = [in_channels] + channels[:-2]
        self.encoder = nn.ModuleList(
            [_EncoderLevel(widths_in[k], channels[k], convs_per_block) for k in range(levels)]
        )
        self.bottleneck = _conv_block(channels[-2], channels[-1], convs_per_block)
        self.decoders = nn.ModuleList(
            [_Decoder(channels, int(c), convs_per_block) for c in [out_channels, *aux_out_channels]]
        )
        taps = {f"enc{k}": f"encoder.{k - 1}.pool" for k in range(1, levels + 1)}
        taps["low"] = taps["enc1"]
        if levels >= 3:
            taps["high"] = taps["enc3"]
        taps["bottleneck"] = "bottleneck"
        taps.update({f"dec{k}": f"decoders.0.levels.{levels - 1 - k}" for k in range(levels)})
        self.tap_points: dict[str, str] = taps

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every decoder's head, segmentation logits first."""
        skips: list[torch.Tensor] = []
        for level in self.encoder:
            skip, x = level(x)
            skips.append(skip)
        x = self.bottleneck(x)
        outputs: list[torch.Tensor] = []
        for decoder in self.decoders:
            outputs.append(decoder(x, skips))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


class SmallUNet(SharedEncoderUNet):
    """MTMS-CKD's student U-Nets: S1 "U-Net-S" (``channels=(16, 32, 64)``, 57,297 parameters) and S2 "U-Net"
    (``channels=(32, 64, 128)``, 227,233 parameters), as in the official ``build_small_unet`` (one Conv-BN-ReLU
    per level, ConvTranspose upsampling; the thesis figures draw two convs and bilinear upsampling, the code and
    the thesis parameter counts have one conv and transposed convs). A :class:`SharedEncoderUNet` with one decoder.

    Args:
        in_channels: input channels (3 in MTMS-CKD: grey CT replicated).
        out_channels: logit channels (1 in MTMS-CKD: sigmoid output).
        channels: block widths, full resolution to bottleneck.
        convs_per_block: Conv-BN-ReLU layers per block.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.

    Taps used by MTMS-CKD (S1 shapes): ``enc2`` = pooled output of encoder block 2, the code's ``p2``
    (32 @ H/4); ``bottleneck`` = ``b`` (64 @ H/4); ``dec0`` = last decoder feature ``d2`` (16 @ H). Also
    ``enc1`` = ``low`` (16 @ H/2) and ``dec1`` (32 @ H/2).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        convs_per_block: int = 1,
    ):
        super().__init__(in_channels, out_channels, channels, convs_per_block)


class MultiTaskUNet(SharedEncoderUNet):
    """MTMS-CKD's multi-task teacher T1 (official ``MultiTask_U_Net``): a U-Net with a segmentation decoder and a
    reconstruction decoder sharing the encoder and its skips; 43,236,036 parameters with the defaults.

    Encoder: 4 blocks of two Conv3x3-BN-ReLU (64, 128, 256, 512) with max-pools, bottleneck 512 -> 1024 at H/16;
    each decoder: 4 levels of ConvTranspose 2x2 s2 + concat + two Conv-BN-ReLU; heads 1x1 64 -> ``out_channels``
    (segmentation) and 64 -> ``recon_channels`` (reconstruction of the input). A :class:`SharedEncoderUNet` with
    two decoders.

    ``forward`` returns the segmentation logits only (one tensor, for MONAI inferers) but always runs the
    reconstruction decoder too, so its output can be read through the ``recon`` tap while training the teacher;
    :meth:`forward_tasks` returns both. (The official training loop runs the network twice per batch, once per
    task; one pass gives the same outputs.)

    Args:
        in_channels: input channels (3 in MTMS-CKD).
        out_channels: segmentation logit channels (1 in MTMS-CKD).
        recon_channels: reconstruction channels (the input's, 3 in MTMS-CKD).
        channels: block widths, full resolution to bottleneck.
        convs_per_block: Conv-BN-ReLU layers per block.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``, H and W multiples of 16.

    Taps used by MTMS-CKD: ``enc2`` = ``p2`` (128 @ H/4); ``bottleneck`` = ``b`` (1024 @ H/16); ``dec0`` =
    ``d4_seg``, the last segmentation-decoder feature (64 @ H); ``recon`` = the reconstruction head output
    (``recon_channels`` @ H). Also ``enc1`` = ``low`` (64 @ H/2), ``enc3`` = ``high`` (256 @ H/8), ``enc4``
    (512 @ H/16) and ``dec1..dec3``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        recon_channels: int = 3,
        channels: Sequence[int] = (64, 128, 256, 512, 1024),
        convs_per_block: int = 2,
    ):
        super().__init__(in_channels, out_channels, channels, convs_per_block, aux_out_channels=(recon_channels,))
        self.tap_points["recon"] = "decoders.1.head"

    def forward_tasks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(segmentation logits (B, out_channels, H, W), reconstruction (B, recon_channels, H, W))``."""
        outputs = self.forward_all(x)
        return outputs[0], outputs[1]
