"""The embedded demo dataset and the datalist checks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medkd.data import check_datalist, load_datalist, prepare_demo


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = prepare_demo(tmp_path / "a", subjects=3, seed=5, dims=2, spacing=8.0, slices_per_subject=2).parent
    b = prepare_demo(tmp_path / "b", subjects=3, seed=5, dims=2, spacing=8.0, slices_per_subject=2).parent
    c = prepare_demo(tmp_path / "c", subjects=3, seed=6, dims=2, spacing=8.0, slices_per_subject=2).parent
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


# SHA-256 over the sorted (relative path, bytes) of two small clean demo datasets, recorded with the generator as it
# was before the domain-shift option existed (commit 71355f5; numpy 2.4.6, scipy 1.17.1, nibabel 5.4.2, nilearn's
# MNI152 2009a files): the default output must stay byte-identical. Re-record only if a numpy/scipy/nibabel upgrade
# changes the floating-point results (then every other output changes too).
CLEAN_DEMO_SHA256 = {
    "2d": "30f88507636d6e30c307539bc67bd7167806aa345f20ac2f5eb7a4a1bf3d0f1b",
    "3d": "6ac6202ea542fabb82e693b0f4fab7cb9a8e2bac4e8e6daada9cc7bb8ef347fc",
}


def tree_sha256(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_default_demo_output_is_unchanged(tmp_path):
    two = prepare_demo(tmp_path / "2d", subjects=3, seed=5, dims=2, spacing=8.0, slices_per_subject=2).parent
    three = prepare_demo(tmp_path / "3d", subjects=3, seed=3, dims=3, spacing=8.0).parent
    assert {"2d": tree_sha256(two), "3d": tree_sha256(three)} == CLEAN_DEMO_SHA256


def test_unlabelled_subjects_add_images_only_and_keep_the_labelled_data(tmp_path):
    base = prepare_demo(tmp_path / "base", subjects=3, seed=5, dims=2, spacing=8.0, slices_per_subject=2).parent
    cmd = [sys.executable, "-m", "medkd", "prepare", "demo", "--out", str(tmp_path / "unl"), "--subjects", "3",
           "--seed", "5", "--dims", "2", "--spacing", "8", "--slices_per_subject", "2", "--unlabelled", "2"]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    unl = tmp_path / "unl"
    before, after = digest(base), digest(unl)
    # every labelled file is byte-identical; the only new files are the unlabelled subjects' images
    labelled_files = {k: v for k, v in before.items() if k != "datalist.json"}
    assert {k: v for k, v in after.items() if k in labelled_files} == labelled_files
    new = sorted(set(after) - set(before))
    assert new and all(k.startswith("imagesTr/unl-") for k in new) and len(new) == 2 * 2
    old, data = json.loads((base / "datalist.json").read_text()), json.loads((unl / "datalist.json").read_text())
    assert "unlabeled" not in old and data["numUnlabeled"] == len(data["unlabeled"]) == 4
    assert all(data[k] == old[k] for k in ("training", "validation", "test"))
    assert {e["subject"] for e in data["unlabeled"]} == {"unl-000", "unl-001"}
    assert all("label" not in e and {"image", "case", "slice"} <= set(e) for e in data["unlabeled"])
    entries = load_datalist(unl / "datalist.json", "unlabeled")
    assert all(nib.load(e["image"]).shape == nib.load(load_datalist(unl / "datalist.json")[0]["image"]).shape
               for e in entries)
    assert data["generator"]["unlabelled"] == 2
    # the unlabelled subjects are new anatomy, not copies of the labelled ones
    images = {k: v for k, v in after.items() if k.startswith("imagesTr/")}
    assert len(set(images.values())) == len(images)
    with pytest.raises(ValueError, match="unlabelled must be a number of subjects"):
        prepare_demo(tmp_path / "x", subjects=3, unlabelled=-1)


def test_demo_2d_layout_labels_and_splits(tiny2d):
    data = json.loads((tiny2d / "datalist.json").read_text())
    assert data["labels"] == {"0": "background", "1": "grey matter", "2": "white matter"}
    subjects = {split: {e["subject"] for e in data[split]} for split in ("training", "validation", "test")}
    assert all(subjects.values())
    assert not (subjects["training"] & subjects["test"]) and not (subjects["validation"] & subjects["test"])
    for entry in load_datalist(tiny2d / "datalist.json", "training"):
        img, lab = nib.load(entry["image"]), nib.load(entry["label"])
        assert img.shape == lab.shape == (48, 64)
        values = np.unique(np.asarray(lab.dataobj))
        assert set(values.tolist()) <= {0, 1, 2} and {1, 2} <= set(values.tolist())
        image = np.asarray(img.dataobj)
        # T1 contrast survives the bias field and noise: white matter is brighter than grey matter
        labels = np.asarray(lab.dataobj)
        assert image[labels == 2].mean() > image[labels == 1].mean() > image[labels == 0].mean()


def test_demo_3d_volumes(tiny3d):
    data = json.loads((tiny3d / "datalist.json").read_text())
    assert data["tensorImageSize"] == "3D" and data["numTraining"] == 1
    entry = load_datalist(tiny3d / "datalist.json", "training")[0]
    assert nib.load(entry["image"]).shape == (32, 32, 32)
    assert nib.load(entry["image"]).header.get_zooms() == (8.0, 8.0, 8.0)


def test_prepare_cli_and_bad_arguments(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "medkd", "prepare", "demo", "--out", str(out), "--subjects", "3", "--seed", "4", "--dims", "2", "--spacing", "8", "--slices_per_subject", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "datalist.json" in done.stdout and (out / "datalist.json").is_file()
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        prepare_demo(tmp_path / "x", dims=4)
    with pytest.raises(ValueError, match="at least 3 subjects"):
        prepare_demo(tmp_path / "x", subjects=2)
    with pytest.raises(TypeError, match="unknown demo dataset options"):
        prepare_demo(tmp_path / "x", subjects=3, noisee=0.1)


def test_check_datalist_errors_name_the_file(tiny2d, tmp_path):
    items = load_datalist(tiny2d / "datalist.json", "training")
    assert check_datalist(items, num_classes=3) == items

    missing = [dict(items[0], image=str(tmp_path / "gone.nii.gz"))]
    with pytest.raises(FileNotFoundError, match="image file not found: .*gone.nii.gz"):
        check_datalist(missing, num_classes=3)

    other = nib.load(items[0]["label"])
    cropped = tmp_path / "cropped_label.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(other.dataobj)[:40], other.affine), cropped)
    with pytest.raises(ValueError, match=r"has shape \(48, 64\) but label .*cropped_label.nii.gz has shape \(40, 64\)"):
        check_datalist([dict(items[0], label=str(cropped))], num_classes=3)

    big = tmp_path / "label_with_7.nii.gz"
    arr = np.asarray(other.dataobj).copy()
    arr[0, 0] = 7
    nib.save(nib.Nifti1Image(arr, other.affine), big)
    with pytest.raises(ValueError, match=r"label .*label_with_7.nii.gz has values \[7\] outside the classes 0..2"):
        check_datalist([dict(items[0], label=str(big))], num_classes=3)


def test_load_datalist_errors(tmp_path, tiny2d):
    with pytest.raises(FileNotFoundError, match="datalist file not found"):
        load_datalist(tmp_path / "none.json")
    with pytest.raises(KeyError, match="has no 'testing' list"):
        load_datalist(tiny2d / "datalist.json", "testing")
