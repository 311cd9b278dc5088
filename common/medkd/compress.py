"""``python -m medkd compress``: a MONAI bundle in, the user's images in, a small exported student bundle out.

Steps (each resumable: rerunning the same command skips what is done):

1. **Check** — the teacher bundle's ``network_def`` is built and its weights loaded (:mod:`medkd.distill.bundle`,
   none of its other ``$`` expressions runs); its inference preprocessing and inferer are read the same safe way;
   the student is built; images (channels, dimensions) and labels (values below the teacher's class count) are
   checked. Any failure raises before anything is written.
2. **Prepare** — every image goes once through the teacher's own preprocessing (labels with nearest-neighbour
   interpolation) and the teacher's inferer; the preprocessed image, the teacher's prediction and the label are
   written under ``OUT/work/prepared`` with an MSD datalist, so the student sees exactly what the teacher saw.
   Without labels (``--labels none``) the teacher's prediction fills the label slot of the validation split, where
   it picks the best checkpoint by agreement Dice only; training reads no label (the KD bundle's
   ``recipes/label_free.json``: every sample unlabelled, no task loss).
3. **Train** — a normal run of ``bundles/emkd_segmentation/configs/train.json`` with a generated ``compress.json``
   (student ``network_def``, ``teacher_bundle``, the prepared data, the teacher's inferer for validation), label-free
   also ``recipes/label_free.json``, then the logits-KD recipe (``recipes/kd_logits.json``); with labels, optionally
   the no-KD baseline
   (``bundles/supervised_segmentation``) on the same data and schedule.
4. **Evaluate** — on the held-out test split: Dice against labels where given, agreement Dice with the teacher,
   parameters, FLOPs, latency per volume (3D) or slice (2D) with the teacher's inferer, peak memory.
5. **Export** — the student as a model-zoo bundle (:func:`medkd.export.export_bundle`) whose ``inference.json`` is
   the teacher's own with the student's ``network_def``, plus ``report.md`` / ``report.json``.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from medkd.distill.bundle import BundleTeacher, BundleTeacherError, _safe_targets, load_bundle_teacher, resolve_config
from medkd.io import file_sha256

__all__ = ["PRESETS", "WIDTH_KEYS", "adapt_preprocessing", "compress", "student_definition", "teacher_pipeline"]

PRESETS = {"half": 2, "quarter": 4, "eighth": 8}
# network class -> (width argument, channel multiple it must keep)
WIDTH_KEYS = {"UNet": ("channels", 1), "BasicUNet": ("features", 1), "SegResNet": ("init_filters", 8),
              "SwinUNETR": ("feature_size", 12), "DynUNet": ("filters", 1)}
# transforms whose ``mode`` is an interpolation: labels take "nearest"
INTERPOLATING = {"Spacingd", "Resized", "Zoomd", "Rotated", "Affined", "Rand2DElasticd", "Rand3DElasticd"}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm")
KD_BUNDLE = "emkd_segmentation"
KD_RECIPE = "recipes/kd_logits.json"
LABEL_FREE_RECIPE = "recipes/label_free.json"


# --- teacher pipeline -----------------------------------------------------------------------------------------


def _short(target: str) -> str:
    return target.split(".")[-1]


def teacher_pipeline(teacher: BundleTeacher) -> dict:
    """The teacher's inference ``preprocessing`` (list of transform configs), ``inferer`` and image key, resolved to
    literals and restricted to MONAI/torch/medkd classes (``inference.json``; ``validate#...`` of ``train.json``)."""
    config = {**json.loads(teacher.config_file.read_text()), "bundle_root": str(teacher.bundle)}
    where = str(teacher.config_file)
    pre_id = next((k for k in ("preprocessing", "validate#preprocessing") if _has(config, k)), None)
    inf_id = next((k for k in ("inferer", "validate#inferer") if _has(config, k)), None)
    if pre_id is None:
        raise BundleTeacherError(f"{where} has no preprocessing (or validate#preprocessing): compress needs the "
                                 "teacher's own inference transforms")
    pre = _safe_targets(resolve_config(f"@{pre_id}", config, where), f"{where}#{pre_id}")
    if isinstance(pre, dict) and _short(str(pre.get("_target_", ""))) == "Compose":
        pre = pre.get("transforms", [])
    if not isinstance(pre, list) or not all(isinstance(t, dict) and "_target_" in t for t in pre):
        raise BundleTeacherError(f"{where}#{pre_id} is not a Compose or list of transforms")
    inferer = ({"_target_": "SimpleInferer"} if inf_id is None else
               _safe_targets(resolve_config(f"@{inf_id}", config, where), f"{where}#{inf_id}"))
    loader = next((t for t in pre if _short(t["_target_"]) == "LoadImaged"), None)
    if loader is None:
        raise BundleTeacherError(f"{where}#{pre_id} has no LoadImaged: compress reads the images with it")
    keys = loader.get("keys", "image")
    image_key = keys if isinstance(keys, str) else keys[0]
    return {"preprocessing": pre, "inferer": inferer, "image_key": image_key}


def _has(config: dict, ref: str) -> bool:
    node: Any = config
    for part in ref.split("#"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _transform_class(target: str) -> type:
    from monai.bundle import ConfigParser

    return ConfigParser({"t": {"_target_": target, "_mode_": "callable"}}).get_parsed_content("t")


def adapt_preprocessing(transforms: Sequence[dict], image_key: str, label_key: str | None = "label") -> list[dict]:
    """The teacher's inference transforms for ``image_key`` rewritten for ``{"image", "label"}`` dicts.

    Spatial transforms (anything outside ``monai.transforms.intensity``) also act on the label, with "nearest" as the
    label's interpolation mode for the interpolating ones (``Spacingd``, ``Resized``...); intensity transforms act on
    the image only. ``image_key`` becomes ``"image"``. ``label_key=None`` keeps the chain image-only.
    """
    out = []
    for t in transforms:
        t = copy.deepcopy(t)
        keys = t.get("keys")
        keys = [keys] if isinstance(keys, str) else keys
        if keys is None or image_key not in keys:
            out.append(t)
            continue
        keys = ["image" if k == image_key else k for k in keys]
        for k in ("source_key", "orig_keys"):
            if t.get(k) == image_key:
                t[k] = "image"
        cls = _transform_class(t["_target_"])
        if label_key and ".intensity." not in cls.__module__ and label_key not in keys:
            index = keys.index("image")
            keys = [*keys, label_key]
            if _short(t["_target_"]) in INTERPOLATING:
                mode = t.get("mode", inspect.signature(cls).parameters["mode"].default)
                modes = list(mode) if isinstance(mode, (list, tuple)) else [mode] * (len(keys) - 1)
                t["mode"] = [*modes[: len(keys) - 1], "nearest"] if len(modes) >= len(keys) - 1 else \
                    [modes[index]] * (len(keys) - 1) + ["nearest"]
        t["keys"] = keys
        out.append(t)
    return out


# --- student ----------------------------------------------------------------------------------------------------


def _scaled(value, factor: int, multiple: int):
    if isinstance(value, (list, tuple)):
        return [_scaled(v, factor, multiple) for v in value]
    return max(multiple, int(round(value / factor / multiple)) * multiple, 2)


def student_definition(teacher: BundleTeacher, student: str | dict = "quarter") -> dict:
    """The student's ``network_def``.

    Args:
        teacher: the loaded teacher bundle.
        student: ``half`` / ``quarter`` / ``eighth`` (the teacher's architecture at 1/2, 1/4, 1/8 width: UNet
            ``channels``, BasicUNet ``features``, SegResNet ``init_filters`` (multiple of 8), SwinUNETR
            ``feature_size`` (multiple of 12)); a class name (``ENet``, ``SmallUNet``, any medkd or MONAI network);
            or a ``_target_`` dict / JSON string. Missing ``spatial_dims`` / ``in_channels`` / ``out_channels``
            arguments are filled from the teacher.

    Raises:
        ValueError: a preset for a teacher without a known width argument, or a student that cannot be built.
    """
    if isinstance(student, str) and student.strip().startswith("{"):
        student = json.loads(student)
    if isinstance(student, str) and student in PRESETS:
        if teacher.torchscript or not teacher.network_def:
            raise ValueError(f"student preset {student!r} scales the teacher's network_def, but {teacher.checkpoint} is "
                             "a TorchScript teacher; pass --student with a class name or a _target_ dict")
        name = _short(teacher.network_def["_target_"])
        if name not in WIDTH_KEYS:
            raise ValueError(f"student preset {student!r}: no width argument known for {name} (known: "
                             f"{sorted(WIDTH_KEYS)}); pass --student with a class name or a _target_ dict")
        key, multiple = WIDTH_KEYS[name]
        definition = copy.deepcopy(teacher.network_def)
        cls = type(teacher.network)
        value = definition.get(key, inspect.signature(cls).parameters[key].default)
        definition[key] = _scaled(value, PRESETS[student], multiple)
    elif isinstance(student, str):
        definition = {"_target_": student if "." in student or not _is_medkd(student) else f"medkd.networks.{student}"}
    elif isinstance(student, dict) and "_target_" in student:
        definition = dict(student)
    else:
        raise ValueError(f"--student must be a preset ({', '.join(PRESETS)}), a class name or a _target_ dict; got {student!r}")
    try:
        params = inspect.signature(_transform_class(definition["_target_"])).parameters
    except Exception as e:
        raise ValueError(f"--student {definition['_target_']!r} is not a class medkd or MONAI knows: {e}") from None
    for key, value in (("spatial_dims", teacher.spatial_dims), ("in_channels", teacher.in_channels),
                       ("out_channels", teacher.out_channels)):
        if key in params and key not in definition and value is not None:
            definition[key] = value
    _build(definition)
    return definition


def _is_medkd(name: str) -> bool:
    import medkd.networks

    return hasattr(medkd.networks, name)


def _build(definition: dict) -> nn.Module:
    from monai.bundle import ConfigParser

    try:
        return ConfigParser({"n": copy.deepcopy(definition)}).get_parsed_content("n")
    except Exception as e:
        raise ValueError(f"cannot build the student {definition}: {e}") from None


# --- data -------------------------------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def read_items(data: str | Path, labels: str, seed: int = 0, val_fraction: float = 0.2,
               test_fraction: float = 0.2) -> dict[str, list[dict]]:
    """``training`` / ``validation`` / ``test`` items from an MSD datalist (its own splits where it has them, else
    held-out fractions of ``training``, by seed) or from a folder of images (images only, split the same way).

    Raises:
        ValueError: no images, ``--labels datalist`` with a folder or with items lacking a label.
    """
    from medkd.data import load_datalist

    path = Path(data)
    if path.is_dir():
        if labels == "datalist":
            raise ValueError(f"--labels datalist needs a datalist JSON, but {path} is a folder of images")
        items = [{"image": str(p)} for p in sorted(path.iterdir()) if _is_image(p)]
        if not items:
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        splits = {"training": items}
    elif path.is_file():
        content = json.loads(path.read_text())
        splits = {key: load_datalist(path, key, path.parent) for key in ("training", "validation", "test", "unlabeled")
                  if content.get(key)}
        if "training" not in splits:
            raise ValueError(f"datalist {path} has no 'training' list")
    else:
        raise FileNotFoundError(f"--data {path}: no such datalist or folder")
    rng = np.random.default_rng(seed)
    for key, fraction in (("test", test_fraction), ("validation", val_fraction)):
        if key not in splits:
            train = splits["training"]
            n = max(1, int(round(len(train) * fraction)))
            if len(train) - n < 1:
                raise ValueError(f"{path}: too few training items ({len(train)}) to hold out a {key} split")
            picked = set(rng.choice(len(train), n, replace=False).tolist())
            splits[key] = [d for i, d in enumerate(train) if i in picked]
            splits["training"] = [d for i, d in enumerate(train) if i not in picked]
    if labels == "none":
        splits["training"] = [{"image": d["image"]} for d in splits["training"] + splits.pop("unlabeled", [])]
        splits["validation"] = [{"image": d["image"]} for d in splits["validation"]]
    else:
        splits.pop("unlabeled", None)
        for key in ("training", "validation"):
            missing = [d["image"] for d in splits[key] if "label" not in d]
            if missing:
                raise ValueError(f"--labels datalist: {len(missing)} {key} items of {path} have no label "
                                 f"(first: {missing[0]}); use --labels none for label-free compression")
    return splits


# --- preparation ------------------------------------------------------------------------------------------------


def _compose(transforms: list[dict]):
    from monai.bundle import ConfigParser

    return ConfigParser({"c": {"_target_": "Compose", "transforms": copy.deepcopy(transforms)}}).get_parsed_content("c")


def _instantiate(config: dict):
    from monai.bundle import ConfigParser

    return ConfigParser({"x": copy.deepcopy(config)}).get_parsed_content("x")


def _nifti(array: np.ndarray, affine: torch.Tensor | np.ndarray, path: Path) -> None:
    from medkd.data.demo import nifti_bytes
    from medkd.io import atomic_write_bytes

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):  # 2D affine (3x3): embed in 3D
        full = np.eye(4)
        d = affine.shape[0] - 1
        full[:d, :d], full[:d, 3] = affine[:d, :d], affine[:d, d]
        affine = full
    atomic_write_bytes(path, nifti_bytes(array, affine))


def _check_sample(sample: dict, teacher: BundleTeacher, source: str) -> None:
    image = sample["image"]
    dims, channels = image.ndim - 1, int(image.shape[0])
    if teacher.spatial_dims is not None and dims != teacher.spatial_dims:
        raise ValueError(f"image {source} is {dims}D after the teacher's preprocessing but the teacher "
                         f"({teacher.config_file.name} network_def) is {teacher.spatial_dims}D")
    if teacher.in_channels is not None and channels != teacher.in_channels:
        raise ValueError(f"image {source} has {channels} channel(s) after the teacher's preprocessing but the teacher "
                         f"({teacher.config_file.name} network_def) takes in_channels={teacher.in_channels}")


def _stored_layout(teacher: BundleTeacher) -> str:
    """How prepared arrays are stored: ``"plain"`` (spatial axes, channels last when several) or, for 2D images with
    several channels, ``"2d_channels"``: ``(H, W, 1, C)`` images and ``(H, W, 1)`` labels, because NIfTI puts channels
    after three spatial axes — a channel-last ``(H, W, C)`` array would be read back by MONAI as a 3D image."""
    return "2d_channels" if teacher.spatial_dims == 2 and (teacher.in_channels or 1) > 1 else "plain"


def _to_file(array: np.ndarray, layout: str) -> np.ndarray:
    """A channel-first ``(C, *spatial)`` array in the order written to NIfTI for ``layout`` (see :func:`_stored_layout`)."""
    spatial_last = array.transpose(*range(1, array.ndim), 0)  # (*spatial, C)
    if layout == "2d_channels":
        return spatial_last[:, :, None, :] if array.shape[0] > 1 else spatial_last
    return spatial_last[..., 0] if array.shape[0] == 1 else spatial_last


def _predict(net: nn.Module, inferer, image: torch.Tensor) -> torch.Tensor:
    from medkd.distill.teacher import first_tensor

    with torch.no_grad():
        return first_tensor(inferer(image[None], net))[0]


def prepare(teacher: BundleTeacher, pipeline: dict, splits: dict[str, list[dict]], folder: Path) -> Path:
    """Preprocess every item once with the teacher's transforms, run the teacher, write image / label / teacher
    prediction NIfTI files and ``datalist.json`` under ``folder``; returns the datalist path. Items already written
    by an earlier run with the same manifest are kept."""
    from tqdm import tqdm

    manifest = {"teacher": file_sha256(teacher.checkpoint), "preprocessing": pipeline["preprocessing"],
                "inferer": pipeline["inferer"], "splits": splits}
    manifest_file = folder / "manifest.json"
    if manifest_file.is_file() and json.loads(manifest_file.read_text()) != manifest:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_file.write_text(json.dumps(manifest, indent=1))
    inferer = _instantiate(pipeline["inferer"])
    with_label = _compose(adapt_preprocessing(pipeline["preprocessing"], pipeline["image_key"], "label"))
    image_only = _compose(adapt_preprocessing(pipeline["preprocessing"], pipeline["image_key"], None))
    datalist: dict[str, list[dict]] = {}
    total = sum(len(v) for v in splits.values())
    with tqdm(total=total, desc="teacher predictions", unit="image") as bar:
        for split, items in splits.items():
            datalist[split] = []
            for i, item in enumerate(items):
                stem = f"{split}_{i:05d}"
                entry = {"image": f"{stem}_image.nii.gz", "teacher": f"{stem}_teacher.nii.gz"}
                if "label" in item:
                    entry["label_user"] = f"{stem}_label.nii.gz"
                if not all((folder / f).is_file() for f in entry.values()):
                    sample = (with_label if "label" in item else image_only)(dict(item))
                    image = sample["image"]
                    pred = _predict(teacher.network, inferer, image.float()).argmax(0)
                    affine = getattr(image, "affine", np.eye(image.ndim))
                    layout = _stored_layout(teacher)
                    _nifti(_to_file(image.cpu().numpy().astype(np.float32), layout), affine, folder / entry["image"])
                    _nifti(_to_file(pred[None].cpu().numpy().astype(np.uint8), layout), affine, folder / entry["teacher"])
                    if "label" in item:
                        _nifti(_to_file(sample["label"][:1].cpu().numpy().round().astype(np.uint8), layout), affine,
                               folder / entry["label_user"])
                entry["label"] = entry.get("label_user", entry["teacher"])  # the teacher fills in missing labels
                entry["source"] = item["image"]
                datalist[split].append(entry)
                bar.update(1)
    path = folder / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


# --- training ---------------------------------------------------------------------------------------------------


def _roi(pipeline: dict, teacher: BundleTeacher, sample_shape: Sequence[int]) -> list[int]:
    roi = pipeline["inferer"].get("roi_size")
    if roi is not None:
        roi = [int(r) for r in (roi if isinstance(roi, (list, tuple)) else [roi] * len(sample_shape))]
        return [s if r <= 0 else r for r, s in zip(roi, sample_shape)]
    return [int(16 * max(1, s // 16)) for s in sample_shape]


def training_overrides(teacher: BundleTeacher, pipeline: dict, student: dict, roi: list[int]) -> dict:
    """The generated ``compress.json``: what the KD bundle's ``train.json`` runs with on the prepared data (label-free
    runs add ``recipes/label_free.json`` after it, which marks every training sample unlabelled)."""
    both = ["image", "label"]
    config = {
        "teacher_bundle": str(teacher.bundle),
        "teacher_taps": {},
        "student_taps": {},
        "spatial_dims": teacher.spatial_dims,
        "in_channels": teacher.in_channels,
        "num_classes": teacher.out_channels,
        "roi_size": roi,
        "network_def": student,
        "train#deterministic_transforms": [
            {"_target_": "LoadImaged", "keys": both, "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": both},
            *([{"_target_": "SqueezeDimd", "keys": both, "dim": -1}]  # (C, H, W, 1) -> (C, H, W): _stored_layout
              if _stored_layout(teacher) == "2d_channels" else []),
            {"_target_": "SpatialPadd", "keys": both, "spatial_size": "@roi_size"},
            {"_target_": "EnsureTyped", "keys": both},
        ],
        "train#random_transforms": [
            {"_target_": "RandSpatialCropd", "keys": both, "roi_size": "@roi_size", "random_size": False},
            {"_target_": "RandFlipd", "keys": both, "spatial_axis": 0, "prob": 0.5},
        ],
        "validate#inferer": pipeline["inferer"],
    }
    return config


def _run(name: str, bundle: str, configs: list[str], overrides: dict, work: Path) -> Path:
    """One ``python -m monai.bundle run`` into ``work/<name>``, skipped when its ``done.json`` records the same configs
    and overrides (a finished run with other settings is refused, naming the first difference).

    Raises:
        ValueError: ``work/<name>`` holds a finished run with other settings.
    """
    from medkd.demo import _run_bundle

    folder = work / name
    done = folder / "done.json"
    settings = {"configs": [str(c) for c in configs], "overrides": {k: str(v) for k, v in sorted(overrides.items())}}
    if done.is_file():
        earlier = json.loads(done.read_text()).get("settings", settings)  # files of the first version lack settings
        if earlier != settings:
            keys = sorted(set(earlier["overrides"]) | set(settings["overrides"]))
            diff = next((f"--{k}: {earlier['overrides'].get(k)} then, {settings['overrides'].get(k)} now" for k in keys
                         if earlier["overrides"].get(k) != settings["overrides"].get(k)),
                        f"configs {earlier['configs']} then, {settings['configs']} now")
            raise ValueError(f"{folder} holds a finished '{name}' run with other settings ({diff}); rerun with the "
                             f"same settings, another --out, or delete {folder} to train again")
        print(f"[{name}] done earlier ({folder})", flush=True)
        return folder / "model.pt"
    folder.mkdir(parents=True, exist_ok=True)
    seconds = _run_bundle(name, bundle, configs, {**overrides, "ckpt_dir": folder, "output_dir": folder / "eval"},
                          work / "logs")
    if not (folder / "model.pt").is_file():
        raise RuntimeError(f"[{name}] finished without {folder / 'model.pt'}: no validation ran (increase --epochs "
                           "or lower val_interval)")
    done.write_text(json.dumps({"seconds": seconds, "settings": settings}))
    return folder / "model.pt"


def build_cache(configs: list[str], overrides: dict, work: Path, views: int) -> Path:
    """Offline KD: the KD bundle's ``cache_teacher.json`` run with the student's own configs (same data, transforms,
    recipe and taps), ``views`` recorded views per training item, into ``work/teacher_cache`` (skipped when its
    ``done.json`` exists; an interrupted build resumes; a cache built for other settings is refused by name)."""
    from medkd.demo import _run_bundle

    cache = work / "teacher_cache"
    done = work / "teacher_cache.done.json"
    if done.is_file() and json.loads(done.read_text()).get("views") == views:
        print(f"[teacher cache] done earlier ({cache})", flush=True)
        return cache
    seconds = _run_bundle("teacher_cache", KD_BUNDLE, [*configs, "cache_teacher.json"],
                          {**overrides, "cache_dir": cache, "cache_views": views, "ckpt_dir": work / "teacher_cache_run",
                           "output_dir": work / "teacher_cache_run"}, work / "logs")
    done.write_text(json.dumps({"seconds": seconds, "views": views}))
    return cache


# --- evaluation -------------------------------------------------------------------------------------------------


def _load(path: Path, spatial_dims: int | None = None) -> torch.Tensor:
    """A prepared file, channel first, with the singleton third axis of the ``2d_channels`` layout removed."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    array = EnsureChannelFirst()(LoadImage(image_only=True)(str(path)))
    if spatial_dims == 2 and array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _mean_dice(preds: list[torch.Tensor], refs: list[torch.Tensor], num_classes: int) -> dict:
    """Per-class Dice (foreground classes, averaged over images where the reference has the class) and their mean."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    rows = []
    for p, r in zip(preds, refs):
        rows.append(compute_dice(one_hot(p[None, None].long(), num_classes), one_hot(r[None, None].long(), num_classes),
                                 include_background=False, ignore_empty=True)[0])
    per_class = torch.nanmean(torch.stack(rows), dim=0)
    return {"per_class": [float(v) for v in per_class], "mean": float(torch.nanmean(per_class))}


def evaluate(networks: dict[str, nn.Module], pipeline: dict, datalist: Path, num_classes: int,
             roi: list[int], in_channels: int, repeats: int = 5) -> dict:
    """Test-split Dice against labels (where given) and agreement with the teacher, and the cost of every network."""
    from tqdm import tqdm

    from medkd.profiling import median_time, profile_network

    folder = datalist.parent
    test = json.loads(datalist.read_text())["test"]
    inferer = _instantiate(pipeline["inferer"])
    dims = len(roi)
    images = [_load(folder / d["image"], dims) for d in test]
    teacher_refs = [_load(folder / d["teacher"], dims)[0] for d in test]
    labels = ([_load(folder / d["label_user"], dims)[0] for d in test] if all("label_user" in d for d in test)
              else None)
    results = {}
    for name, net in networks.items():
        net = net.eval()
        preds = [_predict(net, inferer, img.float()).argmax(0) for img in tqdm(images, desc=f"test {name}", unit="image")]
        cost = profile_network(net, (1, in_channels, *roi), repeats=repeats, warmup=1)
        latency = median_time(lambda: _predict(net, inferer, images[0].float()), warmup=1, repeats=repeats)
        results[name] = {
            "params": cost["params"], "flops_per_roi": cost["flops"], "peak_memory_mb": cost.get("peak_memory_mb"),
            "latency_ms_per_image": 1000.0 * latency,
            "dice_labels": None if labels is None else _mean_dice(preds, labels, num_classes),
            "dice_teacher_agreement": None if name == "teacher" else _mean_dice(preds, teacher_refs, num_classes),
        }
    return results


# --- export -----------------------------------------------------------------------------------------------------


def _vendored_package(root: Path) -> str | None:
    for init in root.glob("*/__init__.py"):
        if "__vendored_from__" in init.read_text():
            return init.parent.name
    return None


def _absolute_paths_to_bundle_data(config: dict) -> tuple[dict, list[str]]:
    changed = []
    for key, value in config.items():
        if isinstance(value, str) and (value.startswith("/") and len(value) > 1 or "../" in value):
            config[key] = "$@bundle_root + '/data'"
            changed.append(key)
    return config, changed


def student_inference_config(teacher: BundleTeacher, student: dict) -> tuple[dict, list[str]]:
    """The teacher's ``inference.json`` with the student's ``network_def`` (a medkd export's vendored package named
    back to ``medkd``, absolute data paths pointed at ``<bundle>/data``); returns it and the keys changed."""
    text = teacher.config_file.read_text()
    vendored = _vendored_package(teacher.bundle)
    if vendored:
        text = re.sub(rf"\b{re.escape(vendored)}\b", "medkd", text)
    config = json.loads(text)
    config["network_def"] = student
    config, changed = _absolute_paths_to_bundle_data(config)
    return config, ["network_def", *changed]


def _metadata(teacher: BundleTeacher, name: str, report: dict, template: Path) -> dict:
    path = teacher.bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text()) if path.is_file() else json.loads(template.read_text())
    meta = dict(meta)
    student = report["models"]["student"]
    meta["version"] = "0.1.0"
    meta["changelog"] = {"0.1.0": f"student of {teacher.bundle.name} compressed by medkd (knowledge distillation)"}
    meta["name"] = f"{meta.get('name', teacher.bundle.name)} — compressed student"
    meta["description"] = (f"A {report['student_params_ratio']:.1f}x smaller student of the bundle {teacher.bundle.name}, "
                           f"trained by knowledge distillation ({report['labels']} labels) with python -m medkd compress; "
                           "same pre- and post-processing as the teacher.")
    agreement = student["dice_teacher_agreement"]["mean"]
    meta["eval_metrics"] = {"mean_dice_agreement_with_teacher": round(agreement, 4)}
    if student["dice_labels"] is not None:
        meta["eval_metrics"]["mean_dice"] = round(student["dice_labels"]["mean"], 4)
    for key in ("required_packages_version", "optional_packages_version"):
        meta.setdefault(key, {})
    return meta


def export_student(teacher: BundleTeacher, student: dict, checkpoint: Path, report: dict, staging: Path,
                   out: Path) -> Path:
    """Write the student as a model-zoo bundle at ``out`` through :func:`medkd.export.export_bundle`."""
    from medkd.demo import bundles_dir
    from medkd.export import export_bundle, zoo_json

    source = bundles_dir() / KD_BUNDLE
    if staging.exists():
        shutil.rmtree(staging)
    for sub in ("configs", "models", "docs"):
        (staging / sub).mkdir(parents=True)
    inference, changed = student_inference_config(teacher, student)
    (staging / "configs" / "inference.json").write_text(zoo_json(inference))
    meta = _metadata(teacher, out.name, report, source / "configs" / "metadata.json")
    (staging / "configs" / "metadata.json").write_text(zoo_json(meta))
    logging_conf = teacher.bundle / "configs" / "logging.conf"
    shutil.copy2(logging_conf if logging_conf.is_file() else source / "configs" / "logging.conf",
                 staging / "configs" / "logging.conf")
    license_file = teacher.bundle / "LICENSE"
    shutil.copy2(license_file if license_file.is_file() else source / "LICENSE", staging / "LICENSE")
    shutil.copy2(checkpoint, staging / "models" / "model.pt")
    (staging / "docs" / "README.md").write_text(
        f"# Compressed student of {teacher.bundle.name}\n\n"
        f"Written by `python -m medkd compress`: `configs/inference.json` is the teacher bundle's own "
        f"(its preprocessing, inferer and postprocessing) with these keys changed: {', '.join(changed)}.\n\n"
        + report_markdown(report) + "\n")
    export_bundle(staging, out, overwrite=True)
    return out


# --- report -----------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict) -> str:
    """The report table: one row per model (teacher, student, baseline)."""
    unit = "volume" if report["spatial_dims"] == 3 else "slice"
    rows = [f"| model | parameters | GFLOPs / ROI | latency (ms / {unit}) | peak memory (MB) | test Dice (labels) | "
            "agreement Dice with the teacher |", "|---|---|---|---|---|---|---|"]
    for name, r in report["models"].items():
        rows.append(f"| {name} | {r['params'] / 1e3:.1f}k | {r['flops_per_roi'] / 1e9:.3f} | "
                    f"{r['latency_ms_per_image']:.1f} | {_fmt(r['peak_memory_mb'], 1)} | "
                    f"{_fmt((r['dice_labels'] or {}).get('mean'))} | "
                    f"{_fmt((r['dice_teacher_agreement'] or {}).get('mean'))} |")
    return "\n".join([
        f"Teacher bundle `{report['teacher_bundle']}`, student `{report['student']['_target_']}`, KD "
        f"{'label-free (teacher soft outputs only)' if report['labels'] == 'none' else 'with labels'}, "
        f"{report['epochs']} epochs; test split: {report['test_items']} images. Student/teacher: "
        f"{report['student_params_ratio']:.1f}x fewer parameters, {report['student_latency_ratio']:.1f}x faster.",
        "", *rows])


# --- the command --------------------------------------------------------------------------------------------------


def compress(teacher_bundle: str | Path, data: str | Path, out: str | Path, student: str | dict = "quarter",
             epochs: int = 20, labels: str = "none", baseline: bool = False, seed: int = 0,
             batch_size: int | None = None, val_interval: int = 1, learning_rate: float | None = None,
             export: bool = True, teacher_views: int = 0) -> dict:
    """Compress ``teacher_bundle`` into a student trained by KD on ``data``; see the module docstring.

    Args:
        teacher_bundle: a MONAI bundle folder (zoo layout).
        data: an MSD datalist JSON or a folder of images.
        out: output folder (``report.md``, ``report.json``, ``compressed_<teacher>/``, ``work/``); rerunning the
            same command resumes.
        student: a preset (``half``, ``quarter``, ``eighth``), a class name or a ``_target_`` dict.
        epochs: training epochs of the student (and of the baseline).
        labels: ``none`` (label-free: the teacher is the only target) or ``datalist`` (task loss + KD).
        baseline: also train the student without KD (needs labels) for the report.
        seed, batch_size, val_interval, learning_rate: training settings (defaults of the KD bundle otherwise).
        export: write the model-zoo bundle.
        teacher_views: 0 (default) runs the teacher live in every training step; ``K > 0`` is offline KD: the teacher
            runs once over ``K`` recorded augmented views of every training item (``python -m medkd cache-teacher``,
            :mod:`medkd.distill.cache`), stored under ``out/work/teacher_cache``, and epoch ``e`` trains on view
            ``e mod K`` with the stored outputs. It saves teacher forwards when ``epochs > K`` (a big teacher: about
            ``K / epochs`` of the online teacher cost) at the price of ``K`` distinct augmentations per item.

    Returns:
        the report dict (also written to ``out/report.json``).

    Raises:
        BundleTeacherError / ValueError / FileNotFoundError: before anything is written, for a teacher that cannot be
            built or loaded, mismatching weights, images or labels that do not fit the teacher, a bad student.
    """
    from medkd.data import check_datalist

    if labels not in ("none", "datalist"):
        raise ValueError(f"--labels must be 'none' or 'datalist', got {labels!r}")
    if baseline and labels != "datalist":
        raise ValueError("--baseline trains a student on labels alone: it needs --labels datalist")
    start = time.time()
    out = Path(out).absolute()
    teacher = load_bundle_teacher(teacher_bundle)
    pipeline = teacher_pipeline(teacher)
    definition = student_definition(teacher, student)
    splits = read_items(data, labels, seed=seed)
    labelled = [d for items in splits.values() for d in items if "label" in d]
    if labelled:
        check_datalist(labelled, teacher.out_channels)
    first = _compose(adapt_preprocessing(pipeline["preprocessing"], pipeline["image_key"], None))(
        {"image": splits["training"][0]["image"]})
    _check_sample(first, teacher, splits["training"][0]["image"])
    roi = _roi(pipeline, teacher, first["image"].shape[1:])

    work = out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    datalist = prepare(teacher, pipeline, splits, work / "prepared")
    overrides = training_overrides(teacher, pipeline, definition, roi)
    config_file = work / "compress.json"
    config_file.write_text(json.dumps(overrides, indent=1))
    common = {"dataset_dir": datalist.parent, "epochs": epochs, "seed": seed, "val_interval": val_interval,
              "num_workers": 0}
    if batch_size:
        common.update({"batch_size": batch_size, "val_batch_size": batch_size})
    if learning_rate:
        common["learning_rate"] = learning_rate
    # label-free: the KD bundle's own recipe (training labels dropped, task loss 0); the KD recipe comes last
    kd_configs = ["train.json", str(config_file), *([LABEL_FREE_RECIPE] if labels == "none" else []), KD_RECIPE]
    if int(teacher_views) < 0:
        raise ValueError(f"--teacher_views must be 0 (live teacher) or a number of views > 0, got {teacher_views}")
    student_overrides = dict(common)
    if int(teacher_views) > 0:
        student_overrides["teacher_cache"] = build_cache(kd_configs, common, work, int(teacher_views))
    student_ckpt = _run("student", KD_BUNDLE, kd_configs, student_overrides, work)
    runs = {"student": student_ckpt}
    if baseline:
        runs["baseline"] = _run("baseline", "supervised_segmentation", ["train.json", str(config_file)], common, work)

    networks: dict[str, nn.Module] = {"teacher": teacher.network}
    from medkd.io import load_state_dict_file

    for name, ckpt in runs.items():
        net = _build(definition)
        net.load_state_dict(load_state_dict_file(ckpt), strict=True)
        networks[name] = net
    results = evaluate(networks, pipeline, datalist, teacher.out_channels, roi, teacher.in_channels)
    t, s = results["teacher"], results["student"]
    report = {
        "teacher_bundle": teacher.bundle.name, "student": definition, "labels": labels, "epochs": epochs,
        "spatial_dims": teacher.spatial_dims, "roi_size": roi, "kd_bundle": KD_BUNDLE, "kd_recipe": KD_RECIPE,
        "kd_configs": [Path(c).name for c in kd_configs], "teacher_views": int(teacher_views),
        "test_items": len(json.loads(datalist.read_text())["test"]), "models": results,
        "student_params_ratio": t["params"] / s["params"],
        "student_latency_ratio": t["latency_ms_per_image"] / s["latency_ms_per_image"],
        "bundle_dir": None,
    }
    if export:
        name = f"compressed_{teacher.bundle.name}" if teacher.bundle.name.isidentifier() else "compressed_student"
        report["bundle_dir"] = name
        export_student(teacher, definition, student_ckpt, report, work / f"staging_{name}" / name, out / name)
    report["seconds"] = time.time() - start
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text("# medkd compress report\n\n" + report_markdown(report) + "\n")
    print("\n" + report_markdown(report) + f"\n\nwrote {out / 'report.md'}" +
          (f" and the student bundle {out / report['bundle_dir']}" if report["bundle_dir"] else ""), flush=True)
    return report
