"""The demo's few-labels plan (medkd.demo._runs): both students make exactly the same number of optimiser steps on the
same labelled subjects, checked against the bundles' real data loaders, and the KD student's other images carry no
label."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_2D, workflow

from medkd.demo import _runs


@pytest.fixture(scope="module")
def four_subjects(tmp_path_factory) -> Path:
    """6 pseudo-subjects at 4 mm (4 training subjects of 4 slices), no 'unlabeled' list: the demo's layout, small."""
    from medkd.data.demo import prepare_demo

    out = tmp_path_factory.mktemp("demo_plan")
    prepare_demo(out, subjects=6, seed=1, dims=2, spacing=4.0, slices_per_subject=4)
    return out


@pytest.mark.parametrize("fraction,steps", [(0.25, 6), (0.5, 8)])
def test_students_share_labels_and_steps(four_subjects, teacher_2d, tmp_path, fraction, steps):
    batch = 4  # 1 labelled subject (4 slices): 1 step an epoch, KD 12 / 2 = 6; 2 subjects: 2 and 8 / 2 = 4
    datalist = four_subjects / "datalist.json"
    runs, titles = _runs("few_labels", datalist, tmp_path, 1, 0, steps, fraction, "recipes/kd_logits_t1.json", 3.0, batch)
    loaders, labelled = {}, {}
    for name in ("baseline", "kd"):
        bundle, configs, overrides = runs[name]
        overrides = {**overrides, "teacher_ckpt": str(teacher_2d)} if name == "kd" else overrides
        wf = workflow(bundle, configs, dataset_dir=str(four_subjects), ckpt_dir=str(tmp_path / name),
                      output_dir=str(tmp_path / name / "eval"), **{**TINY_2D, **overrides})
        assert wf.parser.get_parsed_content("lr_scheduler#T_max") == steps  # one cosine schedule over the steps
        loaders[name] = len(wf.parser.get_parsed_content("train#dataloader")) * wf.parser.get_parsed_content("epochs")
        if name == "kd":
            split = wf.parser.get_parsed_content("train#split")
            labelled[name] = {e["image"] for e in split["labelled"]}
            assert split["unlabelled"] and all("label" not in e for e in split["unlabelled"])
            assert not labelled[name] & {e["image"] for e in split["unlabelled"]}
            assert wf.parser.get_parsed_content("kd_terms#0#weight") == 3.0
        else:
            labelled[name] = {e["image"] for e in wf.parser.get_parsed_content("train#dataset#data")}
        wf.finalize()
    assert loaders == {"baseline": steps, "kd": steps}
    assert labelled["baseline"] == labelled["kd"] and len(labelled["kd"]) == 4 * round(fraction * 4)
    assert "1 subject labelled" in titles["baseline"] if fraction == 0.25 else "2 subjects labelled" in titles["baseline"]


def test_full_regime_and_bad_regime(four_subjects, tmp_path):
    runs, titles = _runs("full", four_subjects / "datalist.json", tmp_path, 3, 0, 6, 0.25, "recipes/kd_logits_t1.json", None)
    assert [runs[n][2]["epochs"] for n in ("teacher", "baseline", "kd")] == [3, 3, 3]
    assert titles["kd"] == "student with EMKD"
    with pytest.raises(ValueError, match="unknown demo regime 'few'"):
        _runs("few", four_subjects / "datalist.json", tmp_path, 3, 0, 6, 0.25, "recipes/kd_logits_t1.json", None)
    with pytest.raises(ValueError, match="5 steps is not a whole number of epochs"):
        _runs("few_labels", four_subjects / "datalist.json", tmp_path, 3, 0, 5, 0.25, "recipes/kd_logits_t1.json", None)


# ---- the shipped demo teacher (medkd/assets/demo_teacher.pt): when the demo may use it instead of training one ----

def test_teacher_fingerprint_follows_the_training_data(four_subjects, tmp_path):
    import json
    import shutil

    from medkd.demo import teacher_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(four_subjects, copy)
    base = teacher_fingerprint(four_subjects / "datalist.json", 30, 0)
    assert teacher_fingerprint(copy / "datalist.json", 30, 0) == base  # relative paths and bytes, not the folder
    assert (base["epochs"], base["seed"], base["bundle"]) == (30, 0, "supervised_segmentation")
    lists = json.loads((copy / "datalist.json").read_text())
    test_image = copy / lists["test"][0]["image"]
    test_image.write_bytes(test_image.read_bytes() + b"\0")  # the teacher never sees the test split
    assert teacher_fingerprint(copy / "datalist.json", 30, 0)["data_sha256"] == base["data_sha256"]
    for key, field in (("training", "label"), ("validation", "image")):
        changed = tmp_path / f"changed_{key}"
        shutil.copytree(four_subjects, changed)
        target = changed / lists[key][-1][field]
        target.write_bytes(target.read_bytes() + b"\0")
        assert teacher_fingerprint(changed / "datalist.json", 30, 0)["data_sha256"] != base["data_sha256"], key


def test_shipped_teacher_is_used_only_when_its_record_matches(four_subjects, tmp_path):
    import json

    from medkd.demo import shipped_teacher, teacher_fingerprint
    from medkd.io import file_sha256

    fingerprint = teacher_fingerprint(four_subjects / "datalist.json", 30, 0)
    ckpt = tmp_path / "demo_teacher.pt"
    assert shipped_teacher(fingerprint, ckpt)[0] is None and "no shipped teacher" in shipped_teacher(fingerprint, ckpt)[1]
    ckpt.write_bytes(b"weights")
    record = {**fingerprint, "sha256": file_sha256(ckpt), "train_seconds": 140.0}
    ckpt.with_suffix(".json").write_text(json.dumps(record))
    path, why = shipped_teacher(fingerprint, ckpt)
    assert path == ckpt and "trained 30 epochs in 140 s" in why
    for key, value in (("epochs", 60), ("seed", 1), ("data_sha256", "0" * 64), ("config_sha256", "1" * 64)):
        assert shipped_teacher({**fingerprint, key: value}, ckpt) == (
            None, f"the shipped teacher was trained with another {key} than this demo uses "
                  "(rebuild it: python -m medkd demo --teacher rebuild)")
    assert shipped_teacher({**fingerprint, "torch": "0.0"}, ckpt)[0] == ckpt  # versions are recorded, not compared
    ckpt.with_suffix(".json").write_text("{not json")
    assert shipped_teacher(fingerprint, ckpt)[0] is None and "is not valid JSON" in shipped_teacher(fingerprint, ckpt)[1]
    ckpt.with_suffix(".json").write_text(json.dumps(record))
    ckpt.write_bytes(b"other weights")
    assert shipped_teacher(fingerprint, ckpt)[0] is None
    assert "does not match the sha256 of its record" in shipped_teacher(fingerprint, ckpt)[1]


def test_the_shipped_teacher_fits_the_bundle_and_the_demo_defaults():
    """The committed checkpoint: intact, trained with today's teacher config and the demo's default epochs and seed, and
    loads strictly into the supervised bundle's network (a config change that stales it fails here: rebuild it)."""
    import inspect
    import json

    import torch

    from medkd.demo import SHIPPED_TEACHER, _network, bundles_dir, run_demo
    from medkd.io import file_sha256

    record = json.loads(SHIPPED_TEACHER.with_suffix(".json").read_text())
    assert record["sha256"] == file_sha256(SHIPPED_TEACHER)
    config = bundles_dir() / "supervised_segmentation" / "configs" / "train.json"
    assert record["config_sha256"] == file_sha256(config), "teacher config changed: python -m medkd demo --teacher rebuild"
    defaults = {k: p.default for k, p in inspect.signature(run_demo).parameters.items()}
    assert (record["epochs"], record["seed"], record["bundle"]) == (defaults["epochs"], defaults["seed"],
                                                                    "supervised_segmentation")
    network = _network("supervised_segmentation")
    state = torch.load(SHIPPED_TEACHER, map_location="cpu", weights_only=True)
    assert network.load_state_dict(state, strict=True).missing_keys == []
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) > 1_000_000  # the 1.6M teacher


@pytest.mark.slow
def test_the_shipped_teacher_was_trained_on_the_demo_data(tmp_path):
    """`make demo`'s data, written afresh here, is the data the shipped teacher's record names (else the demo trains)."""
    import json

    from medkd.data.demo import prepare_demo
    from medkd.demo import SHIPPED_TEACHER, shipped_teacher, teacher_fingerprint

    record = json.loads(SHIPPED_TEACHER.with_suffix(".json").read_text())
    datalist = prepare_demo(tmp_path / "demo2d", subjects=12, seed=record["seed"], dims=2)
    assert shipped_teacher(teacher_fingerprint(datalist, record["epochs"], record["seed"]))[0] == SHIPPED_TEACHER


@pytest.mark.slow
def test_demo_rebuilds_then_uses_the_shipped_teacher(tmp_path, monkeypatch):
    """`--teacher rebuild` writes the checkpoint and its record; the next `auto` demo trains no teacher, copies those
    weights and measures the same teacher Dice; `train` ignores the shipped one."""
    import json

    import medkd.demo as demo

    monkeypatch.setattr(demo, "SHIPPED_TEACHER", tmp_path / "assets" / "demo_teacher.pt")
    args = {"epochs": 1, "subjects": 4, "seed": 0, "data_dir": tmp_path / "data", "student_steps": 6,
            "labelled_fraction": 0.5}
    demo.run_demo(tmp_path / "rebuild", teacher="rebuild", **args)
    record = json.loads((tmp_path / "assets" / "demo_teacher.json").read_text())
    assert record["epochs"] == 1 and record["train_seconds"] > 0
    assert (tmp_path / "assets" / "demo_teacher.pt").read_bytes() == (tmp_path / "rebuild" / "teacher" / "model.pt").read_bytes()
    demo.run_demo(tmp_path / "auto", teacher="auto", **args)
    assert not (tmp_path / "auto" / "logs" / "train_teacher.log").exists()
    assert (tmp_path / "auto" / "teacher" / "model.pt").read_bytes() == (tmp_path / "assets" / "demo_teacher.pt").read_bytes()
    first, second = (json.loads((tmp_path / d / "results.json").read_text())["teacher"] for d in ("rebuild", "auto"))
    assert second["mean_dice"] == first["mean_dice"] and second["train_seconds"] == record["train_seconds"]
    assert "shipped checkpoint" in second["title"] and "shipped checkpoint" not in first["title"]
    with pytest.raises(ValueError, match="unknown teacher mode 'ship'"):
        demo.run_demo(tmp_path / "bad", teacher="ship", **args)
