"""Adversarial distillation: a discriminator tells teacher from student output maps (Graph Flow, WGAN-GP).

The discriminator follows the SAGAN design that Graph Flow uses (``networks/sagan_models.py``): spectrally
normalised 4x4 stride-2 convolutions with LeakyReLU(0.1), self-attention after the third and fourth stage, a final
unnormalised 4x4 convolution to one channel; the input is ``tanh(logits)``. It is trained with its own optimiser in
a separate step (:class:`medkd.engines.WGANGPStep`); the student only sees :class:`AdversarialGeneratorLoss`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["SelfAttention", "LogitsDiscriminator", "gradient_penalty", "AdversarialGeneratorLoss"]

SQUASH = {"tanh": torch.tanh, "softmax": lambda x: torch.softmax(x, dim=1), "none": lambda x: x}


def _conv(spatial_dims: int):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


class SelfAttention(nn.Module):
    """SAGAN self-attention over all positions: ``x + gamma * V softmax(Q^T K)``, ``gamma`` starts at 0.

    Query and key project ``C -> C // 8`` channels (at least 1), the value keeps ``C``. 2D or 3D maps.
    """

    def __init__(self, channels: int, spatial_dims: int = 2):
        super().__init__()
        conv = _conv(spatial_dims)
        inner = max(channels // 8, 1)
        self.query, self.key = conv(channels, inner, 1), conv(channels, inner, 1)
        self.value = conv(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(x).flatten(2)  # (B, C', N)
        k = self.key(x).flatten(2)
        v = self.value(x).flatten(2)  # (B, C, N)
        attention = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # (B, N, N): row i attends to j
        out = torch.bmm(v, attention.transpose(1, 2)).view_as(x)
        return x + self.gamma * out


class LogitsDiscriminator(nn.Module):
    """SAGAN-style discriminator on segmentation output maps (Graph Flow's adversarial distillation).

    Layers: SN-conv 4x4/2 (``in_channels -> conv_dim``), SN-conv (``-> 2 conv_dim``), SN-conv (``-> 4 conv_dim``),
    self-attention, [SN-conv (``-> 8 conv_dim``), self-attention] when ``extra_layer``, then a 4x4 convolution to
    one channel without padding. Every SN-conv is followed by LeakyReLU(0.1). The released code always builds the
    extra layer (``imsize=256`` hard-coded), also for 224 inputs. Output: a ``(B, 1, h, w[, d])`` score map (13x13
    for 256x256 inputs). Inputs smaller than ``min_size`` (64 pixels per side with the extra layer, 32 without) are
    zero-padded (after the squash) to that size, so small crops work too.

    Args:
        in_channels: number of classes ``K`` of the logits.
        spatial_dims: 2 or 3.
        conv_dim: width of the first stage (64 as published).
        extra_layer: build the fourth stage and its attention (as released).
        squash: applied to the input first: ``"tanh"`` (as released), ``"softmax"`` or ``"none"``.
    """

    def __init__(self, in_channels: int, spatial_dims: int = 2, conv_dim: int = 64, extra_layer: bool = True,
                 squash: str = "tanh"):
        super().__init__()
        if squash not in SQUASH:
            raise ValueError(f"squash must be one of {sorted(SQUASH)}, got {squash!r}")
        conv = _conv(spatial_dims)
        self.squash = squash
        widths = [in_channels, conv_dim, 2 * conv_dim, 4 * conv_dim] + ([8 * conv_dim] if extra_layer else [])
        layers: list[nn.Module] = []
        for stage, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]), 1):
            layers += [spectral_norm(conv(cin, cout, 4, stride=2, padding=1)), nn.LeakyReLU(0.1)]
            if stage >= 3:
                layers.append(SelfAttention(cout, spatial_dims))
        self.features = nn.Sequential(*layers)
        self.last = conv(widths[-1], 1, 4)
        self.min_size = 4 * 2 ** (len(widths) - 1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        x = SQUASH[self.squash](logits.float())
        short = [max(self.min_size - s, 0) for s in x.shape[2:]]
        if any(short):
            pad = [v for s in reversed(short) for v in (s // 2, s - s // 2)]
            x = torch.nn.functional.pad(x, pad)
        return self.last(self.features(x))


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP penalty ``mean_b (||grad_x D(x_b)||_2 - 1)^2`` at ``x = e real + (1 - e) fake``, ``e ~ U(0, 1)`` per sample.

    The norm is over every element of a sample (all channels and positions); ``D`` sums its score map. The graph is
    kept (``create_graph=True``) so the penalty trains the discriminator.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    eps = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), device=real.device, dtype=real.dtype,
                     generator=generator)
    mixed = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    score = discriminator(mixed)
    (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


class AdversarialGeneratorLoss(nn.Module):
    """The student's adversarial term: ``-mean D(student logits)`` (WGAN generator loss).

    The discriminator is held by reference, not as a sub-module: the student's optimiser and checkpoint never
    include it, and its parameters get no gradient from this term (they are frozen during the call). It is trained
    by :class:`medkd.engines.WGANGPStep` right after each student step.

    Forward: ``loss(student_logits)`` with ``(B, K, *spatial)`` logits.
    """

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self._discriminator = (discriminator,)  # a tuple hides it from nn.Module registration

    @property
    def discriminator(self) -> nn.Module:
        return self._discriminator[0]

    def forward(self, student_logits: torch.Tensor) -> torch.Tensor:
        d = self.discriminator
        flags = [p.requires_grad for p in d.parameters()]
        d.requires_grad_(False)
        try:
            return -d(student_logits).mean()
        finally:
            for p, flag in zip(d.parameters(), flags):
                p.requires_grad_(flag)
