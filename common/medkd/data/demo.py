"""The embedded demo dataset: brain tissue segmentation on pseudo-subjects made from the MNI152 template.

Every pseudo-subject is the MNI ICBM152 2009a (symmetric, non-linear) T1 template that ships inside the
``nilearn`` package, resampled through a random affine transform plus a smooth elastic deformation, multiplied
by a smooth bias field and corrupted with Gaussian noise. Its label map is derived from the template's grey- and
white-matter probability maps, warped with the same transform: 0 background (everything that is neither, CSF
included), 1 grey matter, 2 white matter.

Nothing is downloaded: the three template files are read from the installed ``nilearn`` package (without
importing it). Output is NIfTI plus an MSD-style datalist; the same arguments give byte-identical files.

A **domain-shifted** copy (``shift``, :class:`DomainShift`) keeps the anatomy, labels and splits of the same seed and
changes only the appearance: a stronger bias field, another tissue contrast and Rician instead of Gaussian noise, a
second "scanner" for cross-domain evaluation (train on the clean data, test on both).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medkd.io import atomic_write_bytes

__all__ = ["DemoConfig", "DomainShift", "LABELS", "SHIFT_PRESETS", "prepare_demo", "template_paths"]

LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Field of view (mm) of every pseudo-subject, centred on the template's brain; each side is rounded up to a
# multiple of 16 voxels so that networks with four stride-2 stages accept the images unpadded.
FIELD_OF_VIEW_MM = (184.0, 216.0, 176.0)
BRAIN_CENTRE_MM = (0.0, -18.0, 8.0)


@dataclass(frozen=True)
class DemoConfig:
    """Strength of the per-subject variations (all drawn independently per subject).

    The defaults were tuned so that the demo's teacher (MONAI UNet, a few minutes on 2 CPU cores) reaches a mean
    foreground Dice above 0.8 on the test split while the task stays far from trivial for a 40k-parameter student.
    """

    spacing: float = 2.0  # output voxel size in mm (isotropic)
    rotation_deg: float = 8.0  # max absolute rotation about each axis
    scale: float = 0.08  # max relative scaling per axis
    shift_mm: float = 6.0  # max translation per axis
    elastic_mm: float = 2.5  # std of the elastic displacement at the control points
    elastic_grid_mm: float = 32.0  # spacing of the elastic control points
    bias: float = 0.15  # std of the log bias field at its control points
    bias_grid_mm: float = 64.0  # spacing of the bias-field control points
    contrast: float = 0.08  # std of a global gamma jitter (log scale)
    noise: float = 0.03  # std of additive Gaussian noise, relative to the white-matter intensity
    min_brain_fraction: float = 0.15  # 2D: keep axial slices whose brain share of the FOV is at least this


#: Named shift strengths for ``prepare_demo(shift=...)`` / ``python -m medkd prepare demo --shift NAME``.
SHIFT_PRESETS = {"none": 0.0, "mild": 0.5, "strong": 1.0}


@dataclass(frozen=True)
class DomainShift:
    """The appearance of a domain-shifted demo dataset ("another scanner"), at a strength ``s >= 0``.

    Anatomy, labels, subject split and slice choice are those of the clean data of the same seed (the random draws
    that make them are unchanged); per subject only the appearance changes, relative to :class:`DemoConfig`:

    - **bias field**: the log bias field (same smooth random pattern) is ``bias_gain = 1 + s`` times stronger
      (std 0.15 -> 0.30 at ``s = 1``);
    - **tissue contrast**: an intensity-transfer curve ``I -> I ** tissue_gamma``, ``tissue_gamma = 1 / (1 + s / 2)``
      (applied with the subject's own gamma jitter, before the bias field) lifts the darker tissues towards white
      matter: the grey/white-matter intensity ratio goes from about 0.79 to about 0.85 at ``s = 1``, and its
      inverse cannot be undone by the per-image intensity normalisation of the bundles;
    - **noise**: Rician (the magnitude of a complex signal with Gaussian noise in both channels) with ``noise_gain =
      1 + s`` times the clean Gaussian std (0.03 -> 0.06 at ``s = 1``), so the background is no longer zero-mean.

    ``s = 0`` is the clean data. Presets: :data:`SHIFT_PRESETS` (``mild`` 0.5, ``strong`` 1.0).
    """

    strength: float

    def __post_init__(self) -> None:
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"the shift strength must be a finite number >= 0, got {s!r}")

    @classmethod
    def parse(cls, shift: str | float | None) -> DomainShift | None:
        """``None``, a preset name (:data:`SHIFT_PRESETS`) or a strength; None when there is no shift."""
        if shift is None:
            return None
        if isinstance(shift, str):
            name = shift.strip().lower()
            if name not in SHIFT_PRESETS:
                try:
                    strength = float(name)
                except ValueError:
                    raise ValueError(
                        f"unknown demo shift {shift!r}; use one of {sorted(SHIFT_PRESETS)} or a strength >= 0"
                    ) from None
            else:
                strength = SHIFT_PRESETS[name]
        else:
            strength = shift
        out = cls(strength)
        return out if out.strength > 0 else None

    @property
    def bias_gain(self) -> float:
        return 1.0 + self.strength

    @property
    def tissue_gamma(self) -> float:
        return 1.0 / (1.0 + 0.5 * self.strength)

    @property
    def noise_gain(self) -> float:
        return 1.0 + self.strength

    def describe(self, cfg: DemoConfig) -> dict:
        """The shifted parameters as written to the datalist's ``generator``."""
        return {
            "strength": float(self.strength),
            "bias": cfg.bias * self.bias_gain,
            "tissue_gamma": self.tissue_gamma,
            "noise": cfg.noise * self.noise_gain,
            "noise_type": "rician",
        }


def template_paths() -> dict[str, Path]:
    """Paths of the MNI152 template files inside the installed ``nilearn`` package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo dataset needs the 'nilearn' package (pip install nilearn)")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = {key: data_dir / name for key, name in TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNI152 template files missing from the nilearn package: {missing}")
    return paths


def _load_template(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1 (scaled so that white matter is about 1), GM and WM probabilities, and the voxel-to-mm affine.

    The T1 is low-pass filtered for the output spacing once (anti-aliasing), so that every subject only needs
    linear interpolation.
    """
    paths = template_paths()
    imgs = {k: nib.load(str(p)) for k, p in paths.items()}
    affine = imgs["t1"].affine
    t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32)
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
    t1 /= float(np.median(t1[wm > 0.9]))
    sigma = max(0.0, 0.4 * (spacing / float(np.abs(affine[0, 0])) - 1.0))
    if sigma > 0:
        t1 = ndimage.gaussian_filter(t1, sigma)
    return t1, gm, wm, affine


def _output_grid(spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and voxel-to-mm affine of the output volume."""
    shape = tuple(int(16 * math.ceil(fov / spacing / 16)) for fov in FIELD_OF_VIEW_MM)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(BRAIN_CENTRE_MM) - spacing * (np.asarray(shape) - 1) / 2.0
    return shape, affine  # type: ignore[return-value]


def _smooth_field(rng: np.random.Generator, shape, spacing: float, grid_mm: float, std: float, n: int):
    """``n`` smooth random fields on ``shape``: Gaussian control points every ``grid_mm``, cubic upsampling."""
    coarse = [max(2, int(round(s * spacing / grid_mm)) + 1) for s in shape]
    fields = rng.normal(0.0, std, size=(n, *coarse)).astype(np.float64)
    zoom = [s / c for s, c in zip(shape, coarse)]
    return np.stack([ndimage.zoom(f, zoom, order=3, mode="nearest", grid_mode=True)[tuple(slice(0, s) for s in shape)] for f in fields])


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    rx, ry, rz = angles_rad
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def make_subject(
    rng: np.random.Generator, template, cfg: DemoConfig, domain_shift: DomainShift | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pseudo-subject: (image float32, label uint8, voxel-to-mm affine) on the output grid.

    ``domain_shift`` changes the appearance only (:class:`DomainShift`); the draws that make the anatomy come first
    and are the same, so the label is the same for the same ``rng`` state.
    """
    t1, gm, wm, t_affine = template
    shape, o_affine = _output_grid(cfg.spacing)
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    world = np.tensordot(o_affine[:3, :3], idx, axes=1) + o_affine[:3, 3, None, None, None]

    centre = np.asarray(BRAIN_CENTRE_MM)[:, None, None, None]
    rot = _rotation(np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3)))
    scale = 1.0 + rng.uniform(-cfg.scale, cfg.scale, 3)
    shift = rng.uniform(-cfg.shift_mm, cfg.shift_mm, 3)
    linear = rot @ np.diag(scale)
    moved = np.tensordot(linear, world - centre, axes=1) + centre + shift[:, None, None, None]
    moved += _smooth_field(rng, shape, cfg.spacing, cfg.elastic_grid_mm, cfg.elastic_mm, 3)

    to_voxel = np.linalg.inv(t_affine)
    coords = np.tensordot(to_voxel[:3, :3], moved, axes=1) + to_voxel[:3, 3, None, None, None]
    sample = lambda vol: ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0)  # noqa: E731
    image, p_gm, p_wm = sample(t1), sample(gm), sample(wm)

    bias_std = cfg.bias if domain_shift is None else cfg.bias * domain_shift.bias_gain
    bias = np.exp(_smooth_field(rng, shape, cfg.spacing, cfg.bias_grid_mm, bias_std, 1)[0])
    gamma = float(np.exp(rng.normal(0.0, cfg.contrast)))
    if domain_shift is not None:
        gamma *= domain_shift.tissue_gamma
    image = np.clip(image, 0.0, None) ** gamma * bias
    if domain_shift is None:
        image = image + rng.normal(0.0, cfg.noise, size=shape)
    else:  # Rician: magnitude of (signal + real noise, imaginary noise)
        sigma = cfg.noise * domain_shift.noise_gain
        real = image + rng.normal(0.0, sigma, size=shape)
        image = np.hypot(real, rng.normal(0.0, sigma, size=shape))
    label = np.argmax(np.stack([1.0 - p_gm - p_wm, p_gm, p_wm]), axis=0).astype(np.uint8)
    return image.astype(np.float32), label, o_affine


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A NIfTI-1 file as gzip bytes with a zero timestamp, so equal arrays give equal files."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _split_subjects(n: int, rng: np.random.Generator) -> dict[str, list[int]]:
    if n < 3:
        raise ValueError(f"the demo dataset needs at least 3 subjects (training, validation, test), got {n}")
    n_test = max(1, round(0.2 * n))
    n_val = max(1, round(0.15 * n))
    order = rng.permutation(n).tolist()
    return {
        "test": sorted(order[:n_test]),
        "validation": sorted(order[n_test : n_test + n_val]),
        "training": sorted(order[n_test + n_val :]),
    }


def _axial_slices(label: np.ndarray, cfg: DemoConfig, per_subject: int) -> list[int]:
    brain = (label > 0).mean(axis=(0, 1))
    candidates = np.flatnonzero(brain >= cfg.min_brain_fraction)
    if per_subject > 0 and len(candidates) > per_subject:
        candidates = candidates[np.round(np.linspace(0, len(candidates) - 1, per_subject)).astype(int)]
    return candidates.tolist()


def prepare_demo(
    out: str | os.PathLike,
    subjects: int = 12,
    seed: int = 0,
    dims: int = 2,
    spacing: float = 2.0,
    slices_per_subject: int = 24,
    shift: str | float | None = None,
    unlabelled: int = 0,
    **variation,
) -> Path:
    """Write the demo dataset to ``out`` and return the path of its datalist.

    Args:
        out: output folder (created); holds ``imagesTr/``, ``labelsTr/`` and ``datalist.json``. Every datalist
            entry has ``image``, ``label``, ``subject`` and ``case`` (both the pseudo-subject id) and, for 2D data,
            ``slice`` (the axial index in the subject's volume), as the dataset converters write them.
        subjects: number of pseudo-subjects (split by subject: 20% test, 15% validation, the rest training).
        seed: random seed; the same arguments give byte-identical files.
        dims: 2 writes axial slices (``slices_per_subject`` evenly spaced slices through the brain per subject),
            3 writes whole volumes (3D configs crop patches from them).
        spacing: isotropic voxel size in mm (2 mm gives 96x112 slices and 96x112x96 volumes).
        slices_per_subject: 2D only; 0 keeps every slice that contains enough brain.
        shift: a domain-shifted copy (:class:`DomainShift`): None / ``"none"`` / 0 writes the clean data (the default,
            unchanged), ``"mild"`` (strength 0.5), ``"strong"`` (1.0) or a strength >= 0. With the same ``seed`` and
            other arguments the shifted data has the same subjects, splits, slices and labels as the clean data;
            only the images differ: the log bias field is ``1 + s`` times stronger, an intensity-transfer curve
            ``I ** (1 / (1 + s/2))`` compresses the tissue contrast (grey/white-matter ratio ~0.79 -> ~0.85 at
            ``s = 1``), and the noise is Rician with ``1 + s`` times the clean std. The datalist records the shift
            under ``generator.shift`` and is named ``medkd-demo-mni152-shift-<s>``.
            CLI: ``python -m medkd prepare demo --out data/demo2d_shift --shift strong``.
        unlabelled: number of extra pseudo-subjects without labels (default 0: the output is unchanged), drawn after
            the labelled ones (which stay the same) and written as images only (``imagesTr/unl-<i>...``, no label
            file) into the datalist's ``"unlabeled"`` list (entries ``image``, ``subject``, ``case`` and, in 2D,
            ``slice``), with ``numUnlabeled``. What semi-supervised and label-free KD recipes train on.
            CLI: ``python -m medkd prepare demo --out data/demo2d_unl --unlabelled 32``.
        variation: overrides of :class:`DemoConfig` fields (e.g. ``noise=0.05``); a shift applies on top of them.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    unknown = set(variation) - set(DemoConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown demo dataset options {sorted(unknown)}; valid: {sorted(DemoConfig.__dataclass_fields__)}")
    if isinstance(unlabelled, bool) or not isinstance(unlabelled, (int, np.integer)) or unlabelled < 0:
        raise ValueError(f"unlabelled must be a number of subjects >= 0, got {unlabelled!r}")
    cfg = DemoConfig(spacing=float(spacing), **variation)
    domain_shift = DomainShift.parse(shift)
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    split_of = {s: name for name, ids in _split_subjects(subjects, rng).items() for s in ids}
    subject_seeds = rng.integers(0, 2**32 - 1, size=subjects)
    template = _load_template(cfg.spacing)
    lists: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    # the unlabelled subjects' seeds come after every draw of the labelled ones, which therefore do not change
    unlabelled_seeds = rng.integers(0, 2**32 - 1, size=unlabelled) if unlabelled else []
    lists["unlabeled"] = []
    subject_list = [(f"sub-{sid:03d}", seed_, split_of[sid]) for sid, seed_ in enumerate(subject_seeds)]
    subject_list += [(f"unl-{i:03d}", seed_, "unlabeled") for i, seed_ in enumerate(unlabelled_seeds)]
    for name, subject_seed, split in subject_list:
        image, label, affine = make_subject(np.random.default_rng(subject_seed), template, cfg, domain_shift)
        if dims == 3:
            items = [(name, image, label, affine, None)]
        else:
            items = []
            for z in _axial_slices(label, cfg, slices_per_subject):
                z_affine = affine.copy()
                z_affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, z]) + affine[:3, 3]
                items.append((f"{name}_z{z:03d}", image[:, :, z], label[:, :, z], z_affine, z))
        for stem, img, lab, aff, z in items:
            rel_img, rel_lab = f"imagesTr/{stem}.nii.gz", f"labelsTr/{stem}.nii.gz"
            atomic_write_bytes(out / rel_img, nifti_bytes(img, aff))
            # "case" and "slice" as the dataset converters write them (evaluation protocols group by case)
            entry = {"image": rel_img, "label": rel_lab, "subject": name, "case": name}
            if split == "unlabeled":  # images only: no label file is written
                del entry["label"]
            else:
                atomic_write_bytes(out / rel_lab, nifti_bytes(lab, aff))
            if z is not None:
                entry["slice"] = int(z)
            lists[split].append(entry)

    description = (
        "Pseudo-subjects derived from the MNI ICBM152 2009a symmetric T1 template and its grey/white-matter "
        "probability maps (shipped with nilearn): random affine + elastic deformation, bias field, noise. "
        f"{'Axial 2D slices' if dims == 2 else '3D volumes'}, split by subject."
    )
    unlabeled = lists.pop("unlabeled")
    generator = {"subjects": subjects, "seed": seed, "dims": dims, **asdict(cfg)}
    if unlabelled:
        generator["unlabelled"] = unlabelled
        description += f" Plus {unlabelled} unlabelled pseudo-subjects (images only, the 'unlabeled' list)."
    if domain_shift is not None:
        description += (
            f" Domain-shifted copy (strength {domain_shift.strength:g}): stronger bias field, compressed tissue "
            "contrast, Rician noise; same subjects and labels as the clean data of the same seed."
        )
        generator["shift"] = domain_shift.describe(cfg)
    datalist = {
        "name": "medkd-demo-mni152" + ("" if domain_shift is None else f"-shift-{domain_shift.strength:g}"),
        "description": description,
        "reference": "Fonov et al., NeuroImage 2011 / 2009 (MNI ICBM152 2009a nonlinear symmetric template)",
        "licence": "see the MNI ICBM152 2009 template licence (copyright McConnell Brain Imaging Centre)",
        "tensorImageSize": f"{dims}D",
        "modality": {"0": "T1"},
        "labels": LABELS,
        "generator": generator,
        "numTraining": len(lists["training"]),
        "numValidation": len(lists["validation"]),
        "numTest": len(lists["test"]),
        **lists,
        **({"numUnlabeled": len(unlabeled), "unlabeled": unlabeled} if unlabelled else {}),
    }
    path = out / "datalist.json"
    atomic_write_bytes(path, (json.dumps(datalist, indent=2) + "\n").encode())
    return path
