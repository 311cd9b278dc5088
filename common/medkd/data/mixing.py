"""Batch mixing (mixup, CutMix) for KD runs: one mixed batch that the teacher and the student both see.

"A good teacher is patient and consistent" (Beyer et al., CVPR 2022) found KD works as *function matching*: the
teacher must see exactly the image the student sees, and aggressive mixing of the batch widens the set of inputs on
which the student copies the teacher. So the mixing happens on the batch *before* both networks (the teacher sees
the mixed image, its outputs are the KD targets as they are), and only the task loss needs to know how the labels
were mixed:

- **mixup** (Zhang et al., ICLR 2018): ``x = lam · x + (1 - lam) · x[index]`` with ``lam ~ Beta(alpha, alpha)``; the
  label of the mixed image is the pair ``(label, label[index])`` weighted by ``lam``:
  ``task = lam · L(pred, label) + (1 - lam) · L(pred, label[index])`` (:func:`mixed_task_loss`).
- **CutMix** (Yun et al., ICCV 2019): a box of about ``(1 - lam)`` of the image (2D or 3D) is pasted from
  ``x[index]``; for segmentation the label of the mixed image is exact (the label map with the same box pasted), so
  the task loss is the plain ``L(pred, label)`` and ``lam`` is the share of the image that was kept.

Usage in a training step (what a trainer does with it; the bundles' config switch is the trainer's)::

    mixing = BatchMixing("cutmix", alpha=1.0, prob=0.5, seed=0)
    mixed = mixing(image, label)               # a MixedBatch
    out = distiller(mixed.image, ...)          # teacher and student see mixed.image
    task = mixed_task_loss(task_loss, out["pred"], mixed.label, mixed.label_b, mixed.lam)

Every random draw comes from one ``torch.Generator`` (the index permutation, the box and, through a seed drawn from
it, ``lam``), so a run is reproducible from ``seed``; :meth:`BatchMixing.state_dict` saves it for a resumed run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BatchMixing", "MixedBatch", "box_share", "cutmix_box", "mixed_task_loss", "mixup_images", "paste_box"]

MODES = ("mixup", "cutmix")


def mixup_images(x: torch.Tensor, index: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam · x + (1 - lam) · x[index]`` for a batch ``x`` of shape (B, ...)."""
    return x * lam + x[index.to(x.device)] * (1.0 - lam)


def cutmix_box(spatial: tuple[int, ...], lam: float, generator: torch.Generator | None = None) -> tuple[slice, ...]:
    """A random box covering about ``1 - lam`` of an image of shape ``spatial`` (2D or 3D).

    Every side is ``round(size · (1 - lam) ** (1 / ndim))`` long, centred at a uniform random position and clipped
    to the image (CutMix's box, in any number of dimensions); the clipped box can be smaller than ``1 - lam``, so use
    the box's real share (:func:`box_share`) as the mixing weight.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    ratio = (1.0 - lam) ** (1.0 / len(spatial))
    box = []
    for size in spatial:
        length = int(round(size * ratio))
        centre = int(torch.randint(0, size, (1,), generator=generator))
        start, stop = max(0, centre - length // 2), min(size, centre - length // 2 + length)
        box.append(slice(start, stop))
    return tuple(box)


def box_share(box: tuple[slice, ...], spatial: tuple[int, ...]) -> float:
    """Share of an image of shape ``spatial`` that ``box`` covers."""
    return float(np.prod([max(0, s.stop - s.start) for s in box])) / float(np.prod(spatial))


def paste_box(x: torch.Tensor, index: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
    """``x`` (B, C, *spatial) with the ``box`` region of every sample replaced by that of ``x[index]`` (a copy)."""
    if len(box) != x.ndim - 2:
        raise ValueError(f"a {len(box)}D box does not fit a batch of shape {tuple(x.shape)}")
    out = x.clone()
    region = (slice(None), slice(None), *box)
    out[region] = x[index.to(x.device)][region]
    return out


@dataclass
class MixedBatch:
    """What :class:`BatchMixing` returns.

    Attributes:
        image: the mixed images (what teacher and student both see).
        label: mixup: the labels of the first images; CutMix: the exact label maps of the mixed images; no mixing:
            the labels as given.
        label_b: mixup: ``label[index]``, the labels of the second images; ``None`` for CutMix and no mixing (the
            task loss is ``L(pred, label)``).
        lam: the weight of ``label`` (mixup) or the share of every image that was kept (CutMix); 1 without mixing.
        index: the permutation that pairs every sample with another one (identity without mixing).
        box: CutMix's box (one slice per spatial axis), else ``None``.
        labelled: when a ``labelled`` mask was given: a mixed sample counts as labelled only if both its sources
            were (a mixture with a label-free sample has no full label); else ``None``.
    """

    image: torch.Tensor
    label: torch.Tensor | None
    label_b: torch.Tensor | None
    lam: float
    index: torch.Tensor
    box: tuple[slice, ...] | None = None
    labelled: torch.Tensor | None = None

    @property
    def mixed(self) -> bool:
        return self.lam < 1.0 and bool((self.index != torch.arange(len(self.index))).any())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Mix another batch-aligned image tensor (e.g. a second view) exactly as :attr:`image` was mixed."""
        if self.box is not None:
            return paste_box(x, self.index, self.box)
        return x if self.lam == 1.0 else mixup_images(x, self.index, self.lam)


class BatchMixing:
    """Mixup or CutMix on a whole batch of images (2D or 3D) and their label maps.

    Args:
        mode: ``"mixup"`` or ``"cutmix"``.
        alpha: ``lam ~ Beta(alpha, alpha)`` (1: uniform; the papers use 0.2-1 for mixup, 1 for CutMix).
        prob: probability that a batch is mixed at all (the others pass through unchanged).
        seed: seed of the mixing's own ``torch.Generator`` (ignored when ``generator`` is given).
        generator: a ``torch.Generator`` (CPU) to draw from instead.

    Call: ``mixing(image, label=None, labelled=None)`` with ``image`` (B, C, H, W[, D]), ``label`` (B, 1 or K, H, W[,
    D]) and ``labelled`` (B,) bool; returns a :class:`MixedBatch`. The draws do not depend on the tensors' device.
    """

    def __init__(self, mode: str = "mixup", alpha: float = 1.0, prob: float = 1.0, seed: int = 0,
                 generator: torch.Generator | None = None):
        if mode not in MODES:
            raise ValueError(f"batch mixing mode must be one of {MODES}, got {mode!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        self.mode, self.alpha, self.prob = mode, float(alpha), float(prob)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))

    def _draw_lam(self) -> float:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return float(np.random.default_rng(seed).beta(self.alpha, self.alpha))

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None,
                 labelled: torch.Tensor | None = None) -> MixedBatch:
        if image.ndim not in (4, 5):
            raise ValueError(f"batch mixing expects images (B, C, H, W[, D]), got shape {tuple(image.shape)}")
        if label is not None and (label.shape[0] != image.shape[0] or label.shape[2:] != image.shape[2:]):
            raise ValueError(f"label {tuple(label.shape)} does not match the images {tuple(image.shape)}")
        batch = image.shape[0]
        identity = torch.arange(batch)
        labelled_t = None if labelled is None else torch.as_tensor(labelled, dtype=torch.bool).view(-1).cpu()
        if batch < 2 or float(torch.rand(1, generator=self.generator)) >= self.prob:
            return MixedBatch(image, label, None, 1.0, identity, None, labelled_t)
        index = torch.randperm(batch, generator=self.generator)
        lam = self._draw_lam()
        both = None if labelled_t is None else labelled_t & labelled_t[index]
        if self.mode == "mixup":
            label_b = None if label is None else label[index.to(label.device)]
            return MixedBatch(mixup_images(image, index, lam), label, label_b, lam, index, None, both)
        spatial = tuple(image.shape[2:])
        box = cutmix_box(spatial, lam, self.generator)
        mixed_label = None if label is None else paste_box(label, index, box)
        lam = 1.0 - box_share(box, spatial)  # the real kept share (the box may be clipped at the border)
        return MixedBatch(paste_box(image, index, box), mixed_label, None, lam, index, box, both)

    def state_dict(self) -> dict:
        """The generator state (save it with the training state so a resumed run draws the same batches) and the
        settings (a resumed run with other settings is refused by :meth:`load_state_dict`)."""
        return {"generator": self.generator.get_state(), "mode": self.mode, "alpha": self.alpha, "prob": self.prob}

    def load_state_dict(self, state: dict) -> None:
        changed = [f"{k}: stored {state[k]!r}, now {getattr(self, k)!r}" for k in ("mode", "alpha", "prob")
                   if k in state and state[k] != getattr(self, k)]
        if changed:
            raise ValueError("the stored batch mixing had other settings (" + "; ".join(changed) + ")")
        self.generator.set_state(state["generator"])


def mixed_task_loss(task_loss, pred: torch.Tensor, label: torch.Tensor, label_b: torch.Tensor | None,
                    lam: float) -> torch.Tensor:
    """The task loss of a mixed batch: ``lam · L(pred, label) + (1 - lam) · L(pred, label_b)``.

    With ``label_b = None`` (CutMix, whose ``label`` is exact, or an unmixed batch) it is ``L(pred, label)``.
    """
    if label_b is None or lam >= 1.0:
        return task_loss(pred, label)
    if lam <= 0.0:
        return task_loss(pred, label_b)
    return lam * task_loss(pred, label) + (1.0 - lam) * task_loss(pred, label_b)
