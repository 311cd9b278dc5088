"""Readers of 2D image downloads in their released layout: ``busi``, ``cvc_clinicdb``, ``chasedb1``, ``drive``,
``stare``, ``m2caiseg``.

Every image is a natively 2D 8-bit photograph: a reader's :class:`~medkd.data.convert.Case` loads it as ``uint8``
(grey ``(H, W)`` or RGB ``(H, W, 3)``, the same for the whole dataset and recorded in the datalist's
``"channels"``) with a 2D label, and the framework writes both as PNG. Photos without foreground are kept by
default (``slices="all"``).

Binary masks may be stored as 0/255 or 0/1 and are mapped to {0, 1}; any other value is an error naming the mask
file, unless the reader option ``mask_threshold=T`` is given (then value >= T -> 1, for masks with anti-aliased
edges). Colour-coded masks (m2caiSeg) are mapped to class indices through the dataset's colour table; an unknown
colour is an error naming the file unless ``colour_tolerance`` allows snapping it to the nearest class colour.

A reader accepts ``src`` at the download's top folder, one or two folder levels above it (e.g. the folder an archive
was extracted into), or one level inside it.
"""

from __future__ import annotations

import gzip
import io
import re
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from medkd.data.convert import Case
from medkd.data.download import Download, read_or_fail

__all__ = ["IMAGE_READERS", "read_busi", "read_cvc_clinicdb", "read_chasedb1", "read_drive", "read_stare",
           "read_m2caiseg", "binary_mask", "colour_classes", "M2CAISEG_CLASSES"]

PHOTO_DEFAULTS = {"slices": "all"}
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


# --------------------------------------------------------------------------------------------------- file helpers
def _natural_key(name: str):
    """``"benign (10)"`` sorts after ``"benign (2)"``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _sorted(paths: Iterable[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: _natural_key(p.name))


def _safe_id(text: str) -> str:
    """A case id usable as a file name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _decode(path: Path, mode: str) -> np.ndarray:
    """The image at ``path`` (``.gz`` compressed or not) converted by PIL to ``mode`` ("L" or "RGB"), uint8."""
    from PIL import Image

    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.decompress(data)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert(mode), dtype=np.uint8)


def read_photo(path: Path, channels: int) -> np.ndarray:
    """A photograph as uint8: grey ``(H, W)`` (PIL "L": ITU-R 601-2 luma, the stored value when the channels are
    equal) for ``channels=1``, RGB ``(H, W, 3)`` for ``channels=3``. Errors name ``path``."""
    return read_or_fail(path, partial(_decode, mode="L" if channels == 1 else "RGB"))


def binary_mask(path: Path, threshold: int | None = None) -> np.ndarray:
    """A binary mask in {0, 1} (uint8) from a file holding 0/255 or 0/1 (colour files are read as grey).

    With ``threshold``, every value >= threshold is foreground (anti-aliased masks); without it, any value other than
    0/255 (or 0/1) raises a ValueError naming ``path``.
    """
    values = read_or_fail(path, partial(_decode, mode="L"))
    if threshold is not None:
        return (values >= threshold).astype(np.uint8)
    present = set(np.unique(values).tolist())
    if present <= {0, 255}:
        return (values == 255).astype(np.uint8)
    if present <= {0, 1}:
        return values.astype(np.uint8)
    raise ValueError(f"{path} has values {sorted(present)[:10]}; a binary mask holds 0/255 (or 0/1). For masks with "
                     "anti-aliased edges pass mask_threshold=<int> (value >= threshold -> 1)")


def _check_threshold(mask_threshold) -> int | None:
    if mask_threshold is None:
        return None
    if isinstance(mask_threshold, bool) or int(mask_threshold) != mask_threshold or not 1 <= mask_threshold <= 255:
        raise ValueError(f"mask_threshold must be an integer in 1..255, got {mask_threshold!r}")
    return int(mask_threshold)


def _check_annotator(annotator, choices: tuple[str, ...], dataset: str) -> str:
    if annotator not in choices:
        raise ValueError(f"{dataset}: annotator must be one of {list(choices)}, got {annotator!r}")
    return annotator


def _locate(src: Path, is_root: Callable[[Path], bool], what: str,
            prefer: Callable[[Path], bool] | None = None) -> Path:
    """The download's top folder: ``src`` itself, a folder one or two levels below it, or its parent.

    Several matches at the same level are narrowed by ``prefer``; if that leaves not exactly one, it is an error.
    """
    def dirs(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir())

    children = dirs(src)
    levels = [[src], children, [g for c in children for g in dirs(c)], [src.parent]]
    for level in levels:
        found = [p for p in level if is_root(p)]
        if len(found) > 1 and prefer is not None:
            found = [p for p in found if prefer(p)] or found
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"several {what} found under {src}: {[str(p) for p in found]}; pass the one to convert "
                             "as --src")
    raise FileNotFoundError(f"no {what} found at {src}, in the two folder levels below it or in its parent")


def _has_file(folder: Path, pattern: re.Pattern) -> bool:
    return folder.is_dir() and any(pattern.match(p.name) for p in folder.iterdir())


def _photo_with_mask(image_path: Path, label_path: Path, channels: int, threshold: int | None):
    return read_photo(image_path, channels), binary_mask(label_path, threshold), np.eye(4)


def _binary_metadata(name: str, foreground: str, channels: int, modality: str, reference: str, **extra) -> dict:
    return {"name": name, "labels": {"0": "background", "1": foreground}, "channels": channels,
            "modality": modality, "reference": reference, **extra}


# ------------------------------------------------------------------------------------------------------------ BUSI
BUSI_CLASSES = ("benign", "malignant", "normal")


def _busi_load(image_path: Path, mask_paths: list[Path], threshold: int | None):
    """Grey image and the union of its masks (``_mask.png`` plus any ``_mask_N.png``)."""
    image = read_photo(image_path, 1)
    label = binary_mask(mask_paths[0], threshold)
    for extra in mask_paths[1:]:
        more = binary_mask(extra, threshold)
        if more.shape != label.shape:
            raise ValueError(f"mask {extra} has shape {more.shape} but {mask_paths[0]} has shape {label.shape}")
        label = np.maximum(label, more)
    return image, label, np.eye(4)


def _busi_id(cls: str, stem: str) -> str:
    match = re.fullmatch(rf"{cls} \((\d+)\)", stem)
    return f"{cls}_{int(match.group(1)):03d}" if match else _safe_id(stem)


def read_busi(src: Path, mask_threshold: int | None = None) -> Download:
    """BUSI (``Dataset_BUSI_with_GT/{benign,malignant,normal}/benign (1).png`` with ``benign (1)_mask.png`` and
    possibly ``benign (1)_mask_1.png``...; the masks of an image are united). Grey images; no published split."""
    threshold = _check_threshold(mask_threshold)
    root = _locate(src, lambda p: all((p / c).is_dir() for c in BUSI_CLASSES),
                   "BUSI folder with benign/, malignant/ and normal/ (Dataset_BUSI_with_GT)")
    cases = []
    for cls in BUSI_CLASSES:
        files = _sorted(p for p in (root / cls).iterdir() if p.is_file() and p.suffix.lower() == ".png")
        images = [p for p in files if "_mask" not in p.stem]
        masks = [p for p in files if "_mask" in p.stem]
        stems = {p.stem for p in images}
        for mask in masks:
            base = mask.stem.split("_mask")[0]
            if base not in stems:
                raise FileNotFoundError(f"BUSI mask {mask} has no image {mask.with_name(base + '.png')}")
        for image in images:
            main = image.with_name(f"{image.stem}_mask.png")
            extra = [m for m in masks if m.stem.startswith(f"{image.stem}_mask_")]
            cases.append(Case(_busi_id(cls, image.stem), image, main,
                              partial(_busi_load, image, [main, *extra], threshold), {"class": cls}))
    metadata = _binary_metadata(
        "BUSI", "lesion", 1, "breast ultrasound",
        "Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. Data in Brief 28 (2020) "
        "104863", classes=list(BUSI_CLASSES))
    return Download(cases, {0, 1}, metadata, defaults=PHOTO_DEFAULTS)


# ---------------------------------------------------------------------------------------------------- CVC-ClinicDB
def read_cvc_clinicdb(src: Path, mask_threshold: int | None = None) -> Download:
    """CVC-ClinicDB: ``Original/1.tif`` with ``Ground Truth/1.tif`` (612 RGB frames), or the PNG variant
    (``PNG/Original/1.png``, ``PNG/Ground Truth/1.png``). Where both are present the TIFF release is used."""
    threshold = _check_threshold(mask_threshold)

    def is_root(p: Path) -> bool:
        return (p / "Original").is_dir() and (p / "Ground Truth").is_dir()

    def tif_release(p: Path) -> bool:
        return any(f.suffix.lower() in (".tif", ".tiff") for f in (p / "Original").iterdir())

    root = _locate(src, is_root, "CVC-ClinicDB folder with Original/ and Ground Truth/", prefer=tif_release)
    images = _sorted(p for p in (root / "Original").iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    names = {p.name for p in images}
    for mask in (root / "Ground Truth").iterdir():
        if mask.is_file() and mask.suffix.lower() in IMAGE_SUFFIXES and mask.name not in names:
            raise FileNotFoundError(f"CVC-ClinicDB mask {mask} has no image {root / 'Original' / mask.name}")
    cases = []
    for image in images:
        label = root / "Ground Truth" / image.name
        case_id = f"{int(image.stem):03d}" if image.stem.isdigit() else _safe_id(image.stem)
        cases.append(Case(case_id, image, label, partial(_photo_with_mask, image, label, 3, threshold)))
    metadata = _binary_metadata(
        "CVC-ClinicDB", "polyp", 3, "colonoscopy",
        "Bernal J et al. WM-DOVA maps for accurate polyp highlighting in colonoscopy: validation vs. saliency maps "
        "from physicians. Computerized Medical Imaging and Graphics 43 (2015) 99-111")
    return Download(cases, {0, 1}, metadata, defaults=PHOTO_DEFAULTS)


# -------------------------------------------------------------------------------------------------------- CHASE_DB1
CHASE_IMAGE = re.compile(r"^Image_(\d{2})([LR])\.jpg$", re.IGNORECASE)


def read_chasedb1(src: Path, annotator: str = "1st", mask_threshold: int | None = None) -> Download:
    """CHASE_DB1: ``Image_01L.jpg`` with ``Image_01L_1stHO.png`` / ``Image_01L_2ndHO.png`` (28 RGB images).
    Standard split: images 01L..10R (the first 20) training, 11L..14R (the last 8) test."""
    annotator = _check_annotator(annotator, ("1st", "2nd"), "chasedb1")
    threshold = _check_threshold(mask_threshold)
    root = _locate(src, lambda p: _has_file(p, CHASE_IMAGE), "CHASE_DB1 folder with Image_01L.jpg ...")
    cases, split = [], {}
    for image in _sorted(p for p in root.iterdir() if p.is_file() and CHASE_IMAGE.match(p.name)):
        label = image.with_name(f"{image.stem}_{annotator}HO.png")
        cases.append(Case(image.stem, image, label, partial(_photo_with_mask, image, label, 3, threshold)))
        split[image.stem] = "training" if int(CHASE_IMAGE.match(image.name).group(1)) <= 10 else "test"
    metadata = _binary_metadata(
        "CHASE_DB1", "vessel", 3, "fundus photograph",
        "Fraz MM et al. An ensemble classification-based approach applied to retinal blood vessel segmentation. "
        "IEEE Transactions on Biomedical Engineering 59(9) (2012) 2538-2548", annotator=annotator)
    return Download(cases, {0, 1}, metadata, standard_split=split, defaults=PHOTO_DEFAULTS)


# ------------------------------------------------------------------------------------------------------------ DRIVE
def read_drive(src: Path, annotator: str = "1st", mask_threshold: int | None = None) -> Download:
    """DRIVE: ``training/images/21_training.tif`` with ``training/1st_manual/21_manual1.gif`` and
    ``test/images/01_test.tif`` with ``test/1st_manual/01_manual1.gif`` / ``test/2nd_manual/01_manual2.gif``
    (RGB). Standard split: training 21-40, test 01-20.

    ``annotator="2nd"`` exists for the test images only: it converts the 20 test images, all in the test split.
    A release without test annotations (the grand-challenge download) gives the training images with a seeded
    split. The field-of-view masks (``mask/*.gif``) are not converted.
    """
    annotator = _check_annotator(annotator, ("1st", "2nd"), "drive")
    threshold = _check_threshold(mask_threshold)
    root = _locate(src, lambda p: (p / "training" / "images").is_dir(),
                   "DRIVE folder with training/images/ (and test/images/)")
    test_dir = next((root / name for name in ("test", "testing") if (root / name / "images").is_dir()), None)

    def cases_of(folder: Path, kind: str, number: int) -> list[Case]:
        out = []
        for image in _sorted((folder / "images").glob(f"*_{kind}.tif*")):
            manual = folder / ("1st_manual" if number == 1 else "2nd_manual")
            label = manual / f"{image.stem.split('_')[0]}_manual{number}.gif"
            out.append(Case(image.stem, image, label, partial(_photo_with_mask, image, label, 3, threshold)))
        return out

    metadata = _binary_metadata(
        "DRIVE", "vessel", 3, "fundus photograph",
        "Staal J et al. Ridge-based vessel segmentation in color images of the retina. IEEE Transactions on Medical "
        "Imaging 23(4) (2004) 501-509", annotator=annotator)
    if annotator == "2nd":
        if test_dir is None or not (test_dir / "2nd_manual").is_dir():
            raise FileNotFoundError(f"DRIVE download {root} has no test/2nd_manual/ folder: the second observer "
                                    "annotated the test images only, and the grand-challenge release omits them")
        cases = cases_of(test_dir, "test", 2)
        return Download(cases, {0, 1}, metadata, standard_split={c.case_id: "test" for c in cases},
                        defaults=PHOTO_DEFAULTS)
    cases = cases_of(root / "training", "training", 1)
    split = {c.case_id: "training" for c in cases}
    if test_dir is not None and (test_dir / "1st_manual").is_dir():
        test = cases_of(test_dir, "test", 1)
        cases += test
        split.update({c.case_id: "test" for c in test})
        return Download(cases, {0, 1}, {**metadata, "test_annotations": True}, standard_split=split,
                        defaults=PHOTO_DEFAULTS)
    print(f"[prepare] drive: {root} has no test/1st_manual/ (the grand-challenge release withholds the test "
          "annotations); converting the training images with a seeded split", flush=True)
    return Download(cases, {0, 1}, {**metadata, "test_annotations": False}, defaults=PHOTO_DEFAULTS)


# ------------------------------------------------------------------------------------------------------------ STARE
STARE_IMAGE = re.compile(r"^(im\d{4})\.ppm(\.gz)?$", re.IGNORECASE)
STARE_LABEL = re.compile(r"^(im\d{4})\.(ah|vk)\.ppm(\.gz)?$", re.IGNORECASE)
# The 20 images with vessel labels (both annotators) in the release.
STARE_LABELLED = ("im0001", "im0002", "im0003", "im0004", "im0005", "im0044", "im0077", "im0081", "im0082", "im0139",
                  "im0162", "im0163", "im0235", "im0236", "im0239", "im0240", "im0255", "im0291", "im0319", "im0324")


def _first(paths: list[Path]) -> Path:
    """Of several copies, the uncompressed one, then the shortest path."""
    return min(paths, key=lambda p: (p.name.lower().endswith(".gz"), len(p.parts), str(p)))


def read_stare(src: Path, annotator: str = "ah", mask_threshold: int | None = None) -> Download:
    """STARE: ``stare-images/im0001.ppm(.gz)`` with ``labels-ah/im0001.ah.ppm(.gz)`` or
    ``labels-vk/im0001.vk.ppm(.gz)``, found anywhere under ``src``. The images that have a label of the chosen
    annotator are converted (the 20 of :data:`STARE_LABELLED` in the release); an image of that list whose label is
    missing is an error. RGB; no split in the release."""
    annotator = _check_annotator(annotator, ("ah", "vk"), "stare")
    threshold = _check_threshold(mask_threshold)
    images: dict[str, list[Path]] = {}
    labels: dict[str, list[Path]] = {}
    for path in src.rglob("*"):
        if not path.is_file():
            continue
        if match := STARE_IMAGE.match(path.name):
            images.setdefault(match.group(1).lower(), []).append(path)
        elif (match := STARE_LABEL.match(path.name)) and match.group(2).lower() == annotator:
            labels.setdefault(match.group(1).lower(), []).append(path)
    if not labels:
        raise FileNotFoundError(f"no STARE labels of annotator {annotator!r} (im0001.{annotator}.ppm or "
                                f".ppm.gz, e.g. in labels-{annotator}/) found under {src}")
    label_dir = _first([p for paths in labels.values() for p in paths]).parent
    cases = []
    for key in sorted(set(labels) | (set(images) & set(STARE_LABELLED))):
        # a missing file gets its expected path, which the conversion's missing-file error names
        image = _first(images[key]) if key in images else None
        if key in labels:
            label = _first(labels[key])
        else:  # a labelled image of the release without its label
            label = label_dir / image.name.replace(".ppm", f".{annotator}.ppm")
        if image is None:
            image = label.parent.parent / "stare-images" / label.name.replace(f".{annotator}.", ".")
        cases.append(Case(key, image, label, partial(_photo_with_mask, image, label, 3, threshold)))
    metadata = _binary_metadata(
        "STARE", "vessel", 3, "fundus photograph",
        "Hoover A, Kouznetsova V, Goldbaum M. Locating blood vessels in retinal images by piecewise threshold "
        "probing of a matched filter response. IEEE Transactions on Medical Imaging 19(3) (2000) 203-210",
        annotator=annotator)
    return Download(cases, {0, 1}, metadata, defaults=PHOTO_DEFAULTS)


# --------------------------------------------------------------------------------------------------------- m2caiSeg
# (index, name, RGB colours). Indices 1..17 are those of the authors' class file (miccaiSegClasses.json in
# salmanmaq/segmentationNetworks); black (outside the endoscope's view, their 18) and unknown (their 0) are swapped
# so that 0 is the background. The class file gives artery the liver's colour (a typo): its organ class file and
# other loaders use (170, 0, 255). Hook is (0, 170, 85) in the class file and (0, 170, 255) in torch_em's loader;
# both map to hook.
M2CAISEG_CLASSES: list[tuple[int, str, tuple[tuple[int, int, int], ...]]] = [
    (0, "black (outside the view)", ((0, 0, 0),)),
    (1, "grasper", ((0, 85, 170),)),
    (2, "bipolar", ((0, 85, 255),)),
    (3, "hook", ((0, 170, 85), (0, 170, 255))),
    (4, "scissors", ((0, 255, 85),)),
    (5, "clipper", ((0, 255, 170),)),
    (6, "irrigator", ((85, 0, 170),)),
    (7, "specimen bag", ((85, 0, 255),)),
    (8, "trocars", ((170, 85, 85),)),
    (9, "clip", ((170, 170, 170),)),
    (10, "liver", ((85, 170, 0),)),
    (11, "gall bladder", ((85, 170, 255),)),
    (12, "fat", ((85, 255, 0),)),
    (13, "upper wall", ((85, 255, 170),)),
    (14, "artery", ((170, 0, 255),)),
    (15, "intestine", ((255, 0, 255),)),
    (16, "bile", ((255, 255, 0),)),
    (17, "blood", ((255, 0, 0),)),
    (18, "unknown", ((170, 0, 85),)),
]


def colour_classes(path: Path, table: list[tuple[int, str, tuple]], tolerance: float = 0.0) -> np.ndarray:
    """Class indices (uint8 ``(H, W)``) of a colour-coded RGB mask.

    Every colour goes to the class of the nearest table colour (Euclidean RGB distance) if that distance is at most
    ``tolerance``; other colours raise a ValueError naming ``path`` and the most frequent offending colours.
    """
    rgb = read_or_fail(path, partial(_decode, mode="RGB")).astype(np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    present = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1)
    ref = np.array([c for _, _, cs in table for c in cs], dtype=np.int64)
    ids = np.array([i for i, _, cs in table for _ in cs], dtype=np.uint8)
    distance = np.sqrt(((present[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    nearest = distance.argmin(axis=1)
    bad = np.flatnonzero(distance[np.arange(len(colours)), nearest] > tolerance)
    if bad.size:
        worst = bad[np.argsort(-counts[bad])][:5]
        listed = ", ".join(f"{tuple(int(v) for v in present[k])}: {int(counts[k])} px" for k in worst)
        raise ValueError(f"{path} has colours that are not in the class table ({bad.size} colours; {listed}). For "
                         "masks with blended edges pass colour_tolerance=<RGB distance> to map colours to the "
                         "nearest class colour within that distance")
    return ids[nearest][inverse].reshape(packed.shape)


def _m2caiseg_load(image_path: Path, label_path: Path, tolerance: float):
    return read_photo(image_path, 3), colour_classes(label_path, M2CAISEG_CLASSES, tolerance), np.eye(4)


def read_m2caiseg(src: Path, colour_tolerance: float = 0.0) -> Download:
    """m2caiSeg (Kaggle ``salmanmaq/m2caiseg``): ``m2caiSeg dataset/{train,trainval,test}/images/<n>.jpg`` with
    ``groundtruth/<n>_gt.png`` colour-coded masks (19 classes). RGB. Standard split from the release's folders:
    ``train/`` and the validation images of ``trainval/`` (those not in ``train/``) training, ``test/`` test."""
    if isinstance(colour_tolerance, bool) or not 0 <= float(colour_tolerance) <= 442:
        raise ValueError(f"colour_tolerance must be an RGB distance in 0..442, got {colour_tolerance!r}")
    tolerance = float(colour_tolerance)

    def is_root(p: Path) -> bool:
        return all((p / s / "images").is_dir() and (p / s / "groundtruth").is_dir() for s in ("train", "test"))

    root = _locate(src, is_root, "m2caiSeg folder with train/ and test/ (images/ and groundtruth/ in each)")
    train_names = {p.name for p in (root / "train" / "images").iterdir()}
    cases, split = [], {}
    for folder, release in (("train", "train"), ("trainval", "val"), ("test", "test")):
        if not (root / folder / "images").is_dir():
            continue
        images = _sorted(p for p in (root / folder / "images").iterdir()
                         if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for image in images:
            if folder == "trainval" and image.name in train_names:
                continue
            label = root / folder / "groundtruth" / f"{image.stem}_gt.png"
            if not label.is_file() and (root / folder / "groundtruth" / f"{image.stem}.png").is_file():
                label = root / folder / "groundtruth" / f"{image.stem}.png"
            case_id = f"{release}_{_safe_id(image.stem)}"
            cases.append(Case(case_id, image, label, partial(_m2caiseg_load, image, label, tolerance),
                              {"release_split": release}))
            split[case_id] = "test" if release == "test" else "training"
    metadata = {
        "name": "m2caiSeg", "labels": {str(i): name for i, name, _ in M2CAISEG_CLASSES},
        "colours": {str(i): [list(c) for c in cs] for i, _, cs in M2CAISEG_CLASSES}, "channels": 3,
        "modality": "laparoscopy",
        "reference": "Maqbool S, Riaz A, Sajid H, Hasan O. m2caiSeg: Semantic segmentation of laparoscopic images "
                     "using convolutional neural networks. arXiv:2008.10134 (2020)",
    }
    return Download(cases, set(range(len(M2CAISEG_CLASSES))), metadata, standard_split=split,
                    defaults=PHOTO_DEFAULTS)


IMAGE_READERS: dict[str, Callable[..., Download]] = {
    "busi": read_busi, "cvc_clinicdb": read_cvc_clinicdb, "chasedb1": read_chasedb1, "drive": read_drive,
    "stare": read_stare, "m2caiseg": read_m2caiseg,
}
