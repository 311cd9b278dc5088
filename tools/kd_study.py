"""Where does KD pay on the demo data? Regimes x recipes x seeds, each KD run beside its same-steps no-KD control.

    python tools/kd_study.py run [--parts g,h,e,f,c,d,a,b] [--seeds 0,1,2] [--out results/kd_study] [--commit False]
    python tools/kd_study.py report [--out results/kd_study]      # docs/results.md, .json, .png from stored runs
    python tools/kd_study.py lead                                 # the README's table: few labels, no KD vs KD

One teacher (the supervised bundle's default network, MONAI UNet 1.6M) is trained once, for ``teacher_steps``
optimiser steps (its validation curve goes into the doc), and serves every regime. The student is the EMKD bundle's
``network_def`` (MONAI UNet 41k). Regimes (``REGIMES``), each on one dataset written once (``python -m medkd prepare
demo --unlabelled 32``: the 8 labelled training subjects of the default demo, byte-identical, plus 32 subjects without
labels):

- ``a``: labelled only, 360 steps (30 epochs of 12 batches of 16);
- ``b``: labelled only, long: 1800 steps (150 epochs);
- ``c``: 8 labelled + 32 unlabelled subjects (``recipes/unlabelled.json``: batches of 8 labelled + 8 unlabelled
  slices), 384 steps;
- ``d``: label-free (``recipes/label_free.json`` over the 40 subjects' images, no label read), 360 steps;
- ``e``: few labels: 2 of the 8 training subjects keep their labels (drawn once with ``LABELLED_SEED``, the same for
  every run seed; the control trains on the same 2 with ``recipes/labelled_subset.json``), the other 6 join the 32 unlabelled ones; the teacher was trained on
  all 8 (a teacher that knows more than the labels at hand); 342 steps (3 epochs of 114 pairs-batches, 114 of 3);
- ``f``: as ``e`` without the 32 extra subjects (``unlabelled_list`` null: the 6 training subjects without their labels
  are the unlabelled set): the default demo data; 342 steps (19 epochs of 18 pairs-batches); the same control
  runs as ``e``;
- ``g``: as ``e`` with 1 labelled subject (``labelled_fraction`` 0.125), 7 + 32 unlabelled; 468 steps (4 epochs of 117
  pairs-batches, 234 of 2); the other methods' bundle defaults run here (``METHODS``);
- ``h``: as ``g`` without the extra subjects (1 labelled, 7 unlabelled: the default demo data, what ``make demo`` runs);
  462 steps (22 epochs of 21, 231 of 2).

Recipes (``RECIPES``): the no-KD control (the supervised bundle training the same student on the labelled slices for
the *same number of optimiser steps* as the regime's KD runs: an epoch over 40 subjects is 5x one over 8, so every
schedule is set in steps and the epochs follow from each run's data), logits KD at T 1 and T 4, DIST, soft-label Dice
and EMKD (the bundle's default). Every run uses the same cosine learning-rate schedule stepped per iteration over its
steps (``lr_scheduler#T_max`` = steps, the scheduler handler at iteration level), the bundles' optimiser, batch size
and augmentation; the number of steps each run really made is read from its log and checked.

Offline KD: recipes that read only the teacher's logits are served from a teacher cache, one per (teacher, regime
data) under ``<out>/cache_<regime>``, with as many recorded views as the run has epochs (at most ``max_views``; the
views then cycle), built once and reused across recipes and seeds; recipes that read teacher features (EMKD) run the
live teacher.

Resumable and incremental: every finished run (test Dice per class, steps, wall time, first-iteration loss values) is
written at once into ``docs/results.json``, and ``docs/results.md`` and its chart are regenerated from it; a run listed
there is never redone, and an interrupted run resumes from its own ``train_state.pt`` (``resume`` on). With
``--commit True`` the three docs files (only those) are committed after every finished regime and seed. A later session
continues the study with the same ``run`` command (models live under ``--out``; a missing teacher is retrained, with
the same seed and schedule, and its checkpoint hash is compared with the one recorded).
"""

from __future__ import annotations

import datetime
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_recipes import cache_taps, chart  # noqa: E402  (the same chart and tap collection as compare_recipes)

from medkd.data.demo import LABELS  # noqa: E402
from medkd.data.semi import epochs_for, steps_per_epoch  # noqa: E402,F401  (schedules in optimiser steps)
from medkd.demo import _run_bundle, _schedule, _summary, bundles_dir, first_iteration_scalars  # noqa: E402
from medkd.io import file_sha256  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SUPERVISED = "supervised_segmentation"
KD_BUNDLE = "emkd_segmentation"
UNLABELLED_SUBJECTS = 32

# Recipe variants (a recipe + config overrides), run in the regimes that list them under "variants": with few labels
# the task loss on the labelled half and the KD terms pull apart, and the bundles' KD weights (set so the weighted KD
# term is ~0.5x the task loss at the first iteration on fully labelled data) leave the task loss in charge.
VARIANTS: dict[str, tuple[str, dict]] = {
    "logits KD T 1 (weight 1)": ("recipes/kd_logits_t1.json", {"kd_terms#0#weight": 1.0}),
    "logits KD T 1 (weight 3)": ("recipes/kd_logits_t1.json", {"kd_terms#0#weight": 3.0}),
    "logits KD T 1 (weight 10)": ("recipes/kd_logits_t1.json", {"kd_terms#0#weight": 10.0}),
}
# The other methods' bundle defaults (run in the regimes that list them under "methods"): bundle, stages run before
# train.json (each in its own folder under the run's, with the stage's own schedule, the study teacher where it needs
# one), the overrides that point train.json at the stages' outputs, and, for a method with its own student, its
# same-steps no-KD control (a method name whose "control" is true). "labelled_only": the method trains on the regime's
# labelled subjects alone (its stages too), as the no-KD control does; "shared_dir": its stages write into the run's own
# folder (GKD's stages find each other's files there); "stage_steps": the stages that get the run's steps and schedule.
# The labelled subjects of a labelled-only method (the draw of medkd.data.split_labelled, as every recipe's):
LABELLED_DATA = ("$medkd.data.split_labelled(medkd.data.check_datalist(medkd.data.load_datalist(@data_list_file_path, "
                 "'training', @dataset_dir), @num_classes), @labelled_fraction, @labelled_seed, 'case')['labelled']")
METHODS: dict[str, dict] = {
    "Graph Flow (bundle default)": {"bundle": "graph_flow_segmentation", "stages": ["pretrain_paraphraser.json"],
                                    "after": {"teacher#paraphraser_dir": "{stage0}"}},
    # teacher-free self-distillation learns from labels only (its unlabelled recipe swaps in vanilla logits KD): it
    # trains on the regime's labelled subjects alone, as the no-KD control does
    "ACW-SKD (bundle default; no teacher)": {
        "bundle": "acw_skd_segmentation", "own_teacher": True, "labelled_only": True,
        "set": {"train#dataset#data": LABELLED_DATA, "labelled_fraction": 1.0, "labelled_seed": "@seed"}},
    # GKD's four stages on the labelled subjects: the baseline student (the control's steps and schedule; ACT aligns
    # to it), P-SAE (on the labels), the MSANs (ACT), then the distillation from the study teacher
    "GKD (bundle default; labelled subjects only)": {
        "bundle": "gkd_segmentation", "labelled_only": True, "shared_dir": True, "stage_steps": [0],
        "stages": ["train_baseline.json", "pretrain_psae.json", "train_msan.json"],
        "set": {"train#dataset#data": LABELLED_DATA, "labelled_fraction": 1.0, "labelled_seed": "@seed"}},
    "MTMS-CKD (bundle default; own teacher and student)": {
        "bundle": "mtms_ckd_segmentation", "stages": ["train_teacher.json"], "own_teacher": True,
        "after": {"teacher_ckpt": "{stage0}/teacher.pt"}, "vs": "MTMS-CKD's student without KD"},
    "MTMS-CKD's student without KD": {"bundle": "mtms_ckd_segmentation", "configs": ["recipes/no_kd.json"],
                                      "control": True, "set": {"train#dataloader#drop_last": False}},  # 24 slices
}
# A ``labelled_fraction`` regime draws its labelled subjects once, with this seed, for every run seed: the seeds then
# vary initialisation, augmentation and batch order only, as in the other regimes (which subjects are labelled moves
# the Dice by more than the seeds do: 0.824 vs 0.809 for two draws, the no-KD student of (e)).
LABELLED_SEED = 0
REGIMES: dict[str, dict] = {
    "a": {"title": "(a) labelled only, 30 epochs", "data": [], "kind": "labelled", "steps": 360},
    "b": {"title": "(b) labelled only, long (150 epochs)", "data": [], "kind": "labelled", "steps": 1800},
    "c": {"title": "(c) 8 labelled + 32 unlabelled subjects", "data": ["recipes/unlabelled.json"], "kind": "unlabelled",
          "steps": 384},
    "d": {"title": "(d) label-free: 0 labels, 40 unlabelled subjects", "data": ["recipes/label_free.json"],
          "kind": "label_free", "steps": 360, "overrides": {"label_free_lists": ["training", "unlabeled"]}},
    # few labels: the student keeps the labels of 2 of the 8 training subjects (drawn once, LABELLED_SEED; the control
    # gets the same 2), the other 6 join the 32 unlabelled ones; the teacher was trained on all 8 (a teacher that knows more than
    # the labels at hand: the compress use case, a zoo teacher over a small labelled set)
    "e": {"title": "(e) 2 labelled + 38 unlabelled subjects, teacher trained on 8", "data": ["recipes/unlabelled.json"],
          "kind": "unlabelled", "steps": 342, "labelled_fraction": 0.25,
          "variants": list(VARIANTS)},
    # the same few labels without extra subjects: only the 6 training subjects whose labels are dropped are unlabelled
    # (the default demo data, no `--unlabelled`)
    "f": {"title": "(f) 2 labelled + 6 unlabelled subjects (no extra subjects), teacher trained on 8",
          "data": ["recipes/unlabelled.json"], "kind": "unlabelled", "steps": 342, "labelled_fraction": 0.25,
          "overrides": {"unlabelled_list": "$None"}, "variants": list(VARIANTS)},  # a CLI None is dropped by MONAI
    # fewer labels still: 1 labelled subject (24 slices), 7 + 32 unlabelled
    "g": {"title": "(g) 1 labelled + 39 unlabelled subjects, teacher trained on 8", "data": ["recipes/unlabelled.json"],
          "kind": "unlabelled", "steps": 468, "labelled_fraction": 0.125, "variants": ["logits KD T 1 (weight 3)"],
          "methods": list(METHODS)},
    # 1 labelled subject, the other 7 training subjects unlabelled, no extra subjects: the default demo data (make demo)
    "h": {"title": "(h) 1 labelled + 7 unlabelled subjects (no extra subjects), teacher trained on 8",
          "data": ["recipes/unlabelled.json"], "kind": "unlabelled", "steps": 462, "labelled_fraction": 0.125,
          "overrides": {"unlabelled_list": "$None"}, "variants": ["logits KD T 1 (weight 3)"]},
}
RECIPES: dict[str, str | None] = {
    "no KD": None,
    "logits KD T 1": "recipes/kd_logits_t1.json",
    "logits KD T 4": "recipes/kd_logits.json",
    "DIST": "recipes/kd_dist.json",
    "soft-label Dice": "recipes/kd_soft_dice.json",
    "EMKD": "default",
}
ITER_LINE = re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+) --")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")  # the logging module's asctime
VAL_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- .*val_mean_dice: ([0-9.]+)")


def _list(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def recipes_of(regime: str) -> list[str]:
    """The recipes a regime runs: every one of ``RECIPES``, then the regime's ``variants`` and ``methods``."""
    return [*RECIPES, *REGIMES[regime].get("variants", []), *REGIMES[regime].get("methods", [])]


def recipe_config(name: str) -> tuple[str | None, dict]:
    """(recipe path or "default" or None for the control, config overrides) of a recipe or variant name."""
    if name in RECIPES:
        return RECIPES[name], {}
    if name in METHODS:
        return "default", {}
    path, overrides = VARIANTS[name]
    return path, dict(overrides)


def regime_counts(datalist: Path, spec: dict, seed: int) -> tuple[int, int]:
    """(labelled, unlabelled) training slices of a regime for one seed: a ``labelled_fraction`` regime keeps the labels
    of that share of the training subjects (``medkd.data.split_labelled``, drawn with the run's seed, as the bundles'
    ``recipes/unlabelled.json`` and ``recipes/labelled_subset.json`` do), the others join the unlabelled list."""
    from medkd.data import split_labelled

    lists = json.loads(Path(datalist).read_text())
    fraction = spec.get("labelled_fraction")
    extra = lists.get("unlabeled", []) if "unlabelled_list" not in spec.get("overrides", {}) else []
    if fraction is None:
        return len(lists["training"]), len(extra)
    split = split_labelled(lists["training"], fraction, seed, "case", extra)
    return len(split["labelled"]), len(split["unlabelled"])


def logged_steps(log: Path) -> int:
    """Optimiser steps a training log shows: epochs x iterations per epoch of its StatsHandler lines."""
    epochs = per_epoch = None
    for line in Path(log).read_text().splitlines():
        m = ITER_LINE.search(line)
        if m:
            epochs, per_epoch = int(m.group(2)), int(m.group(4))
    if epochs is None:
        raise ValueError(f"no iteration line in {log}")
    return epochs * per_epoch


def validation_curve(log: Path) -> list[tuple[int, float]]:
    """``(epoch, val_mean_dice)`` of every validation in a training log (a resumed log: the last value per epoch)."""
    curve: dict[int, float] = {}
    for line in Path(log).read_text().splitlines():
        m = VAL_LINE.search(line)
        if m:
            curve[int(m.group(1))] = float(m.group(2))
    return sorted(curve.items())


def logged_seconds(log: Path) -> float:
    """Seconds between the first and the last timestamped line of a log (an interrupted run's earlier part: the time it
    trained before the interruption, so a resumed run's wall time counts every part)."""
    stamps = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
              for m in map(STAMP.match, Path(log).read_text().splitlines()) if m]
    return (stamps[-1] - stamps[0]).total_seconds() if stamps else 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


class Study:
    """State of one study: the run folder ``out`` (models, logs, caches) and the committed ``docs/results.json``."""

    def __init__(self, out: str = "results/kd_study", data_dir: str = "data/demo2d_unl32", teacher_steps: int = 1800,
                 max_views: int = 150, doc: str | None = None, steps: dict | None = None):
        self.out = Path(out).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir).resolve()
        self.teacher_steps = int(teacher_steps)
        self.max_views = int(max_views)
        self.doc = Path(doc) if doc else DOCS / "results.md"
        self.json_path = self.doc.with_suffix(".json")
        self.state = json.loads(self.json_path.read_text()) if self.json_path.is_file() else {}
        self.state.setdefault("runs", {})
        self.steps = {r: int((steps or {}).get(r, spec["steps"])) for r, spec in REGIMES.items()}
        self.controls_only = False

    # ----------------------------------------------------------------------------------------------- data, teacher
    def datalist(self) -> Path:
        from medkd.data.demo import prepare_demo

        path = self.data_dir / "datalist.json"
        if path.is_file():
            if json.loads(path.read_text()).get("unlabeled"):  # e.g. the demo with --unlabelled 32 (or a test's)
                return path
            raise ValueError(f"{path} has no 'unlabeled' list: remove {self.data_dir} (the study writes it with "
                             f"{UNLABELLED_SUBJECTS} unlabelled subjects) or pass another --data_dir")
        print(f"[data] writing the demo data with {UNLABELLED_SUBJECTS} unlabelled subjects to {self.data_dir}", flush=True)
        return Path(prepare_demo(self.data_dir, subjects=12, seed=0, dims=2, unlabelled=UNLABELLED_SUBJECTS))

    def counts(self) -> tuple[int, int]:
        return regime_counts(self.datalist(), {}, 0)

    def save(self) -> None:
        """Write the state, merged with what another process of the study wrote meanwhile (under a file lock)."""
        import fcntl

        with open(self.json_path.with_suffix(".json.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.json_path.is_file():
                stored = json.loads(self.json_path.read_text())
                merged = dict(stored.get("runs", {}))
                for key, run in self.state["runs"].items():  # per run: fields another process added are kept
                    merged[key] = {**merged.get(key, {}), **run}
                self.state["runs"] = merged
                for key, value in stored.items():
                    self.state.setdefault(key, value)
            tmp = self.json_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.json_path)

    def teacher(self) -> Path:
        """Train (once) and evaluate the teacher; its checkpoint path."""
        labelled, _ = self.counts()
        per_epoch = steps_per_epoch("labelled", labelled, 0)
        epochs = epochs_for(self.teacher_steps, per_epoch, "teacher")
        ckpt_dir = self.out / "teacher"
        ckpt = ckpt_dir / "model.pt"
        log = self.logs / "train_teacher.log"
        if not (ckpt_dir / "done").is_file():
            if log.is_file():  # an interrupted training resumes: keep the earlier part of its log (validation curve)
                log.rename(log.with_suffix(f".{len(list(self.logs.glob('train_teacher.*.log')))}.log"))
            seconds = _run_bundle("train_teacher", SUPERVISED, ["train.json"],
                                  {"dataset_dir": self.data_dir, "epochs": epochs, "val_interval": 5, "seed": 0,
                                   "num_workers": 0, "resume": True, "ckpt_dir": ckpt_dir, "output_dir": ckpt_dir / "eval"},
                                  self.logs)
            seconds += sum(logged_seconds(part) for part in self.logs.glob("train_teacher.*.log"))  # earlier parts
            (ckpt_dir / "done").write_text(f"{seconds:.1f}\n")
        info = self.state.get("teacher", {})
        sha = file_sha256(ckpt)
        if info.get("sha256") and info["sha256"] != sha:
            print(f"[teacher] WARNING: the retrained teacher differs from the recorded one (sha256 {sha[:12]} vs "
                  f"{info['sha256'][:12]}); runs recorded with the old teacher are kept", flush=True)
        if info.get("sha256") != sha or "dice" not in info:
            test = self.evaluate("teacher", {})
            info = {"sha256": sha, "steps": logged_steps(log), "epochs": epochs, "dice": test,
                    "validation_curve": sorted(dict(
                        point for part in [*sorted(self.logs.glob("train_teacher.*.log")), log]
                        for point in validation_curve(part)).items()),
                    "seconds": float((ckpt_dir / "done").read_text())}
            self.state["teacher"] = info
            self.save()
        return ckpt

    def evaluate(self, key: str, overrides: dict) -> dict[str, float]:
        test_dir = self.out / key / "test"
        if not (test_dir / "val_mean_dice_summary.csv").is_file():
            _run_bundle(f"evaluate_{key.replace('/', '_')}", SUPERVISED, ["train.json", "evaluate.json"],
                        {"dataset_dir": self.data_dir, "num_workers": 0, "ckpt_dir": self.out / key,
                         "output_dir": test_dir, **overrides}, self.logs)
        return _summary(test_dir, "val_mean_dice")

    # ----------------------------------------------------------------------------------------------- runs
    def teacher_cache(self, regime: str, spec: dict, teacher_ckpt: Path, epochs: int, seed: int = 0) -> Path:
        """The regime's teacher cache (logits only), built once: ``min(epochs, max_views)`` views of every item (a
        ``labelled_fraction`` regime keeps the same labelled subjects for every seed, ``LABELLED_SEED``: one cache)."""
        fraction = spec.get("labelled_fraction")
        cache_dir = self.out / f"cache_{regime}"
        if not (cache_dir / "complete").is_file():
            kd = bundles_dir() / KD_BUNDLE / "configs"
            offline = [str(kd / r) for r in RECIPES.values() if r and r != "default"]
            taps = cache_taps(KD_BUNDLE, [[p] for p in offline])
            _run_bundle(f"cache_teacher_{cache_dir.name[len('cache_'):]}", KD_BUNDLE, ["train.json", *spec["data"], "recipes/kd_logits.json",
                                                                "cache_teacher.json"],
                        {"dataset_dir": self.data_dir, "num_workers": 0, "ckpt_dir": self.out / f"cache_{regime}_run",
                         "cache_dir": cache_dir, "cache_views": min(epochs, self.max_views), "teacher_ckpt": teacher_ckpt,
                         "cache_taps": taps, "seed": 0, **spec.get("overrides", {}),
                         **({"labelled_fraction": fraction, "labelled_seed": LABELLED_SEED} if fraction else {})},
                        self.logs)
            (cache_dir / "complete").write_text("built by tools/kd_study.py\n")
        return cache_dir

    def run_one(self, regime: str, recipe: str, seed: int, teacher_ckpt: Path, offline: bool, commit: bool) -> None:
        key = f"{regime}/{recipe}/seed{seed}"
        if self.json_path.is_file():  # runs another process of the study finished meanwhile
            self.state["runs"] = {**json.loads(self.json_path.read_text()).get("runs", {}), **self.state["runs"]}
        if key in self.state["runs"]:
            return
        spec = REGIMES[regime]
        labelled, unlabelled = regime_counts(self.datalist(), spec, LABELLED_SEED)
        steps = self.steps[regime]
        fraction = spec.get("labelled_fraction")
        folder = f"{regime}/{recipe.replace(' ', '_')}/seed{seed}"
        path, recipe_overrides = recipe_config(recipe)
        if path is None:  # the control depends on its steps and labels alone: one run serves every such regime
            folder = f"control_{steps}_steps" + (f"_labelled{fraction}" if fraction else "") + f"/seed{seed}"
            twin = next((k for r in REGIMES if self.steps[r] == steps and r != regime
                         and REGIMES[r].get("labelled_fraction") == fraction
                         for k in [f"{r}/{recipe}/seed{seed}"] if k in self.state["runs"]), None)
            if twin:
                self.state["runs"][key] = {**self.state["runs"][twin], "same_run_as": twin}
                self.save()
                return
        student_def = f"%{bundles_dir() / KD_BUNDLE / 'configs' / 'train.json'}#network_def"  # a method may change it
        schedule = _schedule(steps)
        dirs = {"ckpt_dir": self.out / folder, "output_dir": self.out / folder / "eval"}
        base = {"dataset_dir": self.data_dir, "num_workers": 0, "resume": True, "seed": seed, **schedule, **dirs}
        if path is None:  # the no-KD control: the same student, labelled slices, the same number of steps
            epochs = epochs_for(steps, steps_per_epoch("labelled", labelled, 0), f"regime {regime} control")
            bundle, configs, overrides = SUPERVISED, ["train.json"], {"network_def": student_def}
            if fraction:  # the same labelled subjects as the regime's KD runs
                configs.append("recipes/labelled_subset.json")
                overrides.update(labelled_fraction=fraction, labelled_seed=LABELLED_SEED)
        elif recipe in METHODS and METHODS[recipe].get("control"):  # a method's own student without KD
            method = METHODS[recipe]
            bundle, configs = method["bundle"], ["train.json", *method.get("configs", [])]
            student_def = f"%{bundles_dir() / bundle / 'configs' / 'train.json'}#network_def"
            epochs = epochs_for(steps, steps_per_epoch("labelled", labelled, 0), f"regime {regime} {recipe}")
            overrides = {"labelled_fraction": fraction or 1.0, "labelled_seed": LABELLED_SEED, **method.get("set", {})}
        else:
            method = METHODS.get(recipe, {})
            bundle = method.get("bundle", KD_BUNDLE)
            student_def = f"%{bundles_dir() / bundle / 'configs' / 'train.json'}#network_def"
            teacher = {} if method.get("own_teacher") else {"teacher_ckpt": teacher_ckpt}
            if method.get("labelled_only"):
                epochs = epochs_for(steps, steps_per_epoch("labelled", labelled, 0), f"regime {regime} {recipe}")
                configs, overrides = ["train.json"], {**teacher, **method.get("set", {})}
            else:
                epochs = epochs_for(steps, steps_per_epoch(spec["kind"], labelled, unlabelled), f"regime {regime} KD runs")
                configs = ["train.json", *spec["data"], *([] if path == "default" else [path])]
                overrides = {**teacher, **spec.get("overrides", {}), **recipe_overrides}
            if fraction:
                overrides.update(labelled_fraction=fraction, labelled_seed=LABELLED_SEED)
            shared = method.get("shared_dir", False)
            # a labelled-only method's stages get its data overrides (the labelled draw) and teacher, as train.json
            stage_overrides = dict(overrides) if method.get("labelled_only") else teacher
            for i, stage in enumerate(method.get("stages", [])):  # e.g. Graph Flow's paraphrasers, MTMS-CKD's teacher
                stage_dir = self.out / folder if shared else self.out / folder / f"stage{i}"
                done = stage_dir / (f"stage{i}.done" if shared else "done")
                if not done.is_file():
                    timing = ({**schedule, "epochs": epochs, "val_interval": max(1, epochs // 10)}
                              if i in method.get("stage_steps", []) else {})
                    stage_dir.mkdir(parents=True, exist_ok=True)
                    _run_bundle(f"stage{i}_{folder.replace('/', '_')}", bundle, ["train.json", stage],
                                {"dataset_dir": self.data_dir, "num_workers": 0, "resume": True, "seed": seed,
                                 "ckpt_dir": stage_dir, "output_dir": stage_dir / (f"eval_stage{i}" if shared else "eval"),
                                 **stage_overrides, **timing}, self.logs)
                    done.write_text("done\n")
                overrides.update({k: v.format(**{f"stage{i}": stage_dir})
                                  for k, v in method.get("after", {}).items() if f"{{stage{i}}}" in v})
            reads_taps = bool(cache_taps(KD_BUNDLE, [[str(bundles_dir() / KD_BUNDLE / 'configs' / path)]]
                                         if path != "default" else [[]]))
            if offline and not reads_taps and not method:
                overrides["teacher_cache"] = self.teacher_cache(regime, spec, teacher_ckpt, epochs, seed)
        val_interval = max(1, epochs // 10)
        name = f"train_{folder.replace('/', '_')}"
        busy = self.out / folder / "running.pid"
        if busy.is_file() and _alive(int(busy.read_text() or 0)):
            print(f"[{key}] another process of the study is training {folder}; skipped (rerun to collect it)", flush=True)
            return
        busy.parent.mkdir(parents=True, exist_ok=True)
        busy.write_text(str(os.getpid()))
        log = self.logs / f"{name}.log"
        if log.is_file():  # an interrupted run resumes: keep the earlier part of its log (first iteration, curve)
            log.rename(self.logs / f"{name}.part{len(list(self.logs.glob(f'{glob.escape(name)}.part*.log')))}.log")
        start = time.time()
        try:
            _run_bundle(name, bundle, configs, {**base, **overrides, "epochs": epochs, "val_interval": val_interval},
                        self.logs)
        finally:
            busy.unlink(missing_ok=True)
        parts = [*sorted(self.logs.glob(f"{glob.escape(name)}.part*.log")), log]  # a resumed run's earlier logs first
        seconds = time.time() - start + sum(logged_seconds(part) for part in parts[:-1])
        made = next((logged_steps(part) for part in reversed(parts) if ITER_LINE.search(part.read_text())), 0)
        if made != steps:
            raise RuntimeError(f"{key}: the log shows {made} optimiser steps, the regime asks for {steps}")
        dice = self.evaluate(folder, {"network_def": student_def})
        first = {}
        for part in parts if path is not None else []:  # the first part that holds the first iteration's line
            try:
                first = first_iteration_scalars(part)
                break
            except ValueError:
                continue
        curve = [point for part in parts for point in validation_curve(part)]
        self.state["runs"][key] = {"dice": dice, "steps": made, "epochs": epochs, "seconds": round(seconds, 1),
                                   "val_best": max(d for _, d in curve) if curve else None,
                                   "offline": "teacher_cache" in overrides, "first_iteration": first}
        self.save()
        self.report()
        if commit and not self.controls_only and all(f"{regime}/{r}/seed{seed}" in self.state["runs"] for r in RECIPES):
            self.commit(f"docs/results: KD study regime {regime}, seed {seed} done ({self.status()})")

    # ----------------------------------------------------------------------------------------------- report
    def status(self) -> str:
        seeds = self.state.get("seeds", [0, 1, 2])
        done, pending = [], []
        for regime in REGIMES:
            n = sum(f"{regime}/{r}/seed{s}" in self.state["runs"] for r in recipes_of(regime) for s in seeds)
            total = len(recipes_of(regime)) * len(seeds)
            (done if n == total else pending).append(f"({regime})" + ("" if n in (0, total) else f" ({n} of {total} runs done)"))
        return f"regimes {', '.join(done) or 'none'} done; {', '.join(pending) or 'none'} pending"

    def commit(self, message: str) -> None:
        paths = [str(p.relative_to(REPO)) for p in (self.doc, self.json_path, self.doc.with_suffix(".png"))]
        for attempt in range(10):
            if not (REPO / ".git" / "index.lock").exists():
                subprocess.run(["git", "add", *paths], cwd=REPO, check=False)
                if subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=REPO).returncode == 0:
                    return
            time.sleep(5)
        print(f"[commit] could not commit {paths}", flush=True)

    def report(self) -> Path:
        """Write ``docs/results.md`` and ``docs/results.png`` from ``docs/results.json``."""
        labels = {f"class{int(k) - 1}": v for k, v in LABELS.items() if k != "0"}
        runs, seeds = self.state["runs"], self.state.get("seeds", [0, 1, 2])
        teacher = self.state.get("teacher")
        cost = self.state.get("cost", {})

        def values(regime: str, recipe: str, key: str = "mean") -> list[float]:
            """Test Dice ``key`` (a class or "mean") of the recorded seeds; ``val_best``: the best validation Dice."""
            found = [runs[k] for s in seeds for k in [f"{regime}/{recipe}/seed{s}"] if k in runs]
            if key == "val_best":
                return [r["val_best"] for r in found if r.get("val_best") is not None]
            return [r["dice"][key] for r in found]

        def fmt(v: list[float]) -> str:
            if not v:
                return "pending"
            return f"{statistics.fmean(v):.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f} (1 seed)"

        lines = ["# Where KD pays on the demo data: regimes × recipes × 3 seeds", "",
                 f"Status: {self.status()}. Regenerate (2 CPU cores; every run a few minutes, the matrix in parts):", "",
                 "```bash", "python tools/kd_study.py run --parts g,h,e,f,c,d,a,b --seeds 0,1,2   # resumable; skips finished runs",
                 "python tools/kd_study.py report                                 # this page from docs/results.json",
                 "```", "",
                 "Setup: teacher MONAI UNet 16-32-64-128-256 with 2 residual units (the supervised bundle's default), trained "
                 "once (seed 0) on the 8 labelled training subjects; student MONAI UNet 8-16-32-64 (the EMKD bundle's "
                 "`network_def`). Data: the demo's 12 subjects (8 training, 2 validation, 2 test; 24 axial slices each) plus "
                 f"{UNLABELLED_SUBJECTS} subjects without labels (`python -m medkd prepare demo --unlabelled 32`). Every schedule "
                 "is counted in optimiser steps: the no-KD control trains the same student on the labelled slices for "
                 "exactly as many steps as the regime's KD runs (cosine learning rate stepped per iteration over those "
                 "steps, Adam 3e-3, batch 16, the bundles' augmentation). Test Dice on the 48 slices of the 2 held-out "
                 "subjects, best validation checkpoint; mean ± sample std over the seeds; Δ = KD − control, in units of "
                 "the pooled seed std sqrt((s_KD² + s_control²)/2). KD recipes reading only teacher logits are served "
                 "from a teacher cache (one per regime's data, views = epochs, so every epoch sees fresh augmented views as the control does), EMKD runs its teacher live. In (c) every KD batch holds 8 labelled + 8 unlabelled slices (`recipes/unlabelled.json`), so "
                 "the KD runs see half as many labelled slices per step as the control; in (d) the KD runs read no label at "
                 "all and the control is the supervised student (labels, same steps), the comparison the label-free goal "
                 "asks for. A control depends on its steps (and labelled subjects) only, so (a) and (d) share theirs, "
                 "and so do (e) and (f) (the same runs). In (e) and (f) 2 of the 8 training subjects keep their labels "
                 "(drawn once, the same 2 for every seed and for the control: which 2 moves the Dice by more than the seeds "
                 "do), the other 6 lose them and join the unlabelled set ((e): with the 32 extra subjects; (f): alone, "
                 "the default demo data); the teacher is the same one, trained on all 8 "
                 "labelled subjects: a teacher that knows more than the labels at hand, as a model-zoo teacher does; (g) "
                 "is (e) with 1 labelled subject (7 + 32 unlabelled), (h) is (g) without the extra subjects (the default "
                 "demo data: what `make demo` runs). The other methods' bundle defaults run in (g): Graph Flow after its paraphraser stage (study teacher), ACW-SKD (teacher-free "
                 "self-distillation: it learns from labels only, so it trains on the labelled subject alone, like the "
                 "control), MTMS-CKD with its own multi-task teacher (its stage, on all 8 labelled subjects) and its own "
                 "student (SmallUNet), compared with that student trained without KD on the same labels and steps; GKD with "
                 "all four of its stages on the labelled subject alone (its baseline student for the control's steps, "
                 "P-SAE and MSAN 30 epochs each, then the distillation from the study teacher; GKD's unlabelled recipe "
                 "swaps GKD for vanilla KD, as its stages need labels, so the bundle default sees no unlabelled image). "
                 "Variants: a recipe with its KD term's weight overridden (`--kd_terms#0#weight`); the bundles' weights "
                 "make the weighted KD term ~0.5x the task loss at the first iteration, which leaves the task loss on "
                 "the 2 labelled subjects in charge; weight 3 was picked on (f), seed 0 (weights 1, 3 and 10 tried there), before any "
                 "(g) or (h) run, and every variant run is listed. Wall times (s / run: the training itself, every part of a "
                 "resumed one; a method's stages and the evaluation not counted) were measured while other jobs shared "
                 "the 2 cores: indicative only.", ""]
        if teacher:
            t = teacher["dice"]
            curve = teacher.get("validation_curve", [])
            lines += [f"**Teacher**: {teacher['steps']} steps ({teacher['epochs']} epochs), test Dice "
                      + ", ".join(f"{labels[k]} {t[k]:.4f}" for k in labels) + f", mean **{t['mean']:.4f}**; "
                      + (f"best-validation checkpoint (epoch {max(curve, key=lambda c: c[1])[0]}); " if curve else "")
                      + f"wall time {teacher['seconds']:.0f} s (under contention; every part of a resumed training "
                      "counted). Validation curve (epoch: mean Dice): "
                      + ", ".join(f"{e}: {d:.3f}" for e, d in curve) + ".", ""]
        if cost:
            lines += [f"**Cost**: student {cost['student_params'] / 1e3:.1f}k / teacher {cost['teacher_params'] / 1e3:.1f}k "
                      f"parameters (ratio {cost['student_params'] / cost['teacher_params']:.3f}); CPU latency per 96×112 "
                      f"slice, 1 thread, {cost['student_ms']:.2f} ms / {cost['teacher_ms']:.2f} ms (ratio "
                      f"{cost['student_ms'] / cost['teacher_ms']:.3f}; {cost.get('note', '')}).", ""]
        bars, findings = [], []
        for regime, spec in REGIMES.items():
            lines += [f"## {spec['title']}: {self.steps[regime]} steps", "",
                      "| recipe | " + " | ".join(f"Dice {labels[k]}" for k in labels)
                      + " | mean Dice | Δ vs control | Δ / pooled std | best validation Dice | seeds | s / run |",
                      "|---|" + "---|" * (len(labels) + 6)]
            for recipe in recipes_of(regime):
                mean = values(regime, recipe)
                delta = ratio = "–"
                own = METHODS.get(recipe, {})
                control = values(regime, own.get("vs", "no KD"))  # a method with its own student: its own control
                if recipe != "no KD" and not own.get("control") and len(mean) > 1 and len(control) > 1:
                    d = statistics.fmean(mean) - statistics.fmean(control)
                    pooled = math.sqrt((statistics.stdev(mean) ** 2 + statistics.stdev(control) ** 2) / 2)
                    delta, ratio = f"{d:+.4f}", f"{d / pooled:+.1f}" if pooled > 0 else "–"
                    if len(mean) == len(seeds) and len(control) == len(seeds):
                        findings.append((regime, recipe, d, pooled))
                secs = [runs[f"{regime}/{recipe}/seed{s}"]["seconds"] for s in seeds if f"{regime}/{recipe}/seed{s}" in runs]
                name = recipe if recipe != "no KD" else "no KD (control, labelled slices)"
                lines.append(f"| {name} | " + " | ".join(fmt(values(regime, recipe, k)) for k in labels)
                             + f" | **{fmt(mean)}** | {delta} | {ratio} | {fmt(values(regime, recipe, 'val_best'))} | {len(mean)} | "
                             + (f"{statistics.fmean(secs):.0f}" if secs else "–") + " |")
                if mean:
                    bars.append((f"({regime}) {recipe}", statistics.fmean(mean),
                                 statistics.stdev(mean) if len(mean) > 1 else 0.0))
            lines.append("")
        lines += ["## Findings (computed from the tables)", "",
                  "Few labels, a teacher trained on more (logits KD T 1 at weight 3 against the same-steps control):", "",
                  self.lead_table(), ""]
        wins = [f for f in findings if f[2] > 2 * f[3]]
        if findings:
            lines += [f"- ({r}) {n}: Δ {d:+.4f} (pooled std {p:.4f}) — " + ("**beats its same-steps control by more than 2 "
                      "pooled std**" if d > 2 * p else "within 2 pooled std" if abs(d) <= 2 * p else "worse than the control")
                      for r, n, d, p in findings]
            lines += ["", f"{len(wins)} of {len(findings)} complete (regime, recipe) pairs beat their control by more than "
                      "twice the pooled seed std."]
        else:
            lines.append("- no regime has all seeds of a recipe and its control yet.")
        free = {r: values("d", r) for r in RECIPES if r != "no KD"}
        free = {r: v for r, v in free.items() if len(v) == len(seeds)}
        if free and len(values("d", "no KD")) == len(seeds):
            best = max(free, key=lambda r: statistics.fmean(free[r]))
            gap = statistics.fmean(values("d", "no KD")) - statistics.fmean(free[best])
            lines += ["", f"Label-free: the best label-free student ({best}, {statistics.fmean(free[best]):.4f}) is "
                      f"{100 * gap:.1f} Dice points below the supervised student with labels; the goal was within 3 points: "
                      + ("met." if gap <= 0.03 else "not met.")]
        lines += ["", "![mean test Dice per regime and recipe, ± std over seeds](results.png)", ""]
        self.doc.write_text("\n".join(lines))
        if bars:
            chart(bars, self.doc.with_suffix(".png"), "KD study: mean test Dice (± std over seeds)")
        return self.doc

    def lead_table(self, regimes: str = "g,h,e,f", recipe: str = "logits KD T 1 (weight 3)") -> str:
        """Markdown: per few-labels regime, the no-KD control and ``recipe`` (mean ± std over the recorded seeds), the
        difference and its size in pooled seed std (the README's lead; regenerate with ``kd_study.py lead``)."""
        runs, seeds = self.state["runs"], self.state.get("seeds", [0, 1, 2])
        rows = ["| regime | no KD | " + recipe + " | Δ | Δ / pooled std | seeds |", "|---|---|---|---|---|---|"]
        for regime in _list(regimes):
            get = lambda r: [runs[k]["dice"]["mean"] for s in seeds for k in [f"{regime}/{r}/seed{s}"] if k in runs]  # noqa: E731
            control, kd = get("no KD"), get(recipe)
            if not control or not kd:
                continue
            fmt = lambda v: f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"  # noqa: E731
            d = statistics.fmean(kd) - statistics.fmean(control)
            pooled = (math.sqrt((statistics.stdev(kd) ** 2 + statistics.stdev(control) ** 2) / 2)
                      if len(kd) > 1 and len(control) > 1 else 0.0)
            title = REGIMES[regime]["title"]
            rows.append(f"| {title} | {fmt(control)} | **{fmt(kd)}** | {d:+.3f} | "
                        + (f"{d / pooled:+.1f}" if pooled else "–") + f" | {min(len(control), len(kd))} |")
        return "\n".join(rows)

    def measure_cost(self) -> None:
        """Parameters and single-thread CPU latency (median of 50 forwards of one 96x112 slice) of student and teacher."""
        import torch

        from medkd.demo import _network

        torch.set_num_threads(1)
        nets = {"student": _network(KD_BUNDLE), "teacher": _network(SUPERVISED)}
        cost = {}
        x = torch.randn(1, 1, 96, 112)
        for name, net in nets.items():
            net.eval()
            cost[f"{name}_params"] = sum(p.numel() for p in net.parameters())
            times = []
            with torch.no_grad():
                for i in range(60):
                    t0 = time.perf_counter()
                    net(x)
                    if i >= 10:
                        times.append(1e3 * (time.perf_counter() - t0))
            cost[f"{name}_ms"] = statistics.median(times)
        load = os.getloadavg()[0]
        cost["note"] = f"measured with a 1-minute load average of {load:.1f} on {os.cpu_count()} cores" + (
            ": under contention, the ratio is indicative, not the absolute times" if load > 1.5 else "")
        self.state["cost"] = cost
        self.save()


def run(parts: str | tuple = "g,h,e,f,c,d,a,b", seeds: str | tuple = "0,1,2", out: str = "results/kd_study",
        data_dir: str = "data/demo2d_unl32", teacher_steps: int = 1800, offline: bool = True, commit: bool = False,
        max_views: int = 150, doc: str | None = None, steps: dict | None = None, controls_only: bool = False,
        recipes: str | tuple | None = None) -> None:
    """Run (or continue) the study; see the module docstring. ``doc``: the Markdown file to write (default
    ``docs/results.md``; its ``.json`` and ``.png`` beside it); ``steps``: ``{regime: steps}`` overriding ``REGIMES``
    (tests); ``controls_only``: run the no-KD controls alone (they need no teacher; a second process can run them
    while the first trains the teacher: both merge their runs into the same JSON); ``recipes``: only these recipe
    names (comma-separated), in this order."""
    study = Study(out, data_dir, teacher_steps, max_views, doc, steps)
    study.controls_only = controls_only
    seed_list = [int(s) for s in _list(seeds)]
    study.state["seeds"] = sorted(set(study.state.get("seeds", [])) | set(seed_list))
    for part in _list(parts):
        if part not in REGIMES:
            raise ValueError(f"unknown part {part!r}; the regimes are {sorted(REGIMES)}")
    teacher_ckpt = None if controls_only else study.teacher()
    if "cost" not in study.state and not controls_only:
        study.measure_cost()
    study.report()
    for part in _list(parts):
        for seed in seed_list:
            chosen = recipes_of(part) if recipes is None else [r for r in _list(recipes) if r in recipes_of(part)]
            for recipe in chosen:
                if RECIPES.get(recipe, "") is None or not controls_only:
                    study.run_one(part, recipe, seed, teacher_ckpt, offline, commit)
    study.report()
    if commit:
        study.commit(f"docs/results: KD study ({study.status()})")


def lead(out: str = "results/kd_study", doc: str | None = None, regimes: str = "g,h,e,f",
         recipe: str = "logits KD T 1 (weight 3)") -> None:
    """Print the README's lead table (few-labels regimes: control vs ``recipe``) from the JSON beside ``doc``."""
    print(Study(out, doc=doc).lead_table(",".join(_list(regimes)), recipe))


def report(out: str = "results/kd_study", doc: str | None = None) -> None:
    """Regenerate ``docs/results.md`` (or ``doc``) and its chart from the JSON beside it."""
    print(Study(out, doc=doc).report())


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report, "lead": lead})
