"""Readers of public downloads in their released layout, and :func:`prepare_dataset` that converts them.

- ``msd``: any Medical Segmentation Decathlon task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``), e.g.
  Task09_Spleen. Only the labelled ``training`` entries of ``dataset.json`` are converted.
- ``lits``: LiTS training batches, ``volume-N.nii`` / ``segmentation-N.nii`` in any sub-folder (labels 0 background,
  1 liver, 2 tumour). Default window [-60, 140] HU mapped to [-1, 1] (EMKD).
- ``synapse``: the TransUNet preprocessed Synapse layout: ``train_npz/caseXXXX_sliceYYY.npz`` (training slices,
  keys ``image``, ``label``) and ``test_vol_h5/caseXXXX.npy.h5`` (test volumes ``(D, H, W)``); labels 0..8. The
  standard split is TransUNet's published case lists (18 training / 12 test); intensities are already normalised.

The CT readers ``kits19``, ``chaos`` and ``flare22`` are in :mod:`medkd.data.ct_datasets`, the 2D photo readers
``busi``, ``cvc_clinicdb``, ``chasedb1``, ``drive``, ``stare`` and ``m2caiseg`` in :mod:`medkd.data.image_datasets`;
``docs/datasets.md`` describes every one.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from medkd.data.convert import Case, ConvertOptions, convert
from medkd.data.ct_datasets import CT_READERS
from medkd.data.download import Download, nifti_pair, read_or_fail, strip_nifti
from medkd.data.image_datasets import IMAGE_READERS

__all__ = ["Download", "READERS", "read_msd", "read_lits", "read_synapse", "prepare_dataset"]

SYNAPSE_LABELS = {"0": "background", "1": "aorta", "2": "gallbladder", "3": "left kidney", "4": "right kidney",
                  "5": "liver", "6": "pancreas", "7": "spleen", "8": "stomach"}
# TransUNet's published split (Beckschen/TransUNet, lists/lists_Synapse): the cases of train.txt (slice names
# caseXXXX_sliceYYY) and of test_vol.txt, in the lists' order.
SYNAPSE_TRAIN = ("case0031", "case0007", "case0009", "case0005", "case0026", "case0039", "case0024", "case0034",
                 "case0033", "case0030", "case0023", "case0040", "case0010", "case0021", "case0006", "case0027",
                 "case0028", "case0037")
SYNAPSE_TEST = ("case0008", "case0022", "case0038", "case0036", "case0032", "case0002", "case0029", "case0003",
                "case0001", "case0004", "case0025", "case0035")
SYNAPSE_SPLIT = {c: "training" for c in SYNAPSE_TRAIN} | {c: "test" for c in SYNAPSE_TEST}


def read_msd(src: Path) -> Download:
    """A Decathlon task folder: the labelled ``training`` entries of ``dataset.json``."""
    meta_path = src / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"MSD task folder {src} has no dataset.json")
    meta = read_or_fail(meta_path, lambda p: json.loads(p.read_text()))
    cases = []
    for entry in meta.get("training", []):
        image, label = src / entry["image"], src / entry["label"]
        load = partial(nifti_pair, image, label)
        cases.append(Case(strip_nifti(image.name), image, label, load))
    labels = meta.get("labels", {})
    metadata = {k: meta[k] for k in ("name", "description", "reference", "licence", "modality") if k in meta}
    return Download(cases, {int(k) for k in labels}, {**metadata, "labels": labels})


def read_lits(src: Path) -> Download:
    """LiTS training volumes found anywhere under ``src`` (e.g. ``Training Batch 1/volume-0.nii``)."""
    cases = []
    for image in sorted(src.rglob("volume-*.nii*"), key=lambda p: int(re.findall(r"\d+", p.name)[0])):
        number = re.findall(r"\d+", image.name)[0]
        label = image.with_name(image.name.replace("volume-", "segmentation-"))
        cases.append(Case(f"volume-{number}", image, label, partial(nifti_pair, image, label)))
    metadata = {"name": "LiTS", "labels": {"0": "background", "1": "liver", "2": "tumour"},
                "reference": "Bilic et al., The Liver Tumor Segmentation Benchmark (LiTS), MedIA 2023"}
    return Download(cases, {0, 1, 2}, metadata, defaults={"window": (-60.0, 140.0)})


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return np.asarray(data["image"]), np.asarray(data["label"])


def _synapse_train(slices: list[Path]):
    """Stack a training case's npz slices (sorted by slice number) into ``(H, W, D)`` volumes."""
    pairs = [read_or_fail(p, _load_npz) for p in slices]
    for p, (img, lab) in zip(slices, pairs):
        if img.shape != lab.shape:
            raise ValueError(f"image in {p} has shape {img.shape} but its label has shape {lab.shape}")
    return np.stack([i for i, _ in pairs], -1), np.stack([lab for _, lab in pairs], -1), np.eye(4)


def _synapse_test(path: Path):
    """A test case's h5 volume, ``(D, H, W)`` transposed to ``(H, W, D)``."""
    import h5py

    def load(p):
        with h5py.File(p, "r") as f:
            return np.asarray(f["image"]), np.asarray(f["label"])

    image, label = read_or_fail(path, load)
    return np.moveaxis(image, 0, -1), np.moveaxis(label, 0, -1), np.eye(4)


def read_synapse(src: Path) -> Download:
    """The TransUNet Synapse layout; the standard split is TransUNet's published 18 training / 12 test cases.

    Cases are read from either folder (``train_npz`` slices or ``test_vol_h5`` volumes) and split by their id, so a
    download preprocessed differently still gets the published split; ids outside it need ``--split random``.
    """
    train_dir, test_dir = src / "train_npz", src / "test_vol_h5"
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"Synapse download {src} has no {folder.name}/ folder (TransUNet layout)")
    by_case: dict[str, list[Path]] = {}
    for path in sorted(train_dir.glob("case*_slice*.npz")):
        by_case.setdefault(path.name.split("_slice")[0], []).append(path)
    train = [Case(c, p[0], p[0], partial(_synapse_train, sorted(p, key=lambda q: int(q.stem.split("slice")[1]))))
             for c, p in by_case.items()]
    test = [Case(p.name.split(".")[0], p, p, partial(_synapse_test, p)) for p in sorted(test_dir.glob("case*.npy.h5"))]
    found = {c.case_id for c in train + test}
    absent = [c for c in sorted(SYNAPSE_SPLIT) if c not in found]
    if absent:
        print(f"[prepare] synapse: {len(absent)} of the {len(SYNAPSE_SPLIT)} cases of the published split are not in "
              f"the download: {', '.join(absent)}", flush=True)
    metadata = {"name": "Synapse multi-organ CT (TransUNet preprocessing)", "labels": SYNAPSE_LABELS,
                "split_source": "TransUNet lists/lists_Synapse (train.txt, test_vol.txt)"}
    return Download(train + test, set(range(9)), metadata, standard_split=dict(SYNAPSE_SPLIT))


READERS: dict[str, Callable[[Path], Download]] = {"msd": read_msd, "lits": read_lits, "synapse": read_synapse,
                                                  **CT_READERS, **IMAGE_READERS}


def prepare_dataset(dataset: str, src: str | os.PathLike, out: str | os.PathLike, split: str = "standard",
                    **options) -> Path:
    """Convert the download of ``dataset`` at ``src`` into ``out``; returns the datalist path.

    Args:
        dataset: a key of :data:`READERS`.
        src: the download folder in its released layout.
        out: new output folder.
        split: ``"standard"`` uses the dataset's published split where it has one (else a seeded split);
            ``"random"`` always splits patients by ``seed``.
        options: fields of :class:`medkd.data.convert.ConvertOptions`, overriding the dataset's defaults; any
            other keyword goes to the dataset's reader (e.g. ``annotator`` of ``chasedb1``).
    """
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(READERS)}")
    if split not in ("standard", "random"):
        raise ValueError(f"split must be 'standard' or 'random', got {split!r}")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"download folder not found: {src}")
    convert_keys = {f.name for f in fields(ConvertOptions)}
    reader_options = {k: v for k, v in options.items() if k not in convert_keys}
    reader = READERS[dataset]
    accepted = set(inspect.signature(reader).parameters) - {"src"}
    unknown = sorted(set(reader_options) - accepted)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {dataset}; conversion options: {sorted(convert_keys)}; "
                         f"{dataset} options: {sorted(accepted) or 'none'}")
    download = reader(src, **reader_options)
    options = {k: v for k, v in options.items() if k in convert_keys}
    for key in ("window", "out_range", "resize"):
        if isinstance(options.get(key), list):
            options[key] = tuple(options[key])
    opts = ConvertOptions(**{**download.defaults, **options})
    standard = download.standard_split if split == "standard" else None
    metadata = {**download.metadata, "source": dataset}
    return convert(download.cases, out, opts, download.allowed_labels, standard, metadata)
