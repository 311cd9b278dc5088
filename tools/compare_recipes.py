"""Train one student with several recipes of a KD bundle (and without KD), same schedule, over N seeds; tabulate.

    python tools/compare_recipes.py --bundle emkd_segmentation \\
        --recipes "default,recipes/pmd_only.json" [--seeds 0,1,2] [--epochs 30] [--out results/compare]
        [--teacher_ckpt PATH] [--baseline True] [--baseline_recipe recipes/no_kd.json] [--data_dir data/demo2d]
        [--title "..."] [--offline none|only|both] [--cache_views 8]

Every step is a ``python -m monai.bundle run`` (logs in ``<out>/logs``). For each seed:

- ``without KD``: the supervised bundle training the KD bundle's ``network_def`` (same schedule, optimiser,
  augmentation and batch size: the bundles share them), or, with ``--baseline_recipe``, the KD bundle itself with
  that recipe (e.g. MTMS-CKD's ``no_kd.json``: same data fraction, no terms, no teacher); none with
  ``--baseline False``;
- every recipe: ``train.json`` (``default``) or ``train.json`` + the recipe file (a path relative to the bundle's
  ``configs/`` or absolute; several files joined with ``+`` are applied in order), with ``seed`` overridden; a bundle with a paraphraser stage runs it first.

A bundle that reads a teacher gets one trained once (seed 0) by its own ``train_teacher.json`` stage when it has
one, else by the supervised bundle, on the same data; or ``--teacher_ckpt``. Each model is evaluated on the test split (``evaluate.json``). The script writes
``<out>/results.md`` (mean ± sample std over seeds of the per-class and mean Dice, the raw value of every loss term at
the first iteration of seed 0, wall time per epoch), ``<out>/results.json`` and ``<out>/chart.png`` (mean Dice
bars with ± std whiskers). Runs whose model and timing already exist under ``<out>`` are reused, so an interrupted
comparison continues where it stopped.

Offline KD (``--offline only|both``): the teacher's outputs are computed once, on ``--cache_views`` recorded views of
every training item with every tap the recipes read (``<out>/teacher_cache``, ``python -m medkd cache-teacher``), and
every KD run of every recipe and seed reads them (``teacher_cache``) instead of running the teacher.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import fire

from medkd.data.demo import LABELS
from medkd.demo import _ensure_data, _run_bundle, _summary, bundles_dir, first_iteration_scalars

SUPERVISED = "supervised_segmentation"
STAGES = ("pretrain_paraphraser.json",)  # per-run stages; a train_teacher.json stage runs once (the teacher)


def _list(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _key(name: str) -> str:
    """A run's folder name: ``kd_logits (offline)`` -> ``kd_logits_offline``."""
    return name.replace(" (offline)", "_offline").replace(" ", "_")


def _recipe_name(recipe: str) -> str:
    return "default" if recipe == "default" else "+".join(Path(r).stem for r in recipe.split("+"))


def _recipe_paths(bundle: str, recipe: str) -> list[str]:
    """The config files of a recipe entry: ``default`` (none), one file, or several joined with ``+``."""
    if recipe == "default":
        return []
    paths = []
    for part in recipe.split("+"):
        path = Path(part)
        if not path.is_absolute():
            path = bundles_dir() / bundle / "configs" / part
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        paths.append(str(path))
    return paths


def chart(rows: list[tuple[str, float, float]], path: Path, title: str) -> None:
    """A horizontal bar chart of (label, mean, std) with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw

    lo = max(0.0, min(m - s for _, m, s in rows) - 0.05)
    hi = min(1.0, max(m + s for _, m, s in rows) + 0.02)
    bar_h, gap, left, width = 22, 10, 260, 420
    height = 40 + len(rows) * (bar_h + gap) + 30
    img = Image.new("RGB", (left + width + 90, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")

    def x(v: float) -> float:
        return left + (v - lo) / max(hi - lo, 1e-9) * width

    for i, (label, mean, std) in enumerate(rows):
        y = 40 + i * (bar_h + gap)
        draw.rectangle([left, y, x(mean), y + bar_h], fill=(70, 130, 180) if i else (160, 160, 160))
        draw.line([x(mean - std), y + bar_h / 2, x(mean + std), y + bar_h / 2], fill="black", width=2)
        draw.text((10, y + 5), label[:40], fill="black")
        draw.text((x(mean + std) + 6, y + 5), f"{mean:.4f}", fill="black")
    axis_y = height - 25
    draw.line([left, axis_y, left + width, axis_y], fill="black")
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        draw.text((x(v) - 12, axis_y + 4), f"{v:.2f}", fill="black")
    img.save(path)


def cache_taps(bundle: str, recipe_paths: list[list[str]]) -> dict[str, str]:
    """The teacher taps (name -> spec) that any of the recipes reads: one teacher cache serves them all."""
    from monai.bundle import ConfigParser

    taps: dict[str, str] = {}
    for paths in recipe_paths:
        parser = ConfigParser()
        parser.read_config([str(bundles_dir() / bundle / "configs" / "train.json"), *paths])
        specs = parser.get("teacher_taps") or {}
        terms = parser.get("kd_terms") or []
        for term in terms if isinstance(terms, list) else []:
            for key in term.get("inputs", []) if isinstance(term, dict) else []:
                if isinstance(key, str) and key.startswith("t.") and key != "t.logits":
                    name = key[2:]
                    spec = specs.get(name, name) if isinstance(specs, dict) else name
                    if taps.get(name, spec) != spec:
                        raise ValueError(f"recipes read teacher tap {name!r} at two places ({taps[name]!r}, {spec!r}): "
                                         "compare them with separate --out folders (one cache each)")
                    taps[name] = spec
    return taps


def main(bundle: str, recipes: str | tuple = "default", seeds: str | tuple = "0,1,2", epochs: int = 30,
         out: str = "results/compare", teacher_ckpt: str | None = None, baseline: bool = True,
         baseline_recipe: str | None = None,
         data_dir: str = "data/demo2d", subjects: int = 12, title: str | None = None, offline: str = "none",
         cache_views: int = 8) -> Path:
    """See the module docstring. ``offline``: ``none`` (live teacher), ``only`` (every KD recipe from one teacher
    cache, built once under ``<out>/teacher_cache`` with ``cache_views`` views and every tap the recipes read) or
    ``both`` (each KD recipe online and offline, the offline runs named ``<recipe> (offline)``)."""
    if offline not in ("none", "only", "both"):
        raise ValueError(f"offline must be none, only or both, got {offline!r}")
    start = time.time()
    out_dir = Path(out).resolve()
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    datalist = _ensure_data(Path(data_dir).resolve(), subjects, 0)
    root = bundles_dir() / bundle
    train_cfg = json.loads((root / "configs" / "train.json").read_text())
    recipe_list, seed_list = _list(recipes), [int(s) for s in _list(seeds)]
    paths = {_recipe_name(r): _recipe_paths(bundle, r) for r in recipe_list}
    common = {"dataset_dir": datalist.parent, "epochs": epochs, "num_workers": 0, "resume": False}
    timings_file = out_dir / "timings.json"
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    def train(key: str, bundle_name: str, configs: list[str], overrides: dict, product: str = "model.pt") -> None:
        ckpt = out_dir / key
        if (ckpt / product).is_file() and key in timings:
            print(f"[{key}] reusing {ckpt / 'model.pt'}", flush=True)
            return
        dirs = {"ckpt_dir": ckpt, "output_dir": ckpt / "eval"}
        for stage in STAGES:
            if (bundles_dir() / bundle_name / "configs" / stage).is_file():
                _run_bundle(f"{key.replace('/', '_')}_{Path(stage).stem}", bundle_name, [*configs, stage],
                            {**common, **dirs, **overrides}, logs)
        timings[key] = _run_bundle(f"train_{key.replace('/', '_')}", bundle_name, configs, {**common, **dirs, **overrides}, logs)
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")

    def evaluate(key: str, bundle_name: str, configs: list[str], overrides: dict) -> dict[str, float]:
        test_dir = out_dir / key / "test"
        if not (test_dir / "val_mean_dice_summary.csv").is_file():
            _run_bundle(f"evaluate_{key.replace('/', '_')}", bundle_name, [*configs, "evaluate.json"],
                        {"dataset_dir": datalist.parent, "num_workers": 0, "ckpt_dir": out_dir / key,
                         "output_dir": test_dir, **overrides}, logs)
        return _summary(test_dir, "val_mean_dice")

    extra: dict = {}
    teacher_eval = None
    if "teacher_def" in train_cfg:
        if teacher_ckpt is None and (root / "configs" / "train_teacher.json").is_file():
            train("teacher", bundle, ["train.json", "train_teacher.json"], {"seed": 0}, product="teacher.pt")
            teacher_ckpt = str(out_dir / "teacher" / "teacher.pt")
            teacher_dir = out_dir / "teacher" / "as_model"  # evaluated by the supervised bundle as its network_def
            teacher_dir.mkdir(exist_ok=True)
            (teacher_dir / "model.pt").write_bytes(Path(teacher_ckpt).read_bytes())
            teacher_eval = ("teacher/as_model", {"network_def": f"%{root / 'configs' / 'train.json'}#teacher_def"})
        elif teacher_ckpt is None:
            train("teacher", SUPERVISED, ["train.json"], {"seed": 0})
            teacher_ckpt = str(out_dir / "teacher" / "model.pt")
            teacher_eval = ("teacher", {})
        extra["teacher_ckpt"] = teacher_ckpt
    student_def = f"%{root / 'configs' / 'train.json'}#network_def"
    runs: dict[str, tuple[str, list[str], dict]] = {}
    if baseline and baseline_recipe:
        runs["without KD"] = (bundle, ["train.json", *_recipe_paths(bundle, baseline_recipe)], {})
    elif baseline:
        runs["without KD"] = (SUPERVISED, ["train.json"], {"network_def": student_def})
    if offline != "none" and "teacher_ckpt" in extra:
        cache_dir = out_dir / "teacher_cache"
        build_with = next((p for p in paths.values() if p), [])  # a plain-Distiller recipe when the default is not
        _run_bundle("cache_teacher", bundle, ["train.json", *build_with, "cache_teacher.json"],
                    {"dataset_dir": datalist.parent, "num_workers": 0, "ckpt_dir": out_dir / "teacher_cache_run",
                     "cache_dir": cache_dir, "cache_views": cache_views, "teacher_ckpt": extra["teacher_ckpt"],
                     "cache_taps": cache_taps(bundle, list(paths.values()))}, logs)
    for name, path in paths.items():
        if offline != "only" or "teacher_ckpt" not in extra:
            runs[name] = (bundle, ["train.json", *path], extra)
        if offline != "none" and "teacher_ckpt" in extra:
            runs[f"{name} (offline)"] = (bundle, ["train.json", *path], {**extra, "teacher_cache": out_dir / "teacher_cache"})

    scores: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for seed in seed_list:
        for name, (bundle_name, configs, overrides) in runs.items():
            key = f"{_key(name)}/seed{seed}"
            train(key, bundle_name, configs, {**overrides, "seed": seed})
            scores[name].append(evaluate(key, bundle_name, configs,
                                         {k: v for k, v in overrides.items() if k != "teacher_cache"}))
    scores_teacher = evaluate(teacher_eval[0], SUPERVISED, ["train.json"], teacher_eval[1]) if teacher_eval else None

    labels = {f"class{int(k) - 1}": v for k, v in LABELS.items() if k != "0"}
    keys = [*labels, "mean"]

    def fmt(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"

    header = "| recipe | " + " | ".join(f"Dice {labels[k]}" for k in labels) + " | mean Dice | s / epoch |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    results: dict = {"bundle": bundle, "epochs": epochs, "seeds": seed_list, "runs": {}}
    bars = []
    for name in runs:
        per_key = {k: [s[k] for s in scores[name]] for k in keys}
        secs = [timings[f"{_key(name)}/seed{s}"] / epochs for s in seed_list]
        lines.append(f"| {name} | " + " | ".join(fmt(per_key[k]) for k in labels) + f" | **{fmt(per_key['mean'])}** | "
                     f"{statistics.fmean(secs):.2f} |")
        results["runs"][name] = {"dice": per_key, "seconds_per_epoch": secs}
        std = statistics.stdev(per_key["mean"]) if len(seed_list) > 1 else 0.0
        bars.append((name, statistics.fmean(per_key["mean"]), std))
    if scores_teacher is not None:
        lines.append("| teacher (seed 0) | " + " | ".join(f"{scores_teacher[k]:.4f}" for k in labels)
                     + f" | {scores_teacher['mean']:.4f} | {timings['teacher'] / epochs:.2f} |")
        results["teacher"] = scores_teacher

    first = {}
    for name, (bundle_name, configs, _) in runs.items():
        if bundle_name == bundle and name != "without KD":
            first[name] = first_iteration_scalars(logs / f"train_{_key(name)}_seed{seed_list[0]}.log")
    terms = sorted({k for v in first.values() for k in v if k.startswith("raw_") or k == "loss_task"})
    mag = ["| raw value at iteration 1 (seed " + str(seed_list[0]) + ") | " + " | ".join(first) + " |",
           "|---|" + "---|" * len(first)]
    mag += [f"| `{t}` | " + " | ".join(f"{first[n][t]:.4g}" if t in first[n] else "–" for n in first) + " |" for t in terms]
    results["first_iteration"] = first

    title = title or f"{bundle}: {epochs} epochs, seeds {', '.join(map(str, seed_list))}"
    chart(bars, out_dir / "chart.png", title + " (mean Dice, ± std)")
    text = "\n".join([f"# {title}", "", *lines, "", *mag, "", "![mean Dice per recipe](chart.png)", "",
                      f"Total time: {time.time() - start:.0f} s.", ""])
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + text + f"\nwrote {out_dir / 'results.md'}, results.json and chart.png")
    return out_dir / "results.md"


if __name__ == "__main__":
    fire.Fire(main)
