"""The unlabelled-data recipes: labelled + unlabelled batches (unlabelled.json) and label-free KD (label_free.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BUNDLES, TINY_2D, copy_datalist, error_chain, workflow

from medkd.data import label_free_entries, load_datalist


def record_batches(wf) -> list[dict]:
    """Every training step's ``labelled`` flags and losses, from a forward hook on the trainer's Distiller."""
    seen: list[dict] = []

    def _record(module, args, out):
        flags = args[2] if len(args) > 2 else None
        seen.append({"labelled": None if flags is None else [bool(f) for f in flags],
                     **{k: float(v) for k, v in out.items() if k.startswith(("loss_", "raw_"))}})

    wf.trainer.network.register_forward_hook(_record)
    return seen


def test_label_free_run_reads_no_training_label(tiny2d, teacher_2d, tmp_path):
    """Training entries without 'label' keys and without label files: the label-free recipe trains from the teacher
    alone (task loss 0, KD terms > 0) and validates on the labelled validation split."""
    def strip(data):
        for entry in data["training"]:
            entry.pop("label")

    data = copy_datalist(tiny2d, tmp_path / "data", strip)
    for entry in json.loads((tiny2d / "datalist.json").read_text())["training"]:
        (data / entry["label"]).unlink()  # any read of a training label would now fail
    out = tmp_path / "run"
    wf = workflow("emkd_segmentation", ["train.json", "recipes/label_free.json"], dataset_dir=str(data),
                  ckpt_dir=str(out), output_dir=str(out / "eval"), teacher_ckpt=str(teacher_2d),
                  label_free_lists=["training", "unlabeled"], **{**TINY_2D, "epochs": 2})
    seen = record_batches(wf)
    wf.run()
    datalist = data / "datalist.json"
    n_images = len(load_datalist(datalist, "training")) + len(load_datalist(datalist, "unlabeled"))
    assert sum(len(s["labelled"]) for s in seen) == 2 * n_images  # every image of both lists, each epoch
    assert all(not any(s["labelled"]) for s in seen)
    assert all(s["loss_task"] == 0.0 for s in seen)
    assert all(s["raw_pmd"] > 0 and s["raw_imd_low"] > 0 for s in seen)  # the teacher-matching terms train
    assert all(s["raw_rad_low"] == 0.0 for s in seen)  # label-reading terms are masked
    assert wf.evaluator.state.metrics["val_mean_dice"] >= 0.0  # validation still scores on labels
    assert (out / "model.pt").is_file()
    wf.finalize()


def test_unlabelled_recipe_mixes_labelled_and_unlabelled_samples(tiny2d, teacher_2d, tmp_path):
    out = tmp_path / "run"
    wf = workflow("emkd_segmentation", ["train.json", "recipes/unlabelled.json"], dataset_dir=str(tiny2d),
                  ckpt_dir=str(out), output_dir=str(out / "eval"), teacher_ckpt=str(teacher_2d), **TINY_2D)
    seen = record_batches(wf)
    wf.run()
    unlabelled = load_datalist(tiny2d / "datalist.json", "unlabeled")
    labelled = load_datalist(tiny2d / "datalist.json", "training")
    # batch_size/2 pairs: every batch holds as many labelled as unlabelled samples; an epoch is the larger set
    assert all(s["labelled"].count(True) == s["labelled"].count(False) for s in seen)
    assert sum(len(s["labelled"]) for s in seen) == 2 * max(len(labelled), len(unlabelled))
    assert all(s["loss_task"] > 0 and s["raw_pmd"] > 0 for s in seen)
    wf.finalize()


def test_label_free_entries(tiny2d):
    path = tiny2d / "datalist.json"
    both = label_free_entries(path, ["training", "unlabeled"])
    assert len(both) == len(load_datalist(path, "training")) + len(load_datalist(path, "unlabeled"))
    assert all("label" not in e and Path(e["image"]).is_file() for e in both)
    assert label_free_entries(path, "training") == label_free_entries(path, ["training"])
    with pytest.raises(KeyError, match="has no 'unlabelled' list"):
        label_free_entries(path, ["unlabelled"])
    with pytest.raises(ValueError, match="at least one list"):
        label_free_entries(path, [])


def test_every_kd_bundle_ships_the_unlabelled_recipes():
    for bundle in ("emkd", "graph_flow", "gkd", "acw_skd", "mtms_ckd"):
        recipes = BUNDLES / f"{bundle}_segmentation" / "configs" / "recipes"
        for name in ("unlabelled.json", "label_free.json"):
            content = json.loads((recipes / name).read_text())
            assert "train#mark_labelled" in content, (bundle, name)
        assert json.loads((recipes / "label_free.json").read_text())["train#trainer#key_train_metric"] is None


def test_unlabelled_recipe_without_extra_list(tiny2d, tmp_path):
    """``unlabelled_list`` null: a datalist without an 'unlabeled' list still trains semi-supervised; the unlabelled set
    is exactly the training subjects whose labels ``labelled_fraction`` drops (labels removed), in every KD bundle;
    ``labelled_seed`` (default: the run's seed) fixes which subjects keep their labels."""
    def one_case_per_entry(data):
        for i, entry in enumerate(data["training"]):
            entry["case"] = f"case{i}"
        data.pop("unlabeled", None)

    data = copy_datalist(tiny2d, tmp_path / "data", one_case_per_entry)
    training = load_datalist(data / "datalist.json", "training")
    assert len(training) >= 2
    from monai.bundle import ConfigParser

    for bundle in ("emkd", "graph_flow", "gkd", "acw_skd", "mtms_ckd"):
        cdir = BUNDLES / f"{bundle}_segmentation" / "configs"
        parser = ConfigParser()
        parser.read_config([str(cdir / "train.json"), str(cdir / "recipes" / "unlabelled.json")])
        parser.update({"dataset_dir": str(data), "bundle_root": str(cdir.parent), "unlabelled_list": None,
                       "labelled_fraction": 0.5, "seed": 3})
        split = parser.get_parsed_content("train#split")
        labelled = {e["image"] for e in split["labelled"]}
        unlabelled = {e["image"] for e in split["unlabelled"]}
        assert len(labelled) == round(0.5 * len(training)), bundle
        assert labelled | unlabelled == {e["image"] for e in training} and not labelled & unlabelled, bundle
        assert all("label" not in e for e in split["unlabelled"]), bundle
        parser.update({"seed": 11, "labelled_seed": 3})  # labelled_seed pins the draw whatever the run's seed
        assert {e["image"] for e in parser.get_parsed_content("train#split", lazy=False)["labelled"]} == labelled, bundle
        parser.update({"unlabelled_list": "unlabeled"})  # the default list is missing here: a clear error
        with pytest.raises(Exception) as err:
            parser.get_parsed_content("train#split", lazy=False)
        assert "has no 'unlabeled' list" in error_chain(err.value), bundle
