"""Augmented views of a training batch, made on the batch tensor itself (GKD's multi-view batches).

The views are computed inside the training step from the image batch that the data loader delivered, so the
teacher and the student always see the very same views, on whatever device the batch is. Every view is
label-preserving in the sense GKD needs: it changes the appearance or the pose of the image, never which
structures it shows; the views are used for image-level representative vectors only, never compared with labels.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

__all__ = ["BatchViews", "VIEW_KINDS"]

#: The view kinds :class:`BatchViews` knows, in the order of GKD's default four views.
VIEW_KINDS = ("flip", "rotate", "gamma", "noise_blur")


class BatchViews:
    """N augmented views of a batch ``(B, C, *S)`` (2D or 3D), one per entry of ``views``.

    View kinds (random parameters drawn per sample from torch's global generator, so ``set_determinism`` makes
    them reproducible):

    - ``"flip"``: mirror along the first spatial axis;
    - ``"rotate"``: rotation by a uniform angle in ``[-max_angle, max_angle]`` degrees in the plane of the first
      two spatial axes (bilinear / trilinear resampling, zeros outside: the images are normalised to mean 0);
    - ``"gamma"``: per-sample gamma in ``gamma_range`` applied to the min-max normalised image of each sample, mapped
      back to the sample's original intensity range (a contrast change);
    - ``"noise_blur"``: Gaussian smoothing (MONAI ``GaussianFilter``, sigma ``blur_sigma`` pixels) plus Gaussian noise
      of standard deviation ``noise_std`` times the sample's standard deviation.

    Args:
        views: the kinds, one view each (GKD: 4 views; default all four kinds once).
        max_angle, gamma_range, blur_sigma, noise_std: strengths (above).

    Returns (``__call__``): a list of ``len(views)`` tensors shaped like the input.
    """

    def __init__(self, views: Sequence[str] = VIEW_KINDS, max_angle: float = 15.0,
                 gamma_range: Sequence[float] = (0.7, 1.5), blur_sigma: float = 0.75, noise_std: float = 0.05):
        views = [str(v) for v in views]
        unknown = sorted(set(views) - set(VIEW_KINDS))
        if unknown:
            raise ValueError(f"unknown view kinds {unknown}; available: {list(VIEW_KINDS)}")
        if not views:
            raise ValueError("BatchViews needs at least one view")
        lo, hi = (float(g) for g in gamma_range)
        if not 0 < lo <= hi:
            raise ValueError(f"gamma_range must be 0 < low <= high, got {tuple(gamma_range)}")
        if max_angle < 0 or blur_sigma < 0 or noise_std < 0:
            raise ValueError("max_angle, blur_sigma and noise_std must be non-negative")
        self.views = views
        self.max_angle, self.gamma_range = float(max_angle), (lo, hi)
        self.blur_sigma, self.noise_std = float(blur_sigma), float(noise_std)

    def __len__(self) -> int:
        return len(self.views)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        if image.ndim not in (4, 5):
            raise ValueError(f"BatchViews needs a (B, C, H, W[, D]) batch, got shape {tuple(image.shape)}")
        return [getattr(self, f"_{kind}")(image) for kind in self.views]

    @staticmethod
    def _flip(x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=(2,))

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        b, dims = x.shape[0], x.ndim - 2
        angle = (torch.rand(b, device=x.device) * 2 - 1) * math.radians(self.max_angle)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(b, dims, dims + 1, device=x.device, dtype=x.dtype)
        theta[:, range(dims), range(dims)] = 1.0
        # affine_grid orders the grid coordinates from the last spatial axis to the first: the plane of the first
        # two spatial axes is rows/columns dims-1 and dims-2
        i, j = dims - 1, dims - 2
        theta[:, i, i], theta[:, i, j] = cos.to(x.dtype), -sin.to(x.dtype)
        theta[:, j, i], theta[:, j, j] = sin.to(x.dtype), cos.to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _gamma(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        shape = (-1,) + (1,) * (x.ndim - 1)
        lo, span = lo.view(shape), (hi - lo).clamp_min(1e-8).view(shape)
        low, high = self.gamma_range
        gamma = (low + (high - low) * torch.rand(x.shape[0], device=x.device, dtype=x.dtype)).view(shape)
        return ((x - lo) / span).clamp(0, 1).pow(gamma) * span + lo

    def _noise_blur(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.blur_sigma > 0:
            out = GaussianFilter(x.ndim - 2, sigma=self.blur_sigma).to(x.device)(x)
        if self.noise_std > 0:
            std = x.flatten(1).std(dim=1).view((-1,) + (1,) * (x.ndim - 1))
            out = out + torch.randn_like(x) * std * self.noise_std
        return out
