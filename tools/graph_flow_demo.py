"""Graph Flow on the embedded demo data with a labelled fraction: the comparison of the Graph Flow model card.

    python tools/graph_flow_demo.py [--out graph_flow_demo] [--fraction 0.2] [--epochs 30] [--seed 0]
        [--reuse teacher,baseline]

Every step is a ``python -m monai.bundle run`` of the repository's bundles (logs in ``<out>/logs``), all with the
same epochs, optimiser, schedule, augmentation and seed; the labelled subset is the same draw of whole
pseudo-subjects (``medkd.data.split_labelled``) in every run:

1. teacher: supervised bundle + ``labelled_subset.json`` (the teacher sees the labelled subset only);
2. student without KD: the same, with the Graph Flow bundle's student ``network_def``; and a control with as many
   optimiser steps and labelled samples as run 4 makes (half batches, proportionally more epochs);
3. Graph Flow, labelled only: paraphrasers pretrained on the labelled images, then ``train.json`` +
   the supervised bundle's ``labelled_subset.json`` recipe;
4. Graph Flow, labelled + unlabelled: paraphrasers pretrained on all training images (labels unused), then
   ``train.json`` + ``semi_supervised.json`` (half labelled, half unlabelled per batch);

``--reuse`` keeps the named runs' trained models from an earlier call with the same ``--out`` (their training
times are read back from ``<out>/timings.json``), e.g. to try other Graph Flow weights against the same teacher.
The script then evaluates the four on the test split and prints a markdown table with Dice per class, and every loss term's
raw (unweighted) value at the first iteration of both Graph Flow runs, read from the StatsHandler log lines.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import fire

from medkd.data import load_datalist, split_labelled
from medkd.data.demo import LABELS
from medkd.demo import _ensure_data, _run_bundle, _summary, bundles_dir, first_iteration_scalars

def main(out: str = "graph_flow_demo", fraction: float = 0.2, epochs: int = 30, seed: int = 0, subjects: int = 12,
         data_dir: str = "data/demo2d", reuse: str | tuple = ()) -> None:
    start = time.time()
    out_dir = Path(out).resolve()
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    datalist = _ensure_data(Path(data_dir).resolve(), subjects, 0)
    sup, gf = "supervised_segmentation", "graph_flow_segmentation"
    subset = str(bundles_dir() / sup / "configs" / "recipes" / "labelled_subset.json")
    semi = "recipes/semi_supervised.json"
    student_def = f"%{bundles_dir() / gf / 'configs' / 'train.json'}#network_def"
    common = {"dataset_dir": datalist.parent, "epochs": epochs, "num_workers": 0, "resume": False, "seed": seed,
              "labelled_fraction": fraction}
    teacher_ckpt = out_dir / "teacher" / "model.pt"
    # the semi-supervised run makes more optimiser steps per epoch (its epoch walks the unlabelled set, half a batch of
    # each kind): a no-KD control gets the same number of steps and labelled samples (half batches, more epochs)
    batch = json.loads((bundles_dir() / gf / "configs" / "train.json").read_text())["batch_size"]
    split = split_labelled(load_datalist(datalist, "training"), fraction, seed)
    half = max(1, batch // 2)
    semi_steps = math.ceil(max(len(split["labelled"]), len(split["unlabelled"])) / half)
    matched_epochs = round(epochs * semi_steps / math.ceil(len(split["labelled"]) / half))
    # name: (bundle, configs, extra overrides, paraphraser-stage configs or None)
    runs = {
        "teacher": (sup, ["train.json", subset], {}, None),
        "baseline": (sup, ["train.json", subset], {"network_def": student_def}, None),
        "baseline_matched": (sup, ["train.json", subset], {"network_def": student_def, "batch_size": half,
                                                            "epochs": matched_epochs}, None),
        "gf_labelled": (gf, ["train.json", subset], {"teacher_ckpt": teacher_ckpt},
                        ["train.json", subset, "pretrain_paraphraser.json"]),
        "gf_semi": (gf, ["train.json", semi], {"teacher_ckpt": teacher_ckpt},
                    ["train.json", "pretrain_paraphraser.json"]),
    }
    reuse = [r for r in (reuse.split(",") if isinstance(reuse, str) else reuse) if r]
    unknown = sorted(set(reuse) - set(runs))
    if unknown:
        raise ValueError(f"--reuse: unknown runs {unknown}; choose from {sorted(runs)}")
    timings_file = out_dir / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for name, (bundle, configs, extra, pre) in runs.items():
        dirs = {"ckpt_dir": out_dir / name, "output_dir": out_dir / name / "eval"}
        if name in reuse:
            if not (out_dir / name / "model.pt").is_file() or name not in timings:
                raise FileNotFoundError(f"--reuse {name}: no trained model or timing of it in {out_dir}")
            print(f"[{name}] reusing {out_dir / name / 'model.pt'}")
            continue
        if pre is not None:
            timings[f"{name}_paraphrasers"] = _run_bundle(f"pretrain_{name}", bundle, pre, {**common, **dirs, **extra}, logs)
        timings[name] = _run_bundle(f"train_{name}", bundle, configs, {**common, **dirs, **extra}, logs)
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")
    for name, (bundle, _, extra, _) in runs.items():
        overrides = {"dataset_dir": datalist.parent, "num_workers": 0, "ckpt_dir": out_dir / name,
                     "output_dir": out_dir / name / "test", **extra}
        _run_bundle(f"evaluate_{name}", bundle, ["train.json", "evaluate.json"], overrides, logs)

    labels = {f"class{int(k) - 1}": v for k, v in LABELS.items() if k != "0"}
    titles = {"teacher": "teacher (labelled subset only)", "baseline": "student without KD (labelled subset)",
              "baseline_matched": f"student without KD, labelled subset, {matched_epochs} epochs of batch {half} "
                                  "(the semi-supervised run's steps)",
              "gf_labelled": "student with Graph Flow, labelled only",
              "gf_semi": "student with Graph Flow, labelled + unlabelled"}
    header = "| model | " + " | ".join(f"Dice {v}" for v in labels.values()) + " | mean Dice | HD95 (voxels) | training time (s) |"
    rows, results = [header, "|" + "---|" * (header.count("|") - 1)], {}
    for name in runs:
        dice = _summary(out_dir / name / "test", "val_mean_dice")
        hd95 = _summary(out_dir / name / "test", "val_hd95")
        train_s = timings[name] + timings.get(f"{name}_paraphrasers", 0.0)
        results[name] = {"dice": {labels[k]: dice[k] for k in labels}, "mean_dice": dice["mean"],
                         "hd95_voxels": hd95["mean"], "train_seconds": train_s}
        rows.append(f"| {titles[name]} | " + " | ".join(f"{dice[k]:.4f}" for k in labels)
                    + f" | **{dice['mean']:.4f}** | {hd95['mean']:.2f} | {train_s:.0f} |")
    first = {name: first_iteration_scalars(logs / f"train_{name}.log") for name in ("gf_labelled", "gf_semi")}
    terms = sorted({k for v in first.values() for k in v if k.startswith(("raw_", "loss"))})
    mag = ["| value at iteration 1 | " + " | ".join(titles[n] for n in first) + " |", "|---|---|---|"]
    mag += [f"| `{t}` | " + " | ".join(f"{first[n].get(t, float('nan')):.4g}" for n in first) + " |" for t in terms]
    results["first_iteration"] = first
    text = "\n".join(rows) + "\n\n" + "\n".join(mag) + "\n"
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + text + f"\nwrote {out_dir / 'results.md'} ({time.time() - start:.0f} s in all)")


if __name__ == "__main__":
    fire.Fire(main)
