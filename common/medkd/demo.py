"""The end-to-end demo behind ``make demo``: teacher vs no-KD student vs KD student on the embedded dataset.

By default the regime where the KD study (docs/results.md) found distillation pays: few labels, the teacher trained on
more. Every training and evaluation step is a ``python -m monai.bundle run`` of the repository's bundles (its full
output goes to ``<out>/logs/<step>.log``; the console gets one line per validation and per step). The baseline
student is the EMKD bundle's ``network_def`` trained by the supervised bundle with the same labels, steps and
schedule, so the only differences between the two students are the teacher and the unlabelled images.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medkd.data.demo import LABELS

__all__ = ["run_demo", "bundles_dir", "first_iteration_scalars", "SHIPPED_TEACHER", "teacher_fingerprint",
           "shipped_teacher"]

EVAL_LINE = ("Epoch[", "Metrics --")
COLORS = {1: (255, 160, 0), 2: (40, 170, 255)}  # grey matter orange, white matter blue
# The demo's teacher, shipped so that `make demo` need not train it (network weights only, the file the supervised
# bundle writes as model.pt) and its record (.json: what it was trained on, how long, the command that rebuilds it).
SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "demo_teacher.pt"
TEACHER_BUNDLE = "supervised_segmentation"
REBUILD_COMMAND = "python -m medkd demo --teacher rebuild"


def bundles_dir() -> Path:
    """The repository's ``bundles/`` folder (the package is installed in editable mode from the repository)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "bundles" / "emkd_segmentation").is_dir():
            return root / "bundles"
    raise FileNotFoundError("cannot find the medkd bundles/ folder; run the demo from the repository root")


def _run_bundle(name: str, bundle: str, configs: list[str], overrides: dict, log_dir: Path) -> float:
    """Run one ``python -m monai.bundle run``; stream its log to a file and its validation lines to the console."""
    root = bundles_dir() / bundle
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str([str(root / "configs" / c) for c in configs])]
    cmd += ["--bundle_root", str(root)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    log_path = log_dir / f"{name}.log"
    start = time.time()
    print(f"[{name}] python -m monai.bundle run {bundle} {' + '.join(configs)} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            if all(s in line for s in EVAL_LINE):
                print(f"  [{name}] {line.split(' - ')[-1].strip()}", flush=True)
        code = proc.wait()
    elapsed = time.time() - start
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"step '{name}' failed (exit code {code}); last lines of {log_path}:\n{tail}")
    print(f"[{name}] done in {elapsed:.0f} s", flush=True)
    return elapsed


def _ensure_data(data_dir: Path, subjects: int, seed: int) -> Path:
    from medkd.data.demo import prepare_demo

    datalist = data_dir / "datalist.json"
    if datalist.is_file():
        gen = json.loads(datalist.read_text()).get("generator", {})
        if gen.get("subjects") == subjects and gen.get("seed") == seed and gen.get("dims") == 2:
            print(f"[data] reusing {datalist}")
            return datalist
    start = time.time()
    print(f"[data] writing the demo dataset ({subjects} pseudo-subjects, seed {seed}) to {data_dir}", flush=True)
    path = prepare_demo(data_dir, subjects=subjects, seed=seed, dims=2)
    print(f"[data] done in {time.time() - start:.0f} s", flush=True)
    return path


def teacher_fingerprint(datalist: Path, epochs: int, seed: int) -> dict:
    """What the demo's teacher depends on: the teacher bundle's ``train.json`` (sha256), the bytes of every training and
    validation file of the datalist (one sha256 over their relative paths and contents), ``epochs`` and ``seed``, and
    the torch / MONAI versions (recorded, not compared: another build may round differently)."""
    import hashlib

    import monai
    import torch

    from medkd.io import file_sha256

    datalist = Path(datalist)
    lists = json.loads(datalist.read_text())
    digest = hashlib.sha256()
    for key in ("training", "validation"):
        for item in lists.get(key, []):
            for field in ("image", "label"):
                if field in item:
                    digest.update(f"{key}/{field}/{item[field]}:".encode())
                    digest.update(file_sha256(datalist.parent / item[field]).encode())
    config = bundles_dir() / TEACHER_BUNDLE / "configs" / "train.json"
    return {"bundle": TEACHER_BUNDLE, "config_sha256": file_sha256(config), "data_sha256": digest.hexdigest(),
            "epochs": int(epochs), "seed": int(seed), "torch": torch.__version__, "monai": monai.__version__}


def shipped_teacher(fingerprint: dict, path: Path | None = None) -> tuple[Path | None, str]:
    """The shipped teacher checkpoint (``path``, default ``SHIPPED_TEACHER``) when its record matches ``fingerprint``
    (bundle config, data, epochs, seed), else ``None``; with the reason either way (printed by the demo)."""
    from medkd.io import file_sha256

    path = Path(path) if path is not None else SHIPPED_TEACHER
    record_path = path.with_suffix(".json")
    if not path.is_file() or not record_path.is_file():
        return None, f"no shipped teacher at {path}"
    try:
        record = json.loads(record_path.read_text())
    except ValueError as err:
        return None, f"the shipped teacher's record {record_path} is not valid JSON ({err})"
    if record.get("sha256") != file_sha256(path):
        return None, f"{path.name} does not match the sha256 of its record {record_path.name}"
    differ = [k for k in ("bundle", "config_sha256", "data_sha256", "epochs", "seed") if record.get(k) != fingerprint[k]]
    if differ:
        return None, (f"the shipped teacher was trained with another {', '.join(differ)} than this demo uses "
                      f"(rebuild it: {REBUILD_COMMAND})")
    return path, (f"using the shipped teacher {path.name} (trained {record['epochs']} epochs in "
                  f"{record['train_seconds']:.0f} s by `{REBUILD_COMMAND}`; --teacher train trains it here)")


def _summary(eval_dir: Path, metric: str) -> dict[str, float]:
    """Per-class mean and overall mean from MONAI's MetricsSaver ``<metric>_summary.csv``."""
    with open(eval_dir / f"{metric}_summary.csv") as f:
        return {row["class"]: float(row["mean"]) for row in csv.DictReader(f)}


_FIRST_ITER = re.compile(r"Epoch: 1/\d+, Iter: 1/\d+ -- (.*)$")


def first_iteration_scalars(log: Path) -> dict[str, float]:
    """The ``name: value`` pairs (loss, loss_*, raw_*) of the first StatsHandler iteration line of a training log."""
    for line in Path(log).read_text().splitlines():
        m = _FIRST_ITER.search(line)
        if m:
            return {k: float(v) for k, v in re.findall(r"(\w+): ([-+0-9.eE]+|nan|inf)", m.group(1))}
    raise ValueError(f"no first-iteration line in {log}")


def _network(bundle: str, key: str = "network_def"):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundles_dir() / bundle / "configs" / "train.json"))
    return parser.get_parsed_content(key, instantiate=True)


def _overlay(image: np.ndarray, label: np.ndarray, scale: int = 3):
    from PIL import Image

    lo, hi = np.percentile(image, [1, 99.5])
    gray = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(gray[..., None] * 255.0, 3, axis=-1)
    for cls, color in COLORS.items():
        m = label == cls
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.asarray(color, dtype=float)
    rgb = np.rot90(rgb.astype(np.uint8))  # anterior up
    return Image.fromarray(np.ascontiguousarray(rgb)).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)


def _figure(datalist: Path, models: dict[str, Path], out_png: Path, rows: int = 2) -> None:
    """Image | ground truth | each model's prediction, for the test slices with the most tissue."""
    import nibabel as nib
    from PIL import Image, ImageDraw

    from medkd.data import load_datalist

    test = load_datalist(datalist, "test")
    by_subject: dict[str, tuple[int, dict]] = {}
    for item in test:
        tissue = int((np.asarray(nib.load(item["label"]).dataobj) > 0).sum())
        subject = Path(item["image"]).name.split("_")[0]
        if tissue > by_subject.get(subject, (-1, {}))[0]:
            by_subject[subject] = (tissue, item)
    picked = [item for _, item in sorted(by_subject.values(), key=lambda t: -t[0])[:rows]]
    panels = []
    for item in picked:
        image = np.asarray(nib.load(item["image"]).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(item["label"]).dataobj).astype(int)
        stem = Path(item["image"]).name.replace(".nii.gz", "")
        row = [("image", _overlay(image, np.zeros_like(label))), ("ground truth", _overlay(image, label))]
        for name, pred_dir in models.items():
            pred = np.asarray(nib.load(pred_dir / f"{stem}_seg.nii.gz").dataobj).astype(int).reshape(label.shape)
            row.append((name, _overlay(image, pred)))
        panels.append(row)
    w, h = panels[0][0][1].size
    title_h = 18
    canvas = Image.new("RGB", (w * len(panels[0]), (h + title_h) * len(panels)), "black")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(panels):
        for c, (title, img) in enumerate(row):
            canvas.paste(img, (c * w, r * (h + title_h) + title_h))
            draw.text((c * w + 4, r * (h + title_h) + 3), title, fill="white")
    canvas.save(out_png)


def _schedule(steps: int) -> dict:
    """Overrides that spread the bundles' cosine learning rate over ``steps`` optimiser steps (stepped per iteration),
    so runs with different epoch lengths share one schedule (as in tools/kd_study.py)."""
    return {"lr_scheduler#T_max": steps, "train#handlers#0#epoch_level": False}


def _runs(regime: str, datalist: Path, out: Path, epochs: int, seed: int, student_steps: int, labelled_fraction: float,
          kd_recipe: str, kd_weight: float | None, batch_size: int = 16) -> tuple[dict, dict[str, str]]:
    """The demo's trainings ``{name: (bundle, configs, overrides)}`` and their table titles.

    ``few_labels`` (the default, where the KD study found distillation pays): the teacher trains on every labelled
    training subject; the students keep the labels of ``labelled_fraction`` of them (drawn with ``seed``: the same
    subjects for both); the no-KD student trains on those alone, the KD student on them plus the other training
    subjects' images without labels (``recipes/unlabelled.json`` with no extra list) — both ``student_steps``
    optimiser steps. ``full``: every label for everyone, teacher / no-KD student / EMKD student for ``epochs``."""
    from medkd.data import load_datalist, split_labelled, steps_per_epoch, epochs_for

    student_def = f"%{bundles_dir() / 'emkd_segmentation' / 'configs' / 'train.json'}#network_def"
    teacher_ckpt = out / "teacher" / "model.pt"
    teacher = ("supervised_segmentation", ["train.json"], {"epochs": epochs})
    if regime == "full":
        runs = {"teacher": teacher,
                "baseline": ("supervised_segmentation", ["train.json"], {"network_def": student_def, "epochs": epochs}),
                "kd": ("emkd_segmentation", ["train.json"], {"teacher_ckpt": teacher_ckpt, "epochs": epochs})}
        return runs, {"teacher": "teacher (supervised)", "baseline": "student without KD", "kd": "student with EMKD"}
    if regime != "few_labels":
        raise ValueError(f"unknown demo regime {regime!r}; choose 'few_labels' or 'full'")
    split = split_labelled(load_datalist(datalist, "training"), labelled_fraction, seed, "case")
    n_lab, n_unl = len(split["labelled"]), len(split["unlabelled"])
    def subjects(items) -> str:
        n = len({i.get("case", i["image"]) for i in items})
        return f"{n} subject" + ("" if n == 1 else "s")
    few = {"labelled_fraction": labelled_fraction, "batch_size": batch_size, **_schedule(student_steps)}
    control_epochs = epochs_for(student_steps, steps_per_epoch("labelled", n_lab, 0, batch_size), "the no-KD student")
    kd_epochs = epochs_for(student_steps, steps_per_epoch("unlabelled", n_lab, n_unl, batch_size), "the KD student")
    kd_overrides = {"teacher_ckpt": teacher_ckpt, "unlabelled_list": "$None", "epochs": kd_epochs,
                    "val_interval": max(1, kd_epochs // 10), **few}
    if kd_weight is not None:
        kd_overrides["kd_terms#0#weight"] = kd_weight
    runs = {"teacher": teacher,
            "baseline": ("supervised_segmentation", ["train.json", "recipes/labelled_subset.json"],
                         {"network_def": student_def, "epochs": control_epochs,
                          "val_interval": max(1, control_epochs // 10), **few}),
            "kd": ("emkd_segmentation", ["train.json", "recipes/unlabelled.json", kd_recipe], kd_overrides)}
    name = Path(kd_recipe).stem
    every = len({i.get("case", i["image"]) for i in [*split["labelled"], *split["unlabelled"]]})
    titles = {"teacher": f"teacher (supervised, {every} labelled subjects)",
              "baseline": f"student without KD ({subjects(split['labelled'])} labelled)",
              "kd": f"student with KD ({name}; {subjects(split['labelled'])} labelled + "
                    f"{subjects(split['unlabelled'])} without labels)"}
    return runs, titles


def run_demo(out: Path, epochs: int = 30, subjects: int = 12, seed: int = 0, data_dir: Path = Path("data/demo2d"),
             offline: bool = False, cache_views: int = 8, regime: str = "few_labels", student_steps: int = 462,
             labelled_fraction: float = 0.125, kd_recipe: str = "recipes/kd_logits_t1.json",
             kd_weight: float | None = 3.0, teacher: str = "auto") -> Path:
    """Run the whole demo; returns the path of the markdown results table.

    ``regime``: ``few_labels`` (default; see :func:`_runs`: teacher on every label, the students on
    ``labelled_fraction`` of the training subjects' labels for ``student_steps`` optimiser steps, the KD student
    (``kd_recipe`` in the EMKD bundle, KD weight ``kd_weight`` or the recipe's) also on the other subjects' images)
    or ``full`` (every label; teacher / no-KD student / EMKD student, ``epochs`` each). ``offline``: the KD student
    reads the teacher's outputs from a cache of ``cache_views`` recorded views per training item (views cycle),
    built once right after the teacher (``<out>/teacher_cache``), instead of running the teacher. ``teacher``:
    ``auto`` uses the shipped teacher checkpoint (``SHIPPED_TEACHER``) when its record matches this demo's data, teacher
    config, epochs and seed, and trains the teacher otherwise; ``train`` always trains it; ``rebuild`` trains it and
    writes it, with its record, as the shipped checkpoint."""
    from medkd.io import atomic_write_bytes, file_sha256
    from medkd.profiling import profile_network

    if teacher not in ("auto", "train", "rebuild"):
        raise ValueError(f"unknown teacher mode {teacher!r}; choose 'auto', 'train' or 'rebuild'")
    start = time.time()
    out = Path(out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    datalist = _ensure_data(Path(data_dir).resolve(), subjects, seed)
    runs, titles = _runs(regime, datalist, out, epochs, seed, student_steps, labelled_fraction, kd_recipe, kd_weight)
    common = {"dataset_dir": datalist.parent, "num_workers": 0, "resume": False, "seed": seed}
    timings, shipped = {}, None
    fingerprint = teacher_fingerprint(datalist, epochs, seed)
    if teacher == "auto":
        shipped, why = shipped_teacher(fingerprint)
        print(f"[teacher] {why}" + ("" if shipped else "; training the teacher"), flush=True)
    for name, (bundle, configs, extra) in runs.items():
        dirs = {"ckpt_dir": out / name, "output_dir": out / name / "eval"}
        if name == "teacher" and shipped is not None:
            (out / "teacher").mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / "teacher" / "model.pt", shipped.read_bytes())
            timings[name] = json.loads(shipped.with_suffix(".json").read_text())["train_seconds"]
            titles[name] += " — shipped checkpoint, training time as recorded"
            continue
        if offline and name == "kd":
            timings["teacher_cache"] = _run_bundle(
                "cache_teacher", bundle, [*configs, "cache_teacher.json"],
                {**common, **dirs, **extra, "cache_dir": out / "teacher_cache", "cache_views": cache_views,
                 "cache_overwrite": True}, logs)
            extra = {**extra, "teacher_cache": out / "teacher_cache"}
            titles["kd"] += " (offline, teacher cache)"
        timings[name] = _run_bundle(f"train_{name}", bundle, configs, {**common, **dirs, **extra}, logs)
        if name == "teacher" and teacher == "rebuild":
            weights = (out / "teacher" / "model.pt").read_bytes()
            SHIPPED_TEACHER.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(SHIPPED_TEACHER, weights)
            record = {**fingerprint, "sha256": file_sha256(SHIPPED_TEACHER), "train_seconds": round(timings[name], 1),
                      "rebuild": REBUILD_COMMAND}
            atomic_write_bytes(SHIPPED_TEACHER.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
            print(f"[teacher] wrote {SHIPPED_TEACHER} and its record", flush=True)
    for name, (bundle, configs, extra) in runs.items():
        dirs = {"ckpt_dir": out / name, "output_dir": out / name / "test", "save_predictions": True}
        overrides = {"dataset_dir": datalist.parent, "num_workers": 0, **dirs}
        if "network_def" in extra:
            overrides["network_def"] = extra["network_def"]
        _run_bundle(f"evaluate_{name}", bundle, ["train.json", "evaluate.json"], overrides, logs)

    print("[profile] parameters, FLOPs and CPU latency per 96x112 slice", flush=True)
    cost = {"repeats": 100, "warmup": 20, "memory": False}  # long runs: the median must outlast VM hiccups
    teacher_cost = profile_network(_network("supervised_segmentation"), (1, 1, 96, 112), **cost)
    student_cost = profile_network(_network("emkd_segmentation"), (1, 1, 96, 112), **cost)
    costs = {"teacher": teacher_cost, "baseline": student_cost, "kd": student_cost}  # both students: one network
    labels = {f"class{int(k) - 1}": v for k, v in LABELS.items() if k != "0"}
    rows, results = [], {}
    for name in runs:
        dice = _summary(out / name / "test", "val_mean_dice")
        hd95 = _summary(out / name / "test", "val_hd95")
        c = costs[name]
        results[name] = {"title": titles[name], "dice": {labels[k]: dice[k] for k in labels}, "mean_dice": dice["mean"],
                         "hd95_voxels": hd95["mean"], "train_seconds": timings[name], **c}
        rows.append(
            f"| {titles[name]} | {c['params'] / 1e3:.1f}k | {c['flops'] / 1e9:.3f} | {c['latency_ms']:.2f} | "
            + " | ".join(f"{dice[k]:.4f}" for k in labels)
            + f" | **{dice['mean']:.4f}** | {hd95['mean']:.2f} | {timings[name]:.0f} |"
        )
    header = (
        "| model | parameters | GFLOPs / slice | CPU latency (ms / slice) | "
        + " | ".join(f"Dice {v}" for v in labels.values())
        + " | mean Dice | HD95 (voxels) | training time (s) |"
    )
    table = "\n".join([header, "|" + "---|" * (header.count("|") - 1), *rows])
    n_test = len(json.loads(datalist.read_text())["test"])
    if regime == "full":
        setup = (f"{epochs} epochs for every model, same optimiser, schedule, batch size and seed; every training label "
                 "for every model.")
    else:
        setup = (f"Few labels: the teacher trained {epochs} epochs on every labelled training subject; both students keep "
                 f"the labels of {labelled_fraction:.0%} of the training subjects (drawn with seed {seed}, the same for "
                 f"both) and train exactly {student_steps} optimiser steps (cosine learning rate over those steps, same "
                 "optimiser, batch size, augmentation and seed); the KD student also sees the other training subjects' "
                 f"images without their labels and the teacher's outputs on every image ({kd_recipe}"
                 + (f", KD weight {kd_weight}" if kd_weight is not None else "") + "). Where this pays and where it does "
                 "not, over 3 seeds and every recipe: docs/results.md.")
    text = "\n".join([
        "# medkd demo results",
        "",
        f"Embedded MNI152 demo dataset ({subjects} pseudo-subjects, seed {seed}, 2 mm axial slices 96x112); "
        f"test split: {n_test} slices of held-out subjects. {setup} Dice and HD95 (95th percentile Hausdorff distance, in 2 mm voxels) are averaged over test "
        "slices per class. FLOPs are counted by torch.utils.flop_counter (2 per multiply-accumulate); latency is the "
        "median eval-mode forward time of one slice on this machine's CPU.",
        "",
        table,
        "",
        "![test slices: image, ground truth, teacher, student without KD, student with KD](figure.png)",
        "",
        *([f"The KD student trained from a teacher cache ({cache_views} recorded views per training item), built "
           f"once in {timings['teacher_cache']:.0f} s; its training time excludes the build."] if offline else []),
        *([f"The teacher is the shipped checkpoint ({SHIPPED_TEACHER.name}: trained by `{REBUILD_COMMAND}` on this "
           "data with this teacher config, epochs and seed; its Dice above is measured here); `--teacher train` trains it "
           "in the demo instead."] if shipped is not None else []),
        f"Total demo time: {time.time() - start:.0f} s" + (" (the teacher's training not included)." if shipped else "."),
        "",
    ])
    md = out / "results.md"
    md.write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _figure(datalist, {titles[n]: out / n / "test" / "predictions" for n in runs}, out / "figure.png")
    print("\n" + table + f"\n\nwrote {md}, {out / 'results.json'} and {out / 'figure.png'} ({time.time() - start:.0f} s in all)")
    return md
