"""Offline KD: a cache of the frozen teacher's outputs, built once and served to every run that uses that teacher.

The teacher is frozen, so its outputs on a given image never change. :func:`build_teacher_cache` runs it once over
``K`` recorded augmented *views* of every training item and stores ``t.logits`` and every teacher tap (float16 by
default, one file per item and view, read per item: a cache larger than RAM works). In training,
:class:`TeacherViews` re-creates exactly view ``epoch mod K`` of each item (the random transforms are re-seeded
from the item index and the view) and attaches the stored outputs to it, and :class:`CachedTeacher` serves them
to the :class:`~medkd.distill.Distiller` in place of a teacher forward. Intensity augmentation and anything else the
transform chain does is therefore exact: the cached outputs belong to exactly the image the student sees.

Safety: a manifest records the teacher checkpoint's sha256, the taps (name -> spec), the datalist (paths, sizes,
modification times), the transform chain (a description of every transform's settings), the views, the view seed
and the dtype; a run whose teacher, taps, data or transforms differ is refused with an error naming what differs,
and every served item is checked against a fingerprint of the image it was computed on. An interrupted build
resumes where it stopped (files are written atomically; the manifest is marked complete last); an incomplete cache
is refused.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medkd.distill.teacher import LiveTeacher, TeacherSource
from medkd.io import atomic_torch_save, atomic_write_bytes, file_sha256

__all__ = ["TeacherCache", "TeacherViews", "CachedTeacher", "build_teacher_cache", "CACHE_FORMAT"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FINGERPRINT_GRID = 4  # image fingerprint: per-channel 4x4(x4) average pooling, plus mean and mean |x|


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# what a cache is valid for: the datasets' entries and transform chains
# ---------------------------------------------------------------------------------------------------------------


def _leaves(dataset: Any) -> list[Any]:
    """The MONAI datasets (objects with ``data`` and ``transform``) inside ``dataset``, in a fixed order.

    A plain ``Dataset``/``CacheDataset`` is its own leaf; wrappers (e.g. :class:`medkd.data.SemiSupervisedDataset`,
    ``torch.utils.data.Subset``) are searched through their ``labelled``/``unlabelled``/``dataset``/``datasets``.
    """
    if hasattr(dataset, "data") and hasattr(dataset, "transform"):
        return [dataset]
    found: list[Any] = []
    for name in ("labelled", "unlabelled", "dataset", "datasets"):
        child = getattr(dataset, name, None)
        for item in child if isinstance(child, (list, tuple)) else [child]:
            if item is not None and item is not dataset:
                found += _leaves(item)
    return found


def _entry_signature(entry: Any) -> Any:
    """A datalist entry with every existing file replaced by (path, size, mtime): a rewritten file changes it."""
    if isinstance(entry, Mapping):
        return {str(k): _entry_signature(v) for k, v in sorted(entry.items(), key=lambda kv: str(kv[0]))}
    if isinstance(entry, (list, tuple)):
        return [_entry_signature(v) for v in entry]
    if isinstance(entry, (str, os.PathLike)) and os.path.isfile(entry):
        st = os.stat(entry)
        return {"path": os.path.abspath(entry), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return entry if isinstance(entry, (int, float, bool, type(None))) else str(entry)


def _init_parameters(cls: type) -> set[str]:
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _describe(obj: Any, depth: int = 0) -> Any:
    """The settings of a transform: the attributes named like its constructor's parameters, recursing into MONAI
    sub-objects (e.g. a dictionary transform's cropper). Random draws (``RandScaleIntensity.factor``,
    ``RandAffineGrid.rotate_params``, ...) are not constructor parameters, so a transform that has already run
    describes as a fresh one."""
    if isinstance(obj, (int, float, str, bool, type(None))):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth + 1) for v in obj] if depth < 6 else type(obj).__name__
    if isinstance(obj, torch.dtype) or isinstance(obj, np.dtype) or isinstance(obj, type):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, depth + 1) for k, v in obj.items()} if depth < 6 else "dict"
    if hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("monai", "medkd") and depth < 6:
        out = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
        settings = _init_parameters(type(obj))
        for key, value in sorted(vars(obj).items()):
            if key.startswith("_") or key == "R" or isinstance(value, np.random.RandomState):
                continue
            is_part = hasattr(value, "__dict__") and type(value).__module__.split(".")[0] in ("monai", "medkd")
            if key in settings or is_part:
                out[key] = _describe(value, depth + 1)
        return out
    return type(obj).__qualname__


def _transforms(leaf: Any) -> list[Any]:
    transform = leaf.transform
    flat = transform.flatten().transforms if hasattr(transform, "flatten") else [transform]
    return list(flat)


def data_signature(dataset: Any) -> dict:
    """``{"entries": [...], "transforms": [...]}`` of every leaf dataset of ``dataset`` (see :func:`_leaves`)."""
    leaves = _leaves(dataset)
    if not leaves:
        raise TypeError(
            f"cannot find the data and transforms of {type(dataset).__name__}: a teacher cache needs MONAI datasets "
            "(objects with .data and .transform), possibly inside a SemiSupervisedDataset or Subset"
        )
    return {
        "entries": [[_entry_signature(e) for e in leaf.data] for leaf in leaves],
        "transforms": [[_describe(t) for t in _transforms(leaf)] for leaf in leaves],
    }


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    """A short description of where two JSON-like values first differ."""
    if type(a) is not type(b):
        return f"{path or 'value'}: {json.dumps(a, default=str)[:120]} vs {json.dumps(b, default=str)[:120]}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path or 'list'}: {len(a)} vs {len(b)} elements"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path or 'value'}: {json.dumps(a, default=str)[:120]} vs {json.dumps(b, default=str)[:120]}"


def image_fingerprint(image: torch.Tensor) -> torch.Tensor:
    """A small summary of an image ``(C, *spatial)``: per-channel mean, mean |x| and a 4x4(x4) average-pooled map.

    Equal images give equal fingerprints; a different crop, flip or intensity change moves them by far more than the
    rounding of a different thread count, which :meth:`TeacherViews.__getitem__` tolerates (rtol/atol 1e-4)."""
    x = torch.as_tensor(image).detach().as_subclass(torch.Tensor).float().cpu()
    pool = F.adaptive_avg_pool3d if x.ndim == 4 else F.adaptive_avg_pool2d
    grid = pool(x[None], FINGERPRINT_GRID)[0].flatten(1)
    return torch.cat([x.flatten(1).mean(1, keepdim=True), x.flatten(1).abs().mean(1, keepdim=True), grid], 1).flatten()


# ---------------------------------------------------------------------------------------------------------------
# the cache on disk
# ---------------------------------------------------------------------------------------------------------------


class TeacherCache:
    """A teacher cache folder: ``manifest.json`` plus ``views/v<view>/<index>.pt`` per training item and view.

    Each item file holds ``{"outputs": {"t.logits": (n, C, ...), "t.<tap>": ...}, "fingerprint": (n, F)}`` for the
    ``n`` samples of that dataset item (1, or 2 for a semi-supervised pair), in the cache's dtype.

    Args:
        path: the cache folder.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"teacher cache {self.path} has no {MANIFEST}: build it first with "
                "`python -m medkd cache-teacher BUNDLE --out PATH` (or configs/cache_teacher.json)"
            )
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"teacher cache manifest {manifest} is not valid JSON ({e}); rebuild the cache") from None
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"teacher cache {self.path} has format {self.manifest.get('format')}, this medkd reads "
                             f"format {CACHE_FORMAT}: rebuild it")

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def items(self) -> int:
        return int(self.manifest["items"])

    def item_path(self, index: int, view: int) -> Path:
        return self.path / "views" / f"v{view:03d}" / f"{index:07d}.pt"

    def check_complete(self) -> None:
        """Refuse a cache whose build has not finished (or whose item files are gone), naming what is missing."""
        missing = [(i, v) for v in range(self.views) for i in range(self.items) if not self.item_path(i, v).is_file()]
        if missing or not self.manifest.get("complete"):
            i, v = missing[0] if missing else (None, None)
            raise ValueError(
                f"teacher cache {self.path} is incomplete: {len(missing)} of {self.items * self.views} item views "
                f"missing{f' (first: item {i}, view {v})' if missing else ''}"
                f"{'' if self.manifest.get('complete') else ', build not finished'}. Rerun the same cache-teacher "
                "command to finish it."
            )

    def check_teacher(self, teacher: LiveTeacher) -> None:
        """Refuse the cache unless it was built from this checkpoint and holds every tap ``teacher`` needs (same specs)."""
        ckpt = getattr(teacher, "checkpoint", None)
        built = self.manifest["teacher"]
        if ckpt is None or not os.path.isfile(ckpt):
            raise ValueError(f"teacher cache {self.path}: the run's teacher checkpoint {ckpt} is not a file")
        sha = file_sha256(ckpt)
        if sha != built["sha256"]:
            raise ValueError(
                f"teacher cache {self.path} was built for another teacher checkpoint: {built['checkpoint']} "
                f"(sha256 {built['sha256'][:12]}...) vs this run's {ckpt} (sha256 {sha[:12]}...). Rebuild the cache "
                "for this teacher or pass the checkpoint it was built with."
            )
        cached = self.manifest["taps"]
        missing = sorted(set(teacher.taps.specs) - set(cached))
        if missing:
            raise ValueError(
                f"teacher cache {self.path} lacks the teacher taps {missing} this recipe reads (cached taps: "
                f"{sorted(cached)}). Rebuild it with this recipe, or with --taps listing every tap of the recipes "
                "that share it."
            )
        changed = {n: (cached[n], s) for n, s in teacher.taps.specs.items() if cached[n] != s}
        if changed:
            raise ValueError(
                f"teacher cache {self.path} holds taps at other places: "
                + ", ".join(f"{n} was {a!r}, is now {b!r}" for n, (a, b) in changed.items())
                + ". Rebuild the cache for these teacher_taps."
            )

    def check_data(self, signature: dict, views: int, view_seed: int) -> None:
        """Refuse the cache unless it was built for these datalist entries, transforms, views and view seed."""
        m = self.manifest
        if views and views != self.views:
            raise ValueError(f"teacher cache {self.path} holds {self.views} views per item, the run asks for "
                             f"views={views}: leave views at 0 (the cache's count is used) or rebuild the cache")
        if view_seed != m["view_seed"]:
            raise ValueError(f"teacher cache {self.path} was built with view seed {m['view_seed']}, the run uses "
                             f"{view_seed}")
        for part, name in (("entries", "datalist"), ("transforms", "transform chain")):
            if _sha(signature[part]) != m[part]["sha256"]:
                where = _first_difference(m[part].get("value"), signature[part]) if "value" in m[part] else "(no copy kept)"
                raise ValueError(
                    f"teacher cache {self.path} was built for another {name}: first difference at {where} "
                    "(cache vs this run). Rebuild the cache for this data and transforms "
                    "(python -m medkd cache-teacher ...)."
                )

    def load(self, index: int, view: int) -> dict:
        path = self.item_path(index, view)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"teacher cache item missing: {path} (item {index}, view {view}); rerun the "
                                    "cache-teacher command to complete the cache") from None
        except Exception as e:  # truncated or foreign file
            raise ValueError(f"teacher cache item {path} cannot be read ({type(e).__name__}: {e}); delete it and "
                             "rerun the cache-teacher command") from None


# ---------------------------------------------------------------------------------------------------------------
# the training data: recorded views, with the cached outputs attached
# ---------------------------------------------------------------------------------------------------------------


def _samples(item: Any) -> list[dict]:
    """The sample dicts of one dataset item (a dict, or a list of dicts: semi-supervised pairs, multi-crop)."""
    if isinstance(item, Mapping):
        return [item]  # type: ignore[list-item]
    if isinstance(item, (list, tuple)) and all(isinstance(s, Mapping) for s in item):
        return list(item)
    raise TypeError(f"a teacher cache serves dataset items that are dicts or lists of dicts, got {type(item).__name__}")


def _source_name(sample: Mapping) -> str:
    meta = getattr(sample.get("image"), "meta", None) or {}
    return f"image file {meta.get('filename_or_obj', 'unknown')}"


class TeacherViews(Dataset):
    """The training dataset with recorded augmented views, optionally carrying cached teacher outputs.

    - ``views=0`` and no cache: ``dataset[i]`` unchanged (fresh random augmentation, the default of every bundle).
    - ``views=K``: item ``i`` in epoch ``e`` (0-based, set by :meth:`set_epoch`; the KD trainer calls it at every
      epoch start) is view ``v = e mod K``: every random transform of the dataset is re-seeded from
      ``(view_seed, i, v)`` before the item is made, so the same view is re-created bit for bit, in any process.
    - ``cache=PATH``: views as recorded in the cache (``K`` from its manifest), and each sample dict gets the cached
      ``t.logits``/``t.<tap>`` tensors (the cache's dtype); a cache built for other data or transforms is refused at
      construction, and every item is checked against the fingerprint of the image it was computed on.

    Use a data loader without persistent workers (workers made at each epoch see the current epoch).

    Args:
        dataset: the bundle's training dataset (``train#dataset``): a MONAI dataset or a wrapper of some.
        views: number of recorded views ``K`` (0: fresh augmentation; with a cache, 0 means the cache's ``K``).
        cache: a teacher cache folder (or ``None``/``""`` for none).
        view_seed: seed of the views (a cache stores its own; the default 0 matches the default build).
    """

    def __init__(self, dataset: Any, views: int = 0, cache: str | os.PathLike | TeacherCache | None = None,
                 view_seed: int = 0):
        self.dataset = dataset
        self.view_seed = int(view_seed)
        if int(views) < 0:
            raise ValueError(f"views must be >= 0, got {views}")
        self.cache = TeacherCache(cache) if isinstance(cache, (str, os.PathLike)) and str(cache) else cache or None
        self._leaves = _leaves(dataset) if (views or self.cache) else []
        if self.cache is not None:
            self.cache.check_data(data_signature(dataset), int(views), self.view_seed)
            self.cache.check_complete()
            if self.cache.items != len(dataset):
                raise ValueError(f"teacher cache {self.cache.path} holds {self.cache.items} items, the training "
                                 f"dataset has {len(dataset)}")
            views = self.cache.views
        self.views = int(views)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Select view ``epoch mod K`` for the next items (``epoch`` 0-based)."""
        self.epoch = int(epoch)

    @property
    def view(self) -> int:
        return self.epoch % self.views if self.views else 0

    def seed_views(self, index: int, view: int) -> None:
        """Re-seed every random transform of the dataset for item ``index``, view ``view``."""
        for k, leaf in enumerate(self._leaves):
            seed = int(np.random.SeedSequence([self.view_seed, int(index), int(view), k]).generate_state(1)[0])
            leaf.transform.set_random_state(seed=seed)

    def make(self, index: int, view: int) -> Any:
        """Item ``index`` as view ``view`` (without cached outputs): what the cache build runs the teacher on."""
        self.seed_views(index, view)
        return self.dataset[index]

    def __getitem__(self, index: int) -> Any:
        if not self.views:
            return self.dataset[index]
        view = self.view
        item = self.make(index, view)
        if self.cache is None:
            return item
        stored = self.cache.load(index, view)
        samples = _samples(item)
        prints = stored["fingerprint"]
        if len(samples) != prints.shape[0]:
            raise ValueError(f"teacher cache item {self.cache.item_path(index, view)} holds {prints.shape[0]} "
                             f"samples, the dataset made {len(samples)}")
        for j, sample in enumerate(samples):
            now = image_fingerprint(sample["image"])
            if now.shape != prints[j].shape or not torch.allclose(now, prints[j].float(), rtol=1e-4, atol=1e-4):
                raise ValueError(
                    f"teacher cache item {self.cache.item_path(index, view)} (item {index}, view {view}) was computed "
                    f"on another image than the one the dataset makes now ({_source_name(sample)}): the data or the "
                    "transform code changed since the build. Rebuild the cache."
                )
            for key, value in stored["outputs"].items():
                sample[key] = value[j]
        return item


# ---------------------------------------------------------------------------------------------------------------
# the teacher side: outputs from the batch instead of a forward
# ---------------------------------------------------------------------------------------------------------------


class CachedTeacher(TeacherSource):
    """A :class:`TeacherSource` serving the cached outputs that :class:`TeacherViews` put into the batch.

    It is built around the run's live teacher (weights loaded, never run on images), which says what the run needs:
    the cache is refused unless it was built from the same checkpoint (sha256) and holds every tap of the recipe
    at the same place. A :class:`~medkd.distill.ParaphrasedTeacher` (Graph Flow) encodes the cached raw taps with
    its frozen paraphrasers, as it does with live ones.

    Args:
        cache: the cache folder or :class:`TeacherCache`.
        live: the run's :class:`LiveTeacher` (or subclass).
    """

    def __init__(self, cache: str | os.PathLike | TeacherCache, live: LiveTeacher):
        super().__init__()
        if not isinstance(live, LiveTeacher):
            raise TypeError(f"a teacher cache replaces a LiveTeacher, got {type(live).__name__}")
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        self.cache.check_complete()
        self.cache.check_teacher(live)
        object.__setattr__(self, "live", live)  # not a sub-module: the teacher stays outside what is trained/saved
        self.tap_names = live.tap_names
        self.keys = ("t.logits", *(f"t.{n}" for n in live.tap_names))

    def forward(self, image: torch.Tensor, outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if outputs is None:
            raise RuntimeError(
                f"the teacher cache {self.cache.path} serves teacher outputs through the training batches: wrap the "
                "training dataset in medkd.distill.TeacherViews(dataset, cache=...) (the bundles' train#dataloader "
                "does this when teacher_cache is set)"
            )
        missing = [k for k in self.keys if k not in outputs]
        if missing:
            raise KeyError(f"the batch lacks the cached teacher outputs {missing} (it has "
                           f"{sorted(k for k in outputs)}); was the dataset wrapped with the same cache?")
        dtype = image.dtype if image.is_floating_point() else torch.float32
        out = {k: torch.as_tensor(outputs[k]).to(device=image.device, dtype=dtype) for k in self.keys}
        if out["t.logits"].shape[0] != image.shape[0] or out["t.logits"].shape[2:] != image.shape[2:]:
            raise ValueError(f"cached teacher logits {tuple(out['t.logits'].shape)} do not fit the batch image "
                             f"{tuple(image.shape)}")
        return self.live.encode_taps(out)


# ---------------------------------------------------------------------------------------------------------------
# the build
# ---------------------------------------------------------------------------------------------------------------


def _progress(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="view", mininterval=1.0, dynamic_ncols=True)


def build_teacher_cache(distiller: Any, dataset: Any, out: str | os.PathLike, views: int = 8, view_seed: int = 0,
                        dtype: str = "float16", extra_taps: Mapping[str, str] | Sequence[str] | None = None,
                        batch_size: int = 16, device: str | torch.device | None = None,
                        overwrite: bool = False) -> Path:
    """Run the frozen teacher of ``distiller`` over ``views`` recorded views of every item of ``dataset``; store it.

    Stores ``t.logits`` and every teacher tap the distiller's recipe reads plus ``extra_taps`` (so one cache can
    serve several recipes), in ``dtype``, one file per item and view under ``out``, with a manifest (see the module
    docstring). An existing cache for the same teacher, data, transforms, views and dtype is completed where it
    stopped; one for anything else is refused unless ``overwrite`` (then it is deleted first).

    Args:
        distiller: a :class:`~medkd.distill.Distiller` with a live teacher (built from the bundle's ``train.json``).
        dataset: the training dataset (``train#dataset``), before any random transform has run.
        out: the cache folder.
        views: recorded views per item ``K`` (>= 1).
        view_seed: seed of the views.
        dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        extra_taps: more teacher taps to store: names (alias or dotted path, the name is the spec) or name -> spec.
        batch_size: samples per teacher forward.
        device: where the teacher runs (default: where its parameters are).
        overwrite: replace a cache built for something else.

    Returns:
        the cache folder.
    """
    teacher = getattr(distiller, "teacher", distiller)
    if isinstance(teacher, CachedTeacher):
        teacher = teacher.live
    if not isinstance(teacher, LiveTeacher):
        raise ValueError(
            f"cannot build a teacher cache: {type(distiller).__name__} has no live teacher "
            f"({type(teacher).__name__}); self-distillation and supervised runs need no cache"
        )
    if not getattr(distiller, "supports_teacher_cache", True):
        raise ValueError(getattr(distiller, "teacher_cache_refusal", "this distiller cannot use a teacher cache"))
    if int(views) < 1:
        raise ValueError(f"views must be >= 1 for a cache, got {views}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    extra = dict(extra_taps) if isinstance(extra_taps, Mapping) else {n: n for n in (extra_taps or [])}
    taps = {**teacher.taps.specs, **extra}
    source = teacher if set(taps) == set(teacher.taps.specs) else LiveTeacher(teacher.network, teacher.checkpoint, taps)
    if device is not None:
        source.network.to(device)
    signature = data_signature(dataset)
    manifest = {
        "format": CACHE_FORMAT,
        "complete": False,
        "teacher": {"checkpoint": os.path.abspath(teacher.checkpoint), "sha256": file_sha256(teacher.checkpoint),
                    "network": type(teacher.network).__name__},
        "taps": dict(sorted(taps.items())),
        "keys": ["t.logits", *(f"t.{n}" for n in sorted(taps))],
        "dtype": dtype,
        "views": int(views),
        "view_seed": int(view_seed),
        "items": len(dataset),
        "entries": {"sha256": _sha(signature["entries"]), "value": signature["entries"]},
        "transforms": {"sha256": _sha(signature["transforms"]), "value": signature["transforms"]},
    }
    out = Path(out)
    manifest_path = out / MANIFEST
    identity = ("format", "teacher", "taps", "dtype", "views", "view_seed", "items", "entries", "transforms")
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        differs = [k for k in identity if old.get(k) != manifest[k]]
        if differs and not overwrite:
            raise ValueError(
                f"{out} holds a teacher cache built for another {', '.join(differs)} "
                f"({_first_difference(old.get(differs[0]), manifest[differs[0]], differs[0])}): pass overwrite "
                "(--overwrite) to replace it, or choose another folder"
            )
        if differs:
            shutil.rmtree(out)
        elif old.get("complete"):
            logger.info(f"teacher cache {out} is complete; nothing to do")
            return out
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not a teacher cache: choose an empty or new folder, or pass overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write_probe.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write the teacher cache to {out}: {e}") from None
    for stale in out.rglob(".*.tmp"):  # temporary files of an interrupted build
        stale.unlink(missing_ok=True)
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1).encode())

    cache = TeacherCache(out)
    replay = TeacherViews(dataset, views=int(views), view_seed=int(view_seed))
    todo = [(i, v) for v in range(int(views)) for i in range(len(dataset)) if not cache.item_path(i, v).is_file()]
    total = len(dataset) * int(views)
    start = time.time()
    store = DTYPES[dtype]
    net_device = next(source.network.parameters(), torch.zeros(())).device
    bar = _progress(total, total - len(todo), "teacher cache")
    pending: list[tuple[int, int, list[dict]]] = []

    def flush() -> None:
        samples = [s for _, _, ss in pending for s in ss]
        by_shape: dict[tuple, list[int]] = {}
        for k, s in enumerate(samples):
            by_shape.setdefault(tuple(torch.as_tensor(s["image"]).shape), []).append(k)
        results: list[dict | None] = [None] * len(samples)
        for idx in by_shape.values():
            image = torch.stack([torch.as_tensor(samples[k]["image"]).as_subclass(torch.Tensor) for k in idx])
            outputs = source.raw_outputs(image.to(net_device).float())  # raw taps (never paraphrased)
            for j, k in enumerate(idx):
                results[k] = {key: outputs[key][j].as_subclass(torch.Tensor).to("cpu", store).clone()
                              for key in manifest["keys"]}
        k = 0
        for index, view, ss in pending:
            n = len(ss)
            chunk = results[k:k + n]
            k += n
            record = {
                "outputs": {key: torch.stack([r[key] for r in chunk]) for key in manifest["keys"]},  # type: ignore[index]
                "fingerprint": torch.stack([image_fingerprint(s["image"]) for s in ss]),
            }
            atomic_torch_save(record, cache.item_path(index, view))
            bar.update(1)
        pending.clear()

    try:
        for index, view in todo:
            pending.append((index, view, _samples(replay.make(index, view))))
            if sum(len(ss) for _, _, ss in pending) >= batch_size:
                flush()
        if pending:
            flush()
    finally:
        bar.close()
    manifest["complete"] = True
    manifest["build_seconds"] = round(time.time() - start, 2)
    manifest["bytes"] = sum(f.stat().st_size for f in (out / "views").rglob("*.pt"))
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1).encode())
    logger.info(f"teacher cache {out}: {total} item views, {manifest['bytes'] / 2**20:.1f} MiB, "
                f"{manifest['build_seconds']:.0f} s for the {len(todo)} views built now")
    print(f"teacher cache {out}: {total} item views ({len(dataset)} items x {views} views), "
          f"{manifest['bytes'] / 2**20:.1f} MiB, built {len(todo)} in {manifest['build_seconds']:.1f} s", flush=True)
    return out
