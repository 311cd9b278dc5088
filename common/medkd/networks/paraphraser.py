"""Graph Flow's teacher-side Paraphraser: an autoencoder of one teacher feature map (Zou et al., TMI 2023).

Encoder ("mode 1"): 3x3 conv C->C, 3x3 conv C->P, 3x3 conv P->P; decoder: 3x3 transposed convs P->P, P->C, C->C
(stride 1); every layer has a bias and is followed by LeakyReLU(0.1); no normalisation. It is pretrained to
reconstruct a frozen teacher tap; during distillation its frozen encoder turns the tap into a ``P``-channel
"factor" that the student's tap is compared with (P = the student's tap width: 24 for Mobile U-Net, 64 for
ENet / ERFNet).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Paraphraser"]


def _stack(conv, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin, cout in zip(widths[:-1], widths[1:]):
        layers += [conv(cin, cout, 3, stride=1, padding=1, bias=True), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Autoencoder of a ``(B, in_channels, *spatial)`` feature map through a ``factor_channels`` bottleneck.

    Args:
        in_channels: channels of the teacher tap (FANet's ``c3`` / ``up_7``: 256).
        factor_channels: channels of the factor ``P`` (the student tap width).
        spatial_dims: 2 or 3.

    ``forward(x)`` returns the reconstruction; :meth:`encode` the factor. Spatial size is kept.
    """

    def __init__(self, in_channels: int, factor_channels: int, spatial_dims: int = 2):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        deconv = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.in_channels, self.factor_channels = int(in_channels), int(factor_channels)
        self.encoder = _stack(conv, [in_channels, in_channels, factor_channels, factor_channels])
        self.decoder = _stack(deconv, [factor_channels, factor_channels, in_channels, in_channels])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Paraphraser({self.in_channels} -> {self.factor_channels}) got a feature map with "
                             f"{x.shape[1]} channels; set in_channels to the teacher tap's width")
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))
