"""``python -m medkd ...``: prepare datasets, run the demo.

    python -m medkd prepare demo --out DIR [--subjects 12] [--seed 0] [--dims 2|3] [--spacing 2.0]
    python -m medkd demo [--out demo_results] [--epochs 30] [--regime few_labels|full] [--kd_recipe R] [--kd_weight W]
                         [--offline] [--cache_views 8] [--teacher auto|train|rebuild]
    python -m medkd profile TARGET [TARGET ...] [--size 256,256] [--pairs T/S,...] [--out profile.md]
    python -m medkd export-bundle bundles/NAME --out DIR [--version X] [--ckpt PATH] [--teacher PATH] [--overwrite]
    python -m medkd cache-teacher bundles/NAME [--out DIR] [--recipe R.json] [--views 8] [--taps low,high] [--KEY VALUE]
    python -m medkd compress TEACHER_BUNDLE --data DATALIST_OR_IMAGE_FOLDER --out DIR [--student quarter] [--epochs 20]
        [--labels none|datalist] [--baseline] [--batch_size N] [--teacher_views K]   (docs/compress.md)
"""

from __future__ import annotations

from pathlib import Path

import fire

__all__ = ["main", "prepare", "demo", "profile", "export_bundle", "cache_teacher", "compress"]

DATASETS = ("demo",)


def prepare(dataset: str, out: str, src: str | None = None, **options) -> None:
    """Write DATASET as NIfTI + an MSD-style datalist under OUT; prints and returns the datalist path.

    Datasets: ``demo`` (the embedded MNI152 pseudo-subjects; options: subjects, seed, dims, spacing,
    slices_per_subject, and the variation strengths of :class:`medkd.data.DemoConfig`). The public datasets
    ``msd``, ``lits``, ``kits19``, ``synapse``, ``chaos``, ``flare22``, ``busi``, ``cvc_clinicdb``, ``chasedb1``,
    ``drive``, ``stare`` and ``m2caiseg`` read the download at ``--src`` (options: split, dims, slices, window,
    out_range, resize, label_map, val_fraction, test_fraction, seed, labelled_fraction, data_fraction, and the
    dataset's own, e.g. annotator or mask_threshold; see docs/datasets.md, :mod:`medkd.data.datasets` and
    :class:`medkd.data.convert.ConvertOptions`).
    """
    from medkd.data.datasets import READERS, prepare_dataset

    if dataset == "demo":
        from medkd.data.demo import prepare_demo

        path = prepare_demo(out, **options)
    elif dataset in READERS:
        if src is None:
            raise ValueError(f"prepare {dataset} needs --src DOWNLOAD_DIR (the public download in its released layout)")
        path = prepare_dataset(dataset, src, out, **options)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join((*DATASETS, *READERS))}")
    print(f"wrote {path}")


def demo(out: str = "demo_results", epochs: int = 30, subjects: int = 12, seed: int = 0, data: str = "data/demo2d",
         offline: bool = False, cache_views: int = 8, regime: str = "few_labels", student_steps: int = 462,
         labelled_fraction: float = 0.125, kd_recipe: str = "recipes/kd_logits_t1.json", kd_weight=3.0,
         teacher: str = "auto") -> None:
    """The end-to-end demo: data -> teacher -> student without KD -> student with KD -> evaluation table and figure.

    ``--regime few_labels`` (default): the students keep the labels of ``labelled_fraction`` of the training subjects
    and train ``student_steps`` optimiser steps; the KD student (``kd_recipe`` of the EMKD bundle, ``kd_weight`` or the
    recipe's weight) also learns from the teacher on the other subjects' images (docs/results.md, regime (h): 1 labelled subject, logits KD T 1 at weight 3).
    ``--regime full``: every label, teacher / no-KD student / EMKD student for ``epochs`` each. ``--offline``: the KD
    student trains from a teacher cache (``cache_views`` recorded views), built once after the teacher
    (docs/offline_kd.md). ``--teacher auto`` (default) uses the shipped teacher checkpoint when it was trained on this
    data with this teacher config, epochs and seed (else trains it); ``train`` always trains it; ``rebuild`` trains it
    and writes it as the shipped checkpoint."""
    from medkd.demo import run_demo

    run_demo(Path(out), epochs=epochs, subjects=subjects, seed=seed, data_dir=Path(data), offline=offline,
             cache_views=cache_views, regime=regime, student_steps=student_steps, labelled_fraction=labelled_fraction,
             kd_recipe=kd_recipe, kd_weight=None if kd_weight is None else float(kd_weight), teacher=teacher)


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    return list(value)


def profile(*targets: str, size=None, batch: int = 1, recipe: str | None = None, pairs=None, repeats: int = 20,
            warmup: int = 5, memory: bool = True, out: str = "profile.md", title: str = "Network cost") -> None:
    """Parameters, FLOPs, CPU latency and peak memory of networks; prints a markdown table and writes it to OUT.

    TARGET: a network class with keyword arguments, e.g. ``"ENet(in_channels=1, out_channels=2)"`` (medkd.networks,
    monai.networks.nets or a dotted path), optionally labelled ``"S1=SmallUNet(channels=(16, 32, 64))"``; or a
    bundle (``emkd_segmentation`` or a bundle directory): its teacher_def and network_def at its roi_size, with
    ``--recipe NAME`` applied. ``--size H,W`` sets the spatial input size (default 256x256 or the bundle's roi).
    ``--pairs TEACHER/STUDENT,...`` adds teacher/student ratios (a bundle adds its own pair). OUT also gets a
    ``.json`` twin with the raw figures.
    """
    import json

    from medkd.io import atomic_write_bytes
    from medkd.profiling import profile_markdown, profile_targets

    if not targets:
        raise ValueError("give at least one TARGET: a network like 'ENet(in_channels=1)' or a bundle name")
    spatial = [int(s) for s in _as_list(size)] or None
    rows, ratios = profile_targets(targets, size=spatial, batch=batch, recipe=recipe, pairs=_as_list(pairs),
                                   repeats=repeats, warmup=warmup, memory=memory,
                                   progress=lambda msg: print(f"[profile] {msg}", flush=True))
    text = profile_markdown(rows, ratios, title=title)
    print(text)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, text.encode())
    atomic_write_bytes(out_path.with_suffix(".json"), json.dumps({"rows": rows, "ratios": ratios}, indent=2).encode())
    print(f"wrote {out_path}")


def export_bundle(bundle: str, out: str, version: str | None = None, ckpt: str | None = None,
                  teacher: str | None = None, overwrite: bool = False, large_files_url: str | None = None,
                  large_files_dir: str | None = None, changelog: str | None = None) -> None:
    """Write BUNDLE (a folder under bundles/) to OUT as a self-contained MONAI model-zoo bundle; see docs/export.md.

    The medkd code the configs need is vendored as ``<bundle>_medkd`` and every reference rewritten to it; the
    student (``models/model.pt`` of the bundle or ``--ckpt``) and, for KD bundles, the teacher (``--teacher`` or
    ``models/teacher.pt``) are checked against the configs' networks; metadata is pinned to the installed releases
    (``--version X.Y.Z`` sets its version); files over 25 MB move to ``<OUT>_large_files`` and into
    ``large_files.yml`` (``--large_files_url`` is where they will be uploaded). OUT must not exist unless
    ``--overwrite`` is given.
    """
    from medkd.export import export_bundle as export

    path = Path(bundle)
    if not path.is_dir() and (Path("bundles") / bundle).is_dir():
        path = Path("bundles") / bundle
    report = export(path, out, version=None if version is None else str(version), ckpt=ckpt, teacher=teacher,
                    overwrite=overwrite, large_files_url=large_files_url, large_files_dir=large_files_dir,
                    changelog=changelog)
    scope = "the whole package" if report.whole_package else f"{len(report.modules)} modules"
    print(f"wrote {report.path} (code: {report.package}, {scope}; recipes: {len(report.recipes)}"
          + (f", left out: {', '.join(report.skipped_recipes)}" if report.skipped_recipes else "") + ")")
    for rel, where in report.large_files.items():
        print(f"large file {rel} -> {where} (upload it; see large_files.yml)")


def cache_teacher(bundle: str, out: str | None = None, recipe: str | None = None, views: int = 8, taps=None,
                  dtype: str = "float16", batch_size: int = 16, view_seed: int = 0, overwrite: bool = False,
                  **overrides) -> None:
    """Run BUNDLE's frozen teacher once over recorded augmented views of its training data and store its outputs.

    The cache (``--out``, default ``<bundle>/teacher_cache``) serves every later run of any recipe and seed that uses
    this teacher: ``python -m monai.bundle run ... --teacher_cache PATH``. ``--recipe a.json+b.json`` applies recipe
    files (relative to the bundle's ``configs/``) as the run will; ``--taps low,high`` stores more teacher taps so one
    cache serves several recipes; ``--views K`` recorded views per item (epoch ``e`` trains on view ``e mod K``);
    every other ``--key value`` overrides the bundle config (e.g. ``--teacher_ckpt``, ``--dataset_dir``). Interrupted,
    the same command completes the cache; a cache in OUT built for anything else is refused without ``--overwrite``.
    Same as ``python -m monai.bundle run --config_file "['configs/train.json',...,'configs/cache_teacher.json']"``.
    """
    from monai.bundle import run

    root = Path(bundle)
    if not root.is_dir() and (Path("bundles") / bundle).is_dir():
        root = Path("bundles") / bundle
    configs = root / "configs"
    if not (configs / "cache_teacher.json").is_file():
        raise FileNotFoundError(f"{root} has no configs/cache_teacher.json: is it a medkd KD bundle folder?")
    files = [configs / "train.json"]
    for part in [p for p in str(recipe or "").split("+") if p]:
        path = Path(part) if Path(part).is_absolute() else configs / part
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        files.append(path)
    files.append(configs / "cache_teacher.json")
    args = {"cache_views": int(views), "cache_dtype": dtype, "cache_batch_size": int(batch_size),
            "cache_view_seed": int(view_seed), "cache_overwrite": bool(overwrite), "cache_taps": _as_list(taps)}
    if out:
        args["cache_dir"] = str(Path(out).absolute())
    run(config_file=[str(f) for f in files], bundle_root=str(root), **args, **overrides)


def compress(teacher_bundle: str, data: str, out: str, student="quarter", epochs: int = 20, labels: str = "none",
             baseline: bool = False, seed: int = 0, batch_size: int | None = None, val_interval: int = 1,
             learning_rate: float | None = None, teacher_views: int = 0) -> None:
    """Compress a MONAI bundle (TEACHER_BUNDLE) into a student trained by KD on DATA (datalist JSON or image folder);
    writes OUT/report.md, OUT/report.json and the student bundle OUT/compressed_<teacher>; see docs/compress.md.

    ``--student`` half|quarter|eighth (the teacher's architecture at that width), a class name or a _target_ dict;
    ``--labels none`` (label-free: the teacher's soft outputs are the only target) or ``datalist``; ``--baseline``
    also trains the student without KD (needs labels); ``--teacher_views K`` trains offline from K cached views of
    the teacher's outputs (fewer teacher forwards when epochs > K). Rerunning the same command resumes.
    """
    from medkd.compress import compress as run

    run(teacher_bundle, data, out, student=student, epochs=epochs, labels=labels, baseline=baseline, seed=seed,
        batch_size=batch_size, val_interval=val_interval, learning_rate=learning_rate, teacher_views=teacher_views)


def main() -> None:
    fire.Fire({"prepare": prepare, "demo": demo, "profile": profile, "export-bundle": export_bundle,
               "cache-teacher": cache_teacher, "compress": compress}, name="medkd")
