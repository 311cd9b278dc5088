"""Semi-supervised training data: a labelled subset, label-free samples, and batches that mix them half and half.

Graph Flow's "dual efficient" mode takes, at every iteration, a labelled half-batch and an unlabelled half-batch
(the smaller set is cycled). :class:`SemiSupervisedDataset` yields one labelled and one unlabelled sample per index;
MONAI's default collate (``list_data_collate``) flattens the pairs, so a loader with ``batch_size = B / 2`` gives
batches of ``B`` samples whose ``labelled`` flags the :class:`~medkd.engines.KDTrainer` passes to the Distiller (task
loss and label-reading terms on labelled samples only).
"""

from __future__ import annotations

import math
import os
from typing import Hashable, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from torch.utils.data import Dataset

from medkd.data.datalist import load_datalist

__all__ = ["split_labelled", "label_free_entries", "MarkLabelledd", "SemiSupervisedDataset", "steps_per_epoch",
           "epochs_for"]


def split_labelled(items: Sequence[dict], fraction: float, seed: int = 0, group_key: str = "case",
                   extra_unlabelled: Sequence[dict] = ()) -> dict[str, list[dict]]:
    """Keep the labels of ``fraction`` of the training groups (patients); the others lose their label.

    Args:
        items: datalist entries (``image``, ``label``, optionally ``group_key``).
        fraction: share of groups that stay labelled, in (0, 1]; at least one group stays labelled.
        seed: seed of the draw (the same seed gives the same subset).
        group_key: entries sharing this value (e.g. the slices of one patient) stay together; entries without it
            are their own group.
        extra_unlabelled: entries without labels to add (e.g. a datalist's ``"unlabeled"`` list).

    Returns:
        ``{"labelled": [...], "unlabelled": [...]}``; unlabelled entries are copies without ``label``.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"labelled fraction must be in (0, 1], got {fraction!r}")
    groups = sorted({str(item.get(group_key, item["image"])) for item in items})
    if not groups:
        raise ValueError("no training entries to split")
    keep = max(1, round(float(fraction) * len(groups)))
    chosen = {groups[i] for i in np.random.default_rng(seed).permutation(len(groups))[:keep]}
    labelled = [dict(item) for item in items if str(item.get(group_key, item["image"])) in chosen]
    unlabelled = [{k: v for k, v in item.items() if k != "label"} for item in items
                  if str(item.get(group_key, item["image"])) not in chosen]
    unlabelled += [{k: v for k, v in item.items() if k != "label"} for item in extra_unlabelled]
    return {"labelled": labelled, "unlabelled": unlabelled}


def label_free_entries(path: str | os.PathLike, lists: Sequence[str] = ("training",),
                       base_dir: str | os.PathLike | None = None, label_key: str = "label") -> list[dict]:
    """The entries of one or more lists of a datalist without their labels: the training set of label-free KD.

    Args:
        path: the datalist JSON.
        lists: the lists whose images are used, e.g. ``["training", "unlabeled"]`` (every image of the training list
            and the datalist's unlabelled images); labels are dropped, never read.
        base_dir: folder that relative paths are joined to (default: the datalist's folder).
        label_key: the key that is removed from every entry.

    Raises:
        KeyError: a list the datalist lacks (naming the file and the lists it has).
        ValueError: no list given, or no entry in all of them.
    """
    if isinstance(lists, str):
        lists = [lists]
    if not lists:
        raise ValueError(f"label-free training needs at least one list of {path} to take images from")
    entries = [{k: v for k, v in item.items() if k != label_key}
               for key in lists for item in load_datalist(path, key, base_dir)]
    if not entries:
        raise ValueError(f"the lists {list(lists)} of datalist {path} hold no entries")
    return entries


class MarkLabelledd(MapTransform):
    """Sets ``labelled`` (bool) from the presence of the label; a missing label becomes an all-zero placeholder.

    Put it right after ``LoadImaged`` / ``EnsureChannelFirstd`` (both with ``allow_missing_keys=True``), so that
    labelled and label-free samples go through the same spatial transforms and collate into one batch. The
    placeholder has one channel and the image's spatial shape; it is never used as a target (the trainer masks it).
    """

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image", flag_key: str = "labelled"):
        super().__init__(keys, allow_missing_keys=True)
        self.image_key, self.flag_key = image_key, flag_key

    def __call__(self, data: dict[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        present = all(key in d for key in self.keys)
        for key in self.keys:
            if key not in d:
                image = d[self.image_key]
                d[key] = torch.zeros_like(torch.as_tensor(image)[:1])
        d[self.flag_key] = present
        return d


class SemiSupervisedDataset(Dataset):
    """Item ``i`` is ``[labelled[i % n_l], unlabelled[i % n_u]]``; the length is the larger of the two sets.

    With ``shuffle=True`` in the loader, every sample of the larger set is seen once per epoch and the smaller set is
    cycled, as in Graph Flow's semi-supervised loop. Both datasets must yield dicts with a ``labelled`` flag
    (see :class:`MarkLabelledd`).
    """

    def __init__(self, labelled: Dataset, unlabelled: Dataset):
        if len(labelled) == 0:
            raise ValueError("the labelled set is empty: raise the labelled fraction")
        if len(unlabelled) == 0:
            raise ValueError("the unlabelled set is empty: lower the labelled fraction or add unlabelled entries")
        self.labelled, self.unlabelled = labelled, unlabelled

    def __len__(self) -> int:
        return max(len(self.labelled), len(self.unlabelled))

    def __getitem__(self, index: int) -> list[dict]:
        return [self.labelled[index % len(self.labelled)], self.unlabelled[index % len(self.unlabelled)]]


def steps_per_epoch(kind: str, labelled: int, unlabelled: int, batch: int = 16) -> int:
    """Optimiser steps in one epoch of a training run of data ``kind`` over ``labelled`` + ``unlabelled`` slices.

    ``labelled``: ``ceil(labelled / batch)``; ``unlabelled`` (``recipes/unlabelled.json``: items are (labelled,
    unlabelled) pairs, as many as the larger set, ``batch // 2`` pairs a batch): ``ceil(max(l, u) / (batch // 2))``;
    ``label_free`` (every image, labels dropped): ``ceil((l + u) / batch)``.
    """
    if kind == "labelled":
        return math.ceil(labelled / batch)
    if kind == "unlabelled":
        return math.ceil(max(labelled, unlabelled) / max(1, batch // 2))
    if kind == "label_free":
        return math.ceil((labelled + unlabelled) / batch)
    raise ValueError(f"unknown regime kind {kind!r}")


def epochs_for(steps: int, per_epoch: int, what: str) -> int:
    """The number of epochs that makes exactly ``steps`` optimiser steps (an error if ``per_epoch`` does not divide it)."""
    if steps % per_epoch:
        raise ValueError(f"{what}: {steps} steps is not a whole number of epochs of {per_epoch} steps; "
                         "choose a multiple of both the control's and the KD runs' steps per epoch")
    return steps // per_epoch
