"""GKD's domain-shift experiment on the embedded data: train on the clean pseudo-subjects, test on them and on a
shifted copy (same anatomy; stronger bias field, other contrast and noise), same schedule and seed for every model.

    python tools/gkd_domain_shift.py [--out results/gkd_shift] [--seeds 0] [--epochs 30] [--shift strong]
        [--subjects 12] [--data data/demo2d] [--shift_data data/demo2d_shift]

Every step is a ``python -m monai.bundle run`` (logs in ``<out>/logs``). Once: the teacher (supervised bundle). Per
seed, in ``<out>/seed<k>``: the GKD bundle's stages (``train_baseline.json`` = the student without KD,
``pretrain_psae.json``, ``train_msan.json``), the GKD student (``train.json``) and the vanilla-KD student
(``train.json`` + ``recipes/vanilla_kd.json``). Every model is evaluated on both test splits in one
``evaluate.json`` run (``eval_domains``): per-case Dice per domain, the paper's pooled metrics, and the FSD pairings
of the GKD run's frozen MSANs (teacher vs student on each domain; clean vs shifted student vectors). Writes
``<out>/results.md`` and ``<out>/results.json``; finished steps are reused, so an interrupted run continues.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import fire

from medkd.demo import _ensure_data, _run_bundle, first_iteration_scalars

GKD, SUPERVISED = "gkd_segmentation", "supervised_segmentation"
DOMAINS = ("clean", "shift")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _scores(eval_dir: Path) -> dict:
    """Per-domain mean per-case Dice (+ classes), pooled F1 / mIoU / AUC, and the FSD rows of one evaluation."""
    out: dict = {}
    for row in _rows(eval_dir / "gkd_summary.csv"):
        if row["metric"].startswith("dice_"):
            out.setdefault(row["domain"], {})[row["metric"]] = float(row["mean"])
    for row in _rows(eval_dir / "gkd_pooled.csv"):
        if row["metric"] in ("f1_mean", "miou", "auc_mean", "acc"):
            out.setdefault(row["domain"], {})[f"pooled_{row['metric']}"] = float(row["value"])
    fsd = eval_dir / "fsd.csv"
    if fsd.is_file():
        for row in _rows(fsd):
            key = "fsd_ts" if row["pairing"] == "teacher_student" else "fsd_shift"
            out.setdefault(row["group_b"], {})[key] = float(row["fsd"])
    return out


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def run(out: str = "results/gkd_shift", seeds="0", epochs: int = 30, shift: str = "strong", subjects: int = 12,
        data: str = "data/demo2d", shift_data: str = "data/demo2d_shift", stage_epochs: int | None = None,
        val_interval: int | None = None) -> Path:
    """Run the experiment (see the module docstring); returns the path of ``results.md``."""
    from medkd.data.demo import prepare_demo

    out_dir = Path(out).resolve()
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else str(seeds).split(",")) if str(s).strip()]
    clean = _ensure_data(Path(data).resolve(), subjects, 0).parent
    shifted = Path(shift_data).resolve()
    if not (shifted / "datalist.json").is_file():
        print(f"[data] writing the shifted copy ({shift}) to {shifted}", flush=True)
        prepare_demo(shifted, subjects=subjects, seed=0, dims=2, shift=shift)
    domains = {"clean": str(clean), "shift": str(shifted)}
    common = {"dataset_dir": str(clean), "epochs": epochs, **({"val_interval": val_interval} if val_interval else {})}
    stage_epochs = epochs if stage_epochs is None else stage_epochs

    teacher_dir = out_dir / "teacher"
    times: dict[str, float] = {}
    if not (teacher_dir / "model.pt").is_file():
        times["teacher"] = _run_bundle("teacher", SUPERVISED, ["train.json"],
                                       {**common, "ckpt_dir": teacher_dir, "output_dir": teacher_dir / "eval", "seed": 0}, logs)
    teacher = teacher_dir / "model.pt"

    def eval_gkd(name: str, run_dir: Path, model: Path, extra: dict | None = None) -> dict:
        eval_dir = out_dir / "eval" / name
        if not (eval_dir / "gkd_summary.csv").is_file():
            _run_bundle(f"eval_{name}", GKD, ["train.json", "evaluate.json"],
                        {**common, "ckpt_dir": run_dir, "output_dir": eval_dir, "teacher_ckpt": teacher,
                         "eval_domains": json.dumps(domains), "validate#handlers#0#load_path": model, **(extra or {})}, logs)
        return _scores(eval_dir)

    results: dict = {"teacher": [], "without KD": [], "vanilla KD": [], "GKD": []}
    first_iter: dict = {}
    for seed in seeds:
        run_dir = out_dir / f"seed{seed}"
        base = {**common, "seed": seed, "ckpt_dir": run_dir, "output_dir": run_dir / "eval", "teacher_ckpt": teacher,
                "psae_epochs": stage_epochs, "msan_epochs": stage_epochs}
        steps = [("baseline", ["train.json", "train_baseline.json"], "student_baseline.pt"),
                 ("psae", ["train.json", "pretrain_psae.json"], "psae.pt"),
                 ("msan", ["train.json", "train_msan.json"], "msan.pt"),
                 ("gkd", ["train.json"], "model.pt")]
        for name, configs, product in steps:
            if not (run_dir / product).is_file() or not (logs / f"{name}_seed{seed}.log").is_file():
                times[f"{name}_seed{seed}"] = _run_bundle(f"{name}_seed{seed}", GKD, configs, base, logs)
        vanilla_dir = out_dir / f"vanilla_seed{seed}"
        if not (vanilla_dir / "model.pt").is_file():
            times[f"vanilla_seed{seed}"] = _run_bundle(
                f"vanilla_seed{seed}", GKD, ["train.json", "recipes/vanilla_kd.json"],
                {**base, "ckpt_dir": vanilla_dir, "output_dir": vanilla_dir / "eval"}, logs)
        msan = {"msan_ckpt": run_dir / "msan.pt"}
        results["without KD"].append(eval_gkd(f"baseline_seed{seed}", run_dir, run_dir / "student_baseline.pt", msan))
        results["vanilla KD"].append(eval_gkd(f"vanilla_seed{seed}", run_dir, vanilla_dir / "model.pt", msan))
        results["GKD"].append(eval_gkd(f"gkd_seed{seed}", run_dir, run_dir / "model.pt", msan))
        if seed == seeds[0]:
            first_iter = {name: first_iteration_scalars(logs / f"{name}_seed{seed}.log") for name in ("gkd", "msan")}
    # the teacher: the GKD bundle's evaluation with network_def = the teacher (no MSAN of its own: no FSD)
    results["teacher"].append(eval_gkd("teacher", out_dir / f"seed{seeds[0]}", teacher,
                                       {"network_def": "%teacher_def", "eval_fsd": False}))

    lines = [f"# GKD domain shift on the embedded data (train: clean; test: clean and `--shift {shift}`)", "",
             f"Seeds {seeds}, {epochs} epochs, {subjects} pseudo-subjects; mean per-case Dice over the test subjects "
             "(mean ± std over seeds where there are several); FSD from the GKD run's frozen MSANs "
             "(teacher–student on each domain; clean vs shifted student vectors).", "",
             "| model | Dice clean | Dice shifted | drop | pooled F1 clean | pooled F1 shifted | FSD teacher–student clean | "
             "FSD teacher–student shifted | FSD clean→shifted |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        dc = [r["clean"]["dice_mean"] for r in runs]
        ds = [r["shift"]["dice_mean"] for r in runs]
        drop = [a - b for a, b in zip(dc, ds)]
        f1c = [r["clean"]["pooled_f1_mean"] for r in runs]
        f1s = [r["shift"]["pooled_f1_mean"] for r in runs]
        ts_c = [r["clean"]["fsd_ts"] for r in runs if "fsd_ts" in r["clean"]]
        ts_s = [r["shift"]["fsd_ts"] for r in runs if "fsd_ts" in r["shift"]]
        sh = [r["shift"]["fsd_shift"] for r in runs if "fsd_shift" in r["shift"]]
        lines.append(f"| {name} | {_mean_std(dc)} | {_mean_std(ds)} | {_mean_std(drop)} | {_mean_std(f1c)} | "
                     f"{_mean_std(f1s)} | {_mean_std(ts_c)} | {_mean_std(ts_s)} | {_mean_std(sh)} |")
    lines += ["", "Raw values at the first iteration (seed {}):".format(seeds[0]), ""]
    for name, scalars in first_iter.items():
        raw = ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items()) if k.startswith("raw_") or k == "loss_task")
        lines.append(f"- {name}: {raw}")
    lines += ["", "Wall time of the training steps (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    md = out_dir / "results.md"
    md.write_text("\n".join(lines))
    (out_dir / "results.json").write_text(json.dumps({"results": results, "first_iteration": first_iter,
                                                       "times": times}, indent=2))
    print("\n".join(lines))
    return md


if __name__ == "__main__":
    fire.Fire(run)
