"""tools/kd_study.py: schedules in optimiser steps (checked against the bundles' real data loaders), and a tiny study."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_2D, workflow

sys.path.insert(0, str(ROOT / "tools"))
import kd_study  # noqa: E402


@pytest.mark.parametrize("regime", ["a", "c", "d", "e"])  # (f) needs more than the tiny data's one subject
def test_steps_per_epoch_match_the_bundle_data_loaders(regime, tiny2d, teacher_2d, tmp_path):
    spec = kd_study.REGIMES[regime]
    seed = 1
    labelled, unlabelled = kd_study.regime_counts(tiny2d / "datalist.json", spec, seed)
    fraction = {"labelled_fraction": spec["labelled_fraction"]} if "labelled_fraction" in spec else {}
    batch = 2
    wf = workflow(kd_study.KD_BUNDLE, ["train.json", *spec["data"]], dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path),
                  output_dir=str(tmp_path / "eval"), teacher_ckpt=str(teacher_2d),
                  **{**TINY_2D, "batch_size": batch, "seed": seed, **spec.get("overrides", {}), **fraction})
    loader = wf.parser.get_parsed_content("train#dataloader")
    assert kd_study.steps_per_epoch(spec["kind"], labelled, unlabelled, batch) == len(loader)
    control = workflow("supervised_segmentation", ["train.json", *(["recipes/labelled_subset.json"] if fraction else [])],
                       dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path / "c"), output_dir=str(tmp_path / "c" / "eval"),
                       **{**TINY_2D, "batch_size": batch, "seed": seed, **fraction})
    assert kd_study.steps_per_epoch("labelled", labelled, 0, batch) == len(control.parser.get_parsed_content("train#dataloader"))
    if fraction:  # the control trains on exactly the labelled slices the KD runs keep (same seed, same draw)
        kept = {item["image"] for item in wf.parser.get_parsed_content("train#split")["labelled"]}
        assert kept and kept == {item["image"] for item in control.parser.get_parsed_content("train#dataset#data")}
        assert len(kept) == labelled


def test_regime_counts_by_hand(tmp_path):
    """8 subjects x 24 labelled slices + 32 x 24 unlabelled: (e) keeps 2 subjects' labels (48 slices), the other 6
    join the unlabelled list (6 x 24 + 768 = 912; (f), without the extra subjects, 6 x 24 = 144); the other regimes keep
    all 192."""
    training = [{"image": f"s{c}_{z}", "label": f"l{c}_{z}", "case": f"s{c}"} for c in range(8) for z in range(24)]
    unlabeled = [{"image": f"u{c}_{z}", "case": f"u{c}"} for c in range(32) for z in range(24)]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": training, "unlabeled": unlabeled}))
    assert kd_study.regime_counts(path, kd_study.REGIMES["a"], 0) == (192, 768)
    for seed in range(3):
        assert kd_study.regime_counts(path, kd_study.REGIMES["e"], seed) == (48, 912)
        assert kd_study.regime_counts(path, kd_study.REGIMES["f"], seed) == (48, 144)  # no extra subjects
        assert kd_study.regime_counts(path, kd_study.REGIMES["g"], seed) == (24, 7 * 24 + 768)  # 1 subject labelled
        assert kd_study.regime_counts(path, kd_study.REGIMES["h"], seed) == (24, 7 * 24)


def test_logged_seconds_spans_the_timestamped_lines(tmp_path):
    """An interrupted run's earlier log part counts from its first to its last timestamped line (by hand: 1 min 2.5 s)."""
    log = tmp_path / "train.part0.log"
    log.write_text("python -m monai.bundle run ...\n\n"
                   "2026-12-06 08:10:16,250 - INFO - Epoch: 1/150, Iter: 1/12 -- loss: 0.6\n"
                   "a line without a time\n"
                   "2026-12-06 08:10:59,000 - INFO - Epoch[1] Metrics -- train_mean_dice: 0.4\n"
                   "2026-12-06 08:11:18,750 - INFO - Epoch: 2/150, Iter: 1/12 -- loss: 0.4\n")
    assert kd_study.logged_seconds(log) == pytest.approx(62.5)
    log.write_text("no timestamps\n")
    assert kd_study.logged_seconds(log) == 0.0


def test_a_resumed_teacher_counts_every_part_of_its_training(tmp_path, monkeypatch):
    """The teacher's wall time: the last part as ``_run_bundle`` timed it (10 s) plus the interrupted earlier part
    from its log (62.5 s by hand), and its validation curve joins both parts."""
    study = kd_study.Study(out=str(tmp_path / "out"), doc=str(tmp_path / "results.md"))
    monkeypatch.setattr(study, "counts", lambda: (12, 0))
    monkeypatch.setattr(study, "evaluate", lambda key, overrides: {"mean": 0.5})
    (study.logs / "train_teacher.log").write_text(  # left by the interrupted training
        "2026-12-06 08:10:16,250 - INFO - Epoch[5] Metrics -- val_mean_dice: 0.4000\n"
        "2026-12-06 08:11:18,750 - INFO - Epoch: 6/150, Iter: 1/12 -- loss: 0.4\n")

    def resumed(name, bundle, configs, overrides, logs):
        (logs / f"{name}.log").write_text("2026-12-06 09:00:00,000 - INFO - Epoch: 10/150, Iter: 12/12 -- loss: 0.3\n"
                                          "2026-12-06 09:00:05,000 - INFO - Epoch[10] Metrics -- val_mean_dice: 0.6000\n")
        Path(overrides["ckpt_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(overrides["ckpt_dir"]) / "model.pt").write_bytes(b"weights")
        return 10.0

    monkeypatch.setattr(kd_study, "_run_bundle", resumed)
    study.teacher()
    teacher = study.state["teacher"]
    assert teacher["seconds"] == pytest.approx(72.5) and teacher["steps"] == 150 * 12
    assert [list(point) for point in teacher["validation_curve"]] == [[5, 0.4], [10, 0.6]]
    assert sorted(p.name for p in study.logs.iterdir()) == ["train_teacher.0.log", "train_teacher.log"]


def test_epochs_for_needs_whole_epochs():
    assert kd_study.epochs_for(384, 96, "x") == 4 and kd_study.epochs_for(384, 12, "x") == 32
    with pytest.raises(ValueError, match="360 steps is not a whole number of epochs of 96"):
        kd_study.epochs_for(360, 96, "regime c")


def test_the_demo_regimes_are_whole_epochs_for_control_and_kd():
    """The shipped regimes on the study's data (192 labelled, 768 unlabelled slices): both sides make exactly the
    regime's steps."""
    counts = {"e": (48, 912), "f": (48, 144), "g": (24, 936), "h": (24, 168)}  # 2 of the 8 subjects keep their labels (test_regime_counts_by_hand)
    for regime, spec in kd_study.REGIMES.items():
        labelled, unlabelled = counts.get(regime, (192, 768))
        kd = kd_study.steps_per_epoch(spec["kind"], labelled, unlabelled)
        control = kd_study.steps_per_epoch("labelled", labelled, 0)
        assert spec["steps"] % kd == 0 and spec["steps"] % control == 0, regime


@pytest.mark.slow
def test_tiny_study_records_same_steps_runs_and_resumes(tiny2d, tmp_path):
    """Regimes (c) and (d) on the tiny data, 2 steps each: every recipe and its control made exactly 2 optimiser
    steps, the JSON holds every run and the teacher's validation curve, and a second call redoes nothing."""
    doc = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "tools" / "kd_study.py"), "run", "--parts", "c,d", "--seeds", "0",
           "--out", str(tmp_path / "out"), "--data_dir", str(tiny2d), "--teacher_steps", "2", "--doc", str(doc),
           "--steps", "{'a': 2, 'b': 2, 'c': 2, 'd': 2}"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    state = json.loads(doc.with_suffix(".json").read_text())
    assert set(state["runs"]) == {f"{r}/{n}/seed0" for r in "cd" for n in kd_study.RECIPES}
    assert all(run["steps"] == 2 for run in state["runs"].values())
    assert state["teacher"]["validation_curve"] and 0 <= state["teacher"]["dice"]["mean"] <= 1
    assert state["runs"]["c/logits KD T 1/seed0"]["offline"] and not state["runs"]["c/EMKD/seed0"]["offline"]
    text = doc.read_text()
    assert "(c) 8 labelled + 32 unlabelled subjects" in text and doc.with_suffix(".png").is_file()
    again = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    assert "monai.bundle run" not in again.stdout  # nothing retrained or re-evaluated


@pytest.fixture(scope="module")
def eight_subjects(tmp_path_factory) -> Path:
    """The study's layout, tiny: 8 training subjects of 2 slices at 8 mm (+ validation, test, 1 unlabelled subject)."""
    from medkd.data.demo import prepare_demo

    out = tmp_path_factory.mktemp("eight_subjects")
    prepare_demo(out, subjects=12, seed=1, dims=2, spacing=8.0, slices_per_subject=2, unlabelled=1)
    return out


@pytest.mark.parametrize("method", [m for m, spec in kd_study.METHODS.items() if spec.get("labelled_only")])
def test_labelled_only_methods_train_every_stage_on_the_labelled_subject(method, eight_subjects, teacher_2d, tmp_path):
    """(g) keeps 1 of 8 subjects' labels: a labelled-only method's training data, in train.json and in every stage
    config, is that subject's 2 slices, the same ones the no-KD control gets (recipes/labelled_subset.json)."""
    spec = kd_study.METHODS[method]
    draw = {"labelled_fraction": kd_study.REGIMES["g"]["labelled_fraction"], "labelled_seed": kd_study.LABELLED_SEED}
    common = {"dataset_dir": str(eight_subjects), "teacher_ckpt": str(teacher_2d), **TINY_2D}
    control = workflow("supervised_segmentation", ["train.json", "recipes/labelled_subset.json"],
                       ckpt_dir=str(tmp_path / "c"), output_dir=str(tmp_path / "c" / "eval"), **common, **draw)
    items = control.parser.get_parsed_content("train#dataset#data")
    kept = {item["image"] for item in items}
    assert len(kept) == 2 and len({item["case"] for item in items}) == 1
    for config in ["train.json", *spec.get("stages", [])]:
        wf = workflow(spec["bundle"], ["train.json"] + ([config] if config != "train.json" else []),
                      ckpt_dir=str(tmp_path / config), output_dir=str(tmp_path / config / "eval"),
                      **{**common, **spec["set"], **draw})
        assert {item["image"] for item in wf.parser.get_parsed_content("train#dataset#data")} == kept, config
        assert all("label" in item for item in wf.parser.get_parsed_content("train#dataset#data"))


@pytest.mark.slow
def test_gkd_runs_its_stages_in_the_run_folder_on_the_labelled_subject(eight_subjects, tmp_path):
    """GKD in (g), 2 steps: its baseline-student stage gets the run's steps, P-SAE and MSAN their own 30 epochs; every
    stage writes into the run folder (each finds the previous one's file there) with the labelled-subject overrides."""
    gkd = "GKD (bundle default; labelled subjects only)"
    doc = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "tools" / "kd_study.py"), "run", "--parts", "g", "--seeds", "0", "--recipes", gkd,
           "--out", str(tmp_path / "out"), "--data_dir", str(eight_subjects), "--teacher_steps", "2", "--doc", str(doc),
           "--steps", "{'g': 2}"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    run = json.loads(doc.with_suffix(".json").read_text())["runs"][f"g/{gkd}/seed0"]
    assert run["steps"] == 2 and 0 <= run["dice"]["mean"] <= 1
    folder = tmp_path / "out" / "g" / gkd.replace(" ", "_") / "seed0"
    assert all((folder / f).is_file() for f in ("student_baseline.pt", "psae.pt", "msan.pt", "model.pt",
                                                "stage0.done", "stage1.done", "stage2.done"))
    logs = sorted((tmp_path / "out" / "logs").glob("stage*_g_GKD*.log"))
    assert len(logs) == 3
    for i, log in enumerate(logs):
        text = log.read_text()
        assert "--labelled_fraction 0.125 --labelled_seed 0" in text and "split_labelled(" in text
        assert f"--ckpt_dir {folder} " in text
        assert kd_study.logged_steps(log) == (2 if i == 0 else 30)  # 1 step an epoch: 2 labelled slices
