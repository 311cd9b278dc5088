"""The end-to-end demo behind ``make demo``: teacher vs no-KD student vs EMKD student on the embedded dataset.

Every training and evaluation step is a ``python -m monai.bundle run`` of the repository's bundles (its full
output goes to ``<out>/logs/<step>.log``; the console gets one line per validation and per step). The baseline
student is the EMKD bundle's ``network_def`` trained by the supervised bundle with the same schedule, so the
only difference between the two students is the KD recipe.
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

__all__ = ["run_demo", "bundles_dir", "first_iteration_scalars"]

EVAL_LINE = ("Epoch[", "Metrics --")
COLORS = {1: (255, 160, 0), 2: (40, 170, 255)}  # grey matter orange, white matter blue


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


def run_demo(out: Path, epochs: int = 30, subjects: int = 12, seed: int = 0, data_dir: Path = Path("data/demo2d"),
             offline: bool = False, cache_views: int = 8) -> Path:
    """Run the whole demo; returns the path of the markdown results table.

    ``offline``: the EMKD student reads the teacher's outputs from a cache of ``cache_views`` recorded views per
    training slice, built once right after the teacher (``<out>/teacher_cache``), instead of running the teacher."""
    from medkd.profiling import profile_network

    start = time.time()
    out = Path(out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    datalist = _ensure_data(Path(data_dir).resolve(), subjects, seed)
    student_def = f"%{bundles_dir() / 'emkd_segmentation' / 'configs' / 'train.json'}#network_def"
    common = {"dataset_dir": datalist.parent, "epochs": epochs, "num_workers": 0, "resume": False}
    runs = {
        "teacher": ("supervised_segmentation", {}),
        "baseline": ("supervised_segmentation", {"network_def": student_def}),
        "emkd": ("emkd_segmentation", {"teacher_ckpt": out / "teacher" / "model.pt"}),
    }
    timings = {}
    for name, (bundle, extra) in runs.items():
        dirs = {"ckpt_dir": out / name, "output_dir": out / name / "eval"}
        if offline and name == "emkd":
            timings["teacher_cache"] = _run_bundle(
                "cache_teacher", bundle, ["train.json", "cache_teacher.json"],
                {**common, **dirs, **extra, "cache_dir": out / "teacher_cache", "cache_views": cache_views,
                 "cache_overwrite": True}, logs)
            extra = {**extra, "teacher_cache": out / "teacher_cache"}
        timings[name] = _run_bundle(f"train_{name}", bundle, ["train.json"], {**common, **dirs, **extra}, logs)
    for name, (bundle, extra) in runs.items():
        dirs = {"ckpt_dir": out / name, "output_dir": out / name / "test", "save_predictions": True}
        overrides = {"dataset_dir": datalist.parent, "num_workers": 0, **dirs}
        if "network_def" in extra:
            overrides["network_def"] = extra["network_def"]
        _run_bundle(f"evaluate_{name}", bundle, ["train.json", "evaluate.json"], overrides, logs)

    print("[profile] parameters, FLOPs and CPU latency per 96x112 slice", flush=True)
    cost = {"repeats": 100, "warmup": 20, "memory": False}  # long runs: the median must outlast VM hiccups
    teacher_cost = profile_network(_network("supervised_segmentation"), (1, 1, 96, 112), **cost)
    student_cost = profile_network(_network("emkd_segmentation"), (1, 1, 96, 112), **cost)
    costs = {"teacher": teacher_cost, "baseline": student_cost, "emkd": student_cost}  # both students: one network
    labels = {f"class{int(k) - 1}": v for k, v in LABELS.items() if k != "0"}
    rows, results = [], {}
    titles = {"teacher": "teacher (supervised)", "baseline": "student without KD",
              "emkd": "student with EMKD" + (" (offline, teacher cache)" if offline else "")}
    for name in runs:
        dice = _summary(out / name / "test", "val_mean_dice")
        hd95 = _summary(out / name / "test", "val_hd95")
        c = costs[name]
        results[name] = {"dice": {labels[k]: dice[k] for k in labels}, "mean_dice": dice["mean"], "hd95_voxels": hd95["mean"],
                         "train_seconds": timings[name], **c}
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
    text = "\n".join([
        "# medkd demo results",
        "",
        f"Embedded MNI152 demo dataset ({subjects} pseudo-subjects, seed {seed}, 2 mm axial slices 96x112); "
        f"test split: {n_test} slices of held-out subjects. {epochs} epochs for every model, same optimiser, schedule, "
        "batch size and seed. Dice and HD95 (95th percentile Hausdorff distance, in 2 mm voxels) are averaged over test "
        "slices per class. FLOPs are counted by torch.utils.flop_counter (2 per multiply-accumulate); latency is the "
        "median eval-mode forward time of one slice on this machine's CPU.",
        "",
        table,
        "",
        "![test slices: image, ground truth, teacher, student without KD, student with EMKD](figure.png)",
        "",
        *([f"The EMKD student trained from a teacher cache ({cache_views} recorded views per training slice), built "
           f"once in {timings['teacher_cache']:.0f} s; its training time excludes the build."] if offline else []),
        f"Total demo time: {time.time() - start:.0f} s.",
        "",
    ])
    md = out / "results.md"
    md.write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _figure(datalist, {titles[n]: out / n / "test" / "predictions" for n in runs}, out / "figure.png")
    print("\n" + table + f"\n\nwrote {md}, {out / 'results.json'} and {out / 'figure.png'} ({time.time() - start:.0f} s in all)")
    return md
