"""Readers of CT downloads in their released layout: ``kits19``, ``chaos`` (CT, DICOM series), ``flare22``.

- ``kits19``: the KiTS19 repository (``data/case_00000/imaging.nii.gz`` + ``segmentation.nii.gz``; ``--src`` may be
  the repository root or its ``data/`` folder). The volumes are stored as ``(slices, height, width)``; the slice axis
  is moved last (the affine follows) so 2D extraction gives axial slices. Labels 0 background, 1 kidney, 2 tumour.
  Cases 210..299 (the challenge's test set) ship without segmentation and are skipped. Default window
  [-200, 300] HU mapped to [-1, 1] (EMKD).
- ``chaos``: the CT part of the CHAOS training set (``CT/<patient>/DICOM_anon/*.dcm`` + ``CT/<patient>/Ground/
  liver_GT_XXX.png``; ``--src`` may be any folder above ``CT``). DICOM slice k (file-name order) pairs with PNG k
  (file-name order), as in the challenge's evaluation code; the pairs are then ordered along the slice normal by
  ImagePositionPatient (InstanceNumber when positions are missing). HU = stored value * RescaleSlope +
  RescaleIntercept. Liver 255 -> 1. No published split (seeded split). Default window [-60, 140] HU mapped to
  [-1, 1], the LiTS default, since CHAOS-trained liver models are tested on LiTS.
- ``flare22``: the FLARE 2022 labelled training cases (``FLARE22_LabeledCase50/images/FLARE22_Tr_0001_0000.nii.gz``
  + ``labels/FLARE22_Tr_0001.nii.gz``, found anywhere under ``--src``); labels 0..13 (13 organs). Unlabelled cases
  (``Case_XXXXX_0000.nii.gz``) are not converted. Default window [-125, 275] HU mapped to [0, 1].
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from medkd.data.convert import Case
from medkd.data.download import Download, nifti_pair, read_or_fail, strip_nifti

__all__ = ["CT_READERS", "read_kits19", "read_chaos", "read_flare22", "KITS19_TEST_CASES", "FLARE22_LABELS"]

KITS19_TEST_CASES = range(210, 300)  # the challenge's test set: imaging only
KITS19_LABELS = {"0": "background", "1": "kidney", "2": "tumour"}
CHAOS_CT_LABELS = {"0": "background", "1": "liver"}
FLARE22_LABELS = {"0": "background", "1": "liver", "2": "right kidney", "3": "spleen", "4": "pancreas", "5": "aorta",
                  "6": "inferior vena cava", "7": "right adrenal gland", "8": "left adrenal gland", "9": "gallbladder",
                  "10": "esophagus", "11": "stomach", "12": "duodenum", "13": "left kidney"}


def _natural_key(path: Path) -> tuple:
    """``i0010,0000b.dcm`` after ``i0009,0000b.dcm``: digit runs compare as numbers."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", path.name))


# ---------------------------------------------------------------------------------------------------------- KiTS19


def _kits_load(image_path: Path, label_path: Path):
    """A KiTS19 case with its first (slice) axis moved last; the affine's columns follow the axes."""
    image, label, affine = nifti_pair(image_path, label_path)
    return np.moveaxis(image, 0, -1), np.moveaxis(label, 0, -1), np.asarray(affine)[:, [1, 2, 0, 3]]


def read_kits19(src: Path) -> Download:
    """The KiTS19 repository layout; ``src`` is the repository root or its ``data/`` folder."""
    data = src / "data" if any((src / "data").glob("case_*")) else src
    folders = sorted(p for p in data.glob("case_*") if p.is_dir() and re.fullmatch(r"case_\d+", p.name))
    if not folders:
        raise FileNotFoundError(f"no case_XXXXX folders in {src} or {src / 'data'} (KiTS19 layout: "
                                "data/case_00000/imaging.nii.gz + segmentation.nii.gz)")
    cases, skipped = [], 0
    for folder in folders:
        image, label = folder / "imaging.nii.gz", folder / "segmentation.nii.gz"
        if int(folder.name[5:]) in KITS19_TEST_CASES and not label.exists():
            skipped += 1
            continue
        cases.append(Case(folder.name, image, label, partial(_kits_load, image, label)))
    if skipped:
        print(f"[prepare] kits19: skipped {skipped} unlabelled test-set case(s) "
              f"(case_{KITS19_TEST_CASES[0]:05d}..case_{KITS19_TEST_CASES[-1]:05d} without segmentation.nii.gz)",
              flush=True)
    metadata = {"name": "KiTS19", "labels": KITS19_LABELS, "licence": "CC BY-NC-SA (kits19.grand-challenge.org)",
                "reference": "Heller et al., The KiTS19 challenge data, arXiv:1904.00445 (2019)"}
    return Download(cases, {0, 1, 2}, metadata, defaults={"window": (-200.0, 300.0)})


# ----------------------------------------------------------------------------------------------------------- CHAOS


def _find_ct_folder(src: Path) -> Path:
    """The ``CT`` folder at or below ``src`` (up to ``CHAOS_Train_Sets/Train_Sets/CT``)."""
    if src.name == "CT":
        return src
    found = [p for pattern in ("CT", "*/CT", "*/*/CT") for p in sorted(src.glob(pattern)) if p.is_dir()]
    if not found:
        raise FileNotFoundError(f"no CT/ folder in {src} (CHAOS layout: CHAOS_Train_Sets/Train_Sets/CT/<patient>/"
                                "DICOM_anon/*.dcm and .../Ground/*.png)")
    if len(found) > 1:
        raise ValueError(f"several CT/ folders under {src}: {[str(p) for p in found]}; point --src at one of them")
    return found[0]


def _missing_names(pngs: list[Path], expected: int) -> list[str]:
    """Names absent from a run of ``expected`` consecutively numbered PNGs (``liver_GT_000.png``, ...)."""
    numbered = [(p, re.findall(r"\d+", p.name)) for p in pngs]
    if not pngs or len(pngs) >= expected or not all(d for _, d in numbered):
        return []
    digits = numbered[0][1][-1]
    prefix, suffix = pngs[0].name.rsplit(digits, 1)
    first = min(int(d[-1]) for _, d in numbered)
    names = [f"{prefix}{n:0{len(digits)}d}{suffix}" for n in range(first, first + expected)]
    present = {p.name for p in pngs}
    return [n for n in names if n not in present]


def _chaos_patient(patient: Path) -> Case:
    dicom_dir, ground_dir = patient / "DICOM_anon", patient / "Ground"
    dicoms = sorted(dicom_dir.glob("*.dcm"), key=_natural_key)
    if not dicoms:
        raise FileNotFoundError(f"CHAOS patient folder {patient}: no .dcm files in {dicom_dir}")
    if not ground_dir.is_dir():
        raise FileNotFoundError(f"CHAOS patient folder {patient}: ground-truth folder not found: {ground_dir}")
    pngs = sorted(ground_dir.glob("*.png"), key=_natural_key)
    if len(pngs) != len(dicoms):
        missing = _missing_names(pngs, len(dicoms))
        raise ValueError(f"CHAOS patient folder {patient}: {dicom_dir} has {len(dicoms)} DICOM slices but {ground_dir} "
                         f"has {len(pngs)} PNG masks" + (f" (missing {', '.join(missing)})" if missing else ""))
    return Case(f"chaos_ct_{patient.name}", dicoms[0], pngs[0], partial(_chaos_load, dicoms, pngs))


def _dicom_slice(path: Path):
    """``(HU float32 (rows, columns), dataset)`` of one DICOM file."""
    import pydicom

    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim != 2:
        raise ValueError(f"expected one grey slice, got pixel data of shape {pixels.shape}")
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    del ds.PixelData  # only the geometry tags are kept
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32), ds


def _chaos_mask(path: Path) -> np.ndarray:
    """A CHAOS CT ground-truth PNG as 0/1; any value other than 0 and 255 is an error naming the PNG."""
    from PIL import Image

    def read(p):
        with Image.open(p) as im:
            return np.asarray(im)

    mask = read_or_fail(path, read)
    if mask.ndim != 2:
        raise ValueError(f"ground-truth PNG {path} must be single-channel, got shape {mask.shape}")
    bad = sorted(set(np.unique(mask).tolist()) - {0, 255})
    if bad:
        raise ValueError(f"ground-truth PNG {path} has values {bad[:10]}; CHAOS CT liver masks hold only 0 and 255")
    return (mask == 255).astype(np.uint8)


def _slice_order(datasets: list) -> list[int]:
    """Order of the slices along the slice normal (ImagePositionPatient), else by InstanceNumber, else as given."""
    n = len(datasets)
    if all(ds.get("ImagePositionPatient") is not None and ds.get("ImageOrientationPatient") is not None
           for ds in datasets):
        iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        keys = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64))) for ds in datasets]
    elif all(ds.get("InstanceNumber") is not None for ds in datasets):
        keys = [float(ds.InstanceNumber) for ds in datasets]
    else:
        return list(range(n))
    order = sorted(range(n), key=lambda i: keys[i])
    if len(set(keys)) != n:
        raise ValueError("two DICOM slices share the same position/instance number "
                         f"({sorted(k for k in set(keys) if keys.count(k) > 1)[:5]}); cannot order the series")
    return order


def _dicom_affine(datasets: list) -> np.ndarray:
    """Voxel (row, column, slice) -> RAS mm affine of slices already ordered along their normal."""
    first = datasets[0]
    iop = first.get("ImageOrientationPatient")
    iop = np.asarray(iop if iop is not None else [1, 0, 0, 0, 1, 0], dtype=np.float64)
    spacing = np.asarray(first.get("PixelSpacing") or [1.0, 1.0], dtype=np.float64)
    positions = [ds.get("ImagePositionPatient") for ds in datasets]
    if all(p is not None for p in positions):
        positions = np.asarray(positions, dtype=np.float64)
    else:
        positions = None
    normal = np.cross(iop[:3], iop[3:])
    if positions is not None and len(datasets) > 1:
        step = (positions[-1] - positions[0]) / (len(datasets) - 1)
    else:
        step = normal * float(first.get("SliceThickness") or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = iop[3:] * spacing[0]  # down the rows (row index)
    lps[:3, 1] = iop[:3] * spacing[1]  # along a row (column index)
    lps[:3, 2] = step
    lps[:3, 3] = positions[0] if positions is not None else 0.0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS -> NIfTI RAS


def _chaos_load(dicoms: list[Path], pngs: list[Path]):
    """One CHAOS CT patient: DICOM k pairs with PNG k (file-name order), then the pairs are ordered in space."""
    slices, datasets, masks = [], [], []
    for dicom, png in zip(dicoms, pngs):
        hu, ds = read_or_fail(dicom, _dicom_slice)
        if slices and hu.shape != slices[0].shape:
            raise ValueError(f"DICOM slice {dicom} has shape {hu.shape} but {dicoms[0]} has {slices[0].shape}")
        mask = _chaos_mask(png)
        if mask.shape != hu.shape:
            raise ValueError(f"ground-truth PNG {png} has shape {mask.shape} but its DICOM slice {dicom} has "
                             f"shape {hu.shape}")
        slices.append(hu)
        datasets.append(ds)
        masks.append(mask)
    try:
        order = _slice_order(datasets)
    except ValueError as e:
        raise ValueError(f"{dicoms[0].parent}: {e}") from e
    datasets = [datasets[i] for i in order]
    image = np.stack([slices[i] for i in order], -1)
    label = np.stack([masks[i] for i in order], -1)
    return image, label, _dicom_affine(datasets)


def read_chaos(src: Path) -> Download:
    """The CT part of the CHAOS training set; ``src`` is the ``CT`` folder or any folder up to two levels above."""
    ct = _find_ct_folder(src)
    patients = sorted((p for p in ct.iterdir() if (p / "DICOM_anon").is_dir()), key=_natural_key)
    if not patients:
        raise FileNotFoundError(f"no <patient>/DICOM_anon folders in {ct} (CHAOS CT layout)")
    if not any((p / "Ground").is_dir() for p in patients):
        raise FileNotFoundError(f"no patient in {ct} has a Ground/ folder: this looks like the CHAOS test set, "
                                "which has no labels; use CHAOS_Train_Sets")
    cases = [_chaos_patient(p) for p in patients]
    metadata = {"name": "CHAOS CT (liver)", "labels": CHAOS_CT_LABELS,
                "reference": "Kavur et al., CHAOS challenge - combined (CT-MR) healthy abdominal organ segmentation, "
                             "MedIA 69 (2021) 101950"}
    return Download(cases, {0, 1}, metadata, defaults={"window": (-60.0, 140.0)})


# --------------------------------------------------------------------------------------------------------- FLARE22


def read_flare22(src: Path) -> Download:
    """FLARE22 labelled cases: ``images/FLARE22_Tr_XXXX_0000.nii.gz`` with ``labels/FLARE22_Tr_XXXX.nii.gz``."""
    images = sorted(src.rglob("FLARE22_Tr_*_0000.nii.gz"))
    if not images:
        raise FileNotFoundError(f"no FLARE22_Tr_XXXX_0000.nii.gz images under {src} (FLARE22 layout: "
                                "FLARE22_LabeledCase50/images/FLARE22_Tr_0001_0000.nii.gz + labels/FLARE22_Tr_0001.nii.gz)")
    cases = []
    for image in images:
        case_id = strip_nifti(image.name)[: -len("_0000")]
        label = image.parent.parent / "labels" / f"{case_id}.nii.gz"
        cases.append(Case(case_id, image, label, partial(nifti_pair, image, label)))
    unlabelled = sum(1 for _ in src.rglob("Case_*_0000.nii.gz"))
    if unlabelled:
        print(f"[prepare] flare22: {unlabelled} unlabelled case(s) (Case_XXXXX_0000.nii.gz) are not converted",
              flush=True)
    metadata = {"name": "FLARE22 (labelled training cases)", "labels": FLARE22_LABELS,
                "reference": "MICCAI FLARE 2022 challenge, flare22.grand-challenge.org"}
    return Download(cases, set(range(14)), metadata, defaults={"window": (-125.0, 275.0), "out_range": (0.0, 1.0)})


CT_READERS: dict[str, Callable[[Path], Download]] = {"kits19": read_kits19, "chaos": read_chaos,
                                                     "flare22": read_flare22}
