"""Frechet Semantic Distance (FSD) between two sets of MSAN semantic vectors (GKD, Qi et al., IEEE JBHI 2024).

GKD names the metric but publishes no definition; the project's reconstruction (``reference/methods/gkd.md``
section 6) applies the FID formula (Heusel et al., NeurIPS 2017) to the ``d``-dimensional vectors of an MSAN
encoder (:meth:`medkd.networks.AlignmentNetwork.encode`), one vector per image:

``FSD(A, B) = ||mu_A - mu_B||^2 + Tr(S_A + S_B - 2 (S_A S_B)^(1/2))``

with unbiased sample covariances ``S``, the matrix square root of ``scipy.linalg.sqrtm``, ``eps * I`` added to both
covariances when that root is not finite, and the real part of the root (as pytorch-fid computes FID).

Small sets: with ``n`` vectors a covariance has rank at most ``n - 1``; when ``n - 1 < d`` the covariances are
singular and the square root is ill-conditioned. ``max_dim="auto"`` then first projects both sets onto the top
``k = min(n_A, n_B) - 1`` principal axes of the pooled, centred vectors (PCA), and the result reports the ``k``
used. GKD's two pairings: teacher vs student vectors of the same images, and source- vs unseen-domain vectors of
one model.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

__all__ = ["FSDValue", "FrechetSemanticDistance", "frechet_semantic_distance"]


class FSDValue(float):
    """A float FSD that also carries how it was computed: ``dim`` (the dimension the distance was computed in,
    ``k`` after a projection, else ``d``), ``n_a`` and ``n_b`` (the set sizes)."""

    dim: int
    n_a: int
    n_b: int

    def __new__(cls, value: float, dim: int, n_a: int, n_b: int):
        obj = super().__new__(cls, value)
        obj.dim, obj.n_a, obj.n_b = int(dim), int(n_a), int(n_b)
        return obj

    def __repr__(self) -> str:
        return f"FSDValue({float(self)!r}, dim={self.dim}, n_a={self.n_a}, n_b={self.n_b})"

    def as_dict(self) -> dict:
        return {"fsd": float(self), "dim": self.dim, "n_a": self.n_a, "n_b": self.n_b}


def _as_vectors(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (n, d) array of vectors, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def _check_max_dim(max_dim) -> None:
    if max_dim is None or max_dim == "auto":
        return
    if isinstance(max_dim, bool) or not isinstance(max_dim, (int, np.integer)) or max_dim < 1:
        raise ValueError(f"max_dim must be 'auto', None or a positive int, got {max_dim!r}")


def _target_dim(n_a: int, n_b: int, d: int, max_dim) -> int:
    if max_dim is None:
        return d
    if max_dim == "auto":
        return min(d, min(n_a, n_b) - 1)
    return min(d, int(max_dim))


def _principal_axes(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """``(d, k)``: the top-``k`` eigenvectors of the covariance of the pooled, centred vectors."""
    pooled = np.concatenate([a, b], axis=0)
    pooled = pooled - pooled.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(pooled.T @ pooled)
    return eigvec[:, np.argsort(eigval)[::-1][:k]]


def _frechet(mu_a, cov_a, mu_b, cov_b, eps: float) -> float:
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(covmean)))
    return max(value, 0.0)  # a distance: rounding can leave -1e-15 for identical sets


def frechet_semantic_distance(a, b, eps: float = 1e-6, max_dim="auto") -> FSDValue:
    """Frechet distance between two sets of semantic vectors (FID's formula; see the module docstring).

    Args:
        a: ``(n_A, d)`` vectors (torch tensor or numpy array), one per image; at least 2.
        b: ``(n_B, d)`` vectors of the other set; at least 2.
        eps: diagonal offset added to both covariances when the matrix square root is not finite.
        max_dim: ``"auto"``: when ``min(n_A, n_B) - 1 < d``, project both sets onto the top
            ``k = min(n_A, n_B) - 1`` principal axes of the pooled, centred vectors first; an int ``k`` forces
            that projection (``k >= d`` means none); ``None`` never projects.

    Returns:
        The distance as an :class:`FSDValue` (a float with ``.dim`` = the dimension used, ``.n_a``, ``.n_b``).
    """
    _check_max_dim(max_dim)
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    a, b = _as_vectors(a, "a"), _as_vectors(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same vector length d, got {a.shape} and {b.shape}")
    for name, x in (("a", a), ("b", b)):
        if x.shape[0] < 2:
            raise ValueError(f"FSD needs at least 2 vectors per set (for a covariance), got {x.shape[0]} in {name}")
    d = a.shape[1]
    k = _target_dim(a.shape[0], b.shape[0], d, max_dim)
    if k < d:
        axes = _principal_axes(a, b, k)
        a, b = a @ axes, b @ axes
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    return FSDValue(_frechet(mu_a, cov_a, mu_b, cov_b, eps), k, a.shape[0], b.shape[0])


class FrechetSemanticDistance:
    """Accumulator of :func:`frechet_semantic_distance` over batches.

    ``update(a_batch, b_batch)`` appends ``(n, d)`` vectors to set A and / or set B (either may be ``None``);
    ``compute()`` returns ``dict(fsd=float, dim=int, n_a=int, n_b=int)`` on everything gathered since ``reset()``.

    Args:
        eps: see :func:`frechet_semantic_distance`.
        max_dim: see :func:`frechet_semantic_distance`.
    """

    def __init__(self, eps: float = 1e-6, max_dim="auto"):
        _check_max_dim(max_dim)
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        self.eps, self.max_dim = float(eps), max_dim
        self.reset()

    def reset(self) -> None:
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self._dim: int | None = None

    def _add(self, store: list, x, name: str) -> None:
        x = _as_vectors(x, name)
        if self._dim is not None and x.shape[1] != self._dim:
            raise ValueError(f"{name} has vectors of length {x.shape[1]}, earlier batches had {self._dim}")
        self._dim = x.shape[1]
        store.append(x)

    def update(self, a_batch=None, b_batch=None) -> None:
        if a_batch is not None:
            self._add(self._a, a_batch, "a_batch")
        if b_batch is not None:
            self._add(self._b, b_batch, "b_batch")

    def compute(self) -> dict:
        if not self._a or not self._b:
            raise ValueError(f"FrechetSemanticDistance needs vectors in both sets, got {len(self._a)} batch(es) "
                             f"for A and {len(self._b)} for B")
        value = frechet_semantic_distance(np.concatenate(self._a), np.concatenate(self._b), self.eps, self.max_dim)
        return value.as_dict()
