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
