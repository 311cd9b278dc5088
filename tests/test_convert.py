"""``python -m medkd prepare msd|lits|synapse``: converters on small replicas of the real download layouts."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from medkd.cli import prepare
from medkd.data.convert import ConvertOptions, apply_window, map_labels, split_cases
from medkd.data.datalist import load_datalist

SHAPE = (8, 6, 5)


def _volume(rng, labels=(1,), shape=SHAPE):
    """A CT-like volume and a label with foreground on slices 1..3 only."""
    image = rng.uniform(-300, 400, size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for k, value in enumerate(labels):
        label[2:5, 1:4, 1 + k : 4] = value
    return image, label


def _save(array, path):
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))


def _msd(root, n=4):
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    training = []
    for i in range(2, 2 + n):
        image, label = _volume(rng)
        _save(image, root / "imagesTr" / f"spleen_{i}.nii.gz")
        _save(label, root / "labelsTr" / f"spleen_{i}.nii.gz")
        training.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    _save(_volume(rng)[0], root / "imagesTs" / "spleen_1.nii.gz")
    meta = {"name": "Spleen", "labels": {"0": "background", "1": "spleen"}, "numTraining": n,
            "training": training, "test": ["./imagesTs/spleen_1.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _lits(root, n=3):
    rng = np.random.default_rng(1)
    for i in range(n):
        batch = root / f"Training Batch {1 + i // 2}"
        batch.mkdir(parents=True, exist_ok=True)
        image, label = _volume(rng, labels=(1, 2))
        _save(image, batch / f"volume-{i}.nii")
        _save(label, batch / f"segmentation-{i}.nii")
    return root


def _synapse(root, train=("case0005", "case0006", "case0007"), test=("case0001", "case0002")):
    rng = np.random.default_rng(2)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    for case in train:
        image, label = _volume(rng, labels=(3, 8))
        for z in range(SHAPE[-1]):
            np.savez(root / "train_npz" / f"{case}_slice{z:03d}.npz", image=image[..., z] / 400, label=label[..., z])
    for case in test:
        image, label = _volume(rng, labels=(5,))
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
            f["image"], f["label"] = np.moveaxis(image, -1, 0), np.moveaxis(label, -1, 0)
    return root


def _load_all(datalist_path):
    load = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"])])
    out = {}
    for key in ("training", "validation", "test"):
        out[key] = [(item["case"], load(item)) for item in load_datalist(datalist_path, key)]
    return out


def _check_patient_split(loaded):
    cases = {key: {c for c, _ in items} for key, items in loaded.items()}
    assert not cases["training"] & cases["validation"]
    assert not cases["training"] & cases["test"]
    assert not cases["validation"] & cases["test"]
    return cases


def test_msd_2d_target_slices(tmp_path, capsys):
    src = _msd(tmp_path / "Task09_Spleen", n=5)
    prepare("msd", out=str(tmp_path / "out"), src=str(src), window=[-200, 300], test_fraction=0.2, val_fraction=0.25)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[prepare] case")]
    assert [line.split(":")[0] for line in progress] == [f"[prepare] case {i}/5" for i in range(1, 6)]
    loaded = _load_all(tmp_path / "out" / "datalist.json")
    cases = _check_patient_split(loaded)
    assert sum(len(c) for c in cases.values()) == 5 and all(cases.values())
    for _, data in sum(loaded.values(), []):
        assert data["image"].shape == (1, 8, 6) and data["label"].shape == (1, 8, 6)
        assert data["label"].max() == 1  # only target-containing slices
        assert -1.0 <= float(data["image"].min()) and float(data["image"].max()) <= 1.0
    assert len(loaded["test"]) == 3  # slices 1..3 of one patient


def test_msd_3d_fractions_all_slices(tmp_path):
    src = _msd(tmp_path / "Task09_Spleen", n=4)
    path = tmp_path / "out"
    prepare("msd", out=str(path), src=str(src), dims=3, test_fraction=0.25, val_fraction=0.0,
            labelled_fraction=0.5)
    meta = json.loads((path / "datalist.json").read_text())
    assert len(meta["training"]) == 2 and len(meta["unlabeled"]) == 1 and "label" not in meta["unlabeled"][0]
    loaded = _load_all(path / "datalist.json")
    assert loaded["test"][0][1]["image"].shape == (1, *SHAPE)
    assert 1.0 < float(loaded["test"][0][1]["image"].max())  # no window: raw intensities

    prepare("msd", out=str(tmp_path / "all"), src=str(src), slices="all", data_fraction=0.5, val_fraction=0.0,
            test_fraction=0.25)
    meta = json.loads((tmp_path / "all" / "datalist.json").read_text())
    assert len(meta["training"]) == 2 * SHAPE[-1] and len(meta["test"]) == SHAPE[-1]  # 2 of 3 training patients


def test_lits_window_and_label_maps(tmp_path):
    src = _lits(tmp_path / "LiTS")
    for preset, expected in (("tumour", {0, 1}), ("organ", {0, 1}), (None, {0, 1, 2})):
        out = tmp_path / f"out_{preset}"
        prepare("lits", out=str(out), src=str(src), label_map=preset, test_fraction=0.34, val_fraction=0.0)
        loaded = _load_all(out / "datalist.json")
        _check_patient_split(loaded)
        values = set(np.unique(np.concatenate([d["label"].numpy().ravel() for _, d in sum(loaded.values(), [])])).tolist())
        assert values == expected
        n_slices = sum(len(v) for v in loaded.values())
        assert n_slices == (3 if preset != "tumour" else 2) * 3  # tumour only on slices 2..3
    meta = json.loads((tmp_path / "out_None" / "datalist.json").read_text())
    assert meta["options"]["window"] == [-60.0, 140.0]
    assert {e["case"] for e in meta["test"]} <= {"volume-0", "volume-1", "volume-2"}


def test_synapse_standard_split(tmp_path):
    src = _synapse(tmp_path / "Synapse")
    out = tmp_path / "out"
    prepare("synapse", out=str(out), src=str(src), dims=3, val_fraction=0.34)
    loaded = _load_all(out / "datalist.json")
    cases = _check_patient_split(loaded)
    assert cases["test"] == {"case0001", "case0002"}
    assert len(cases["validation"]) == 1 and len(cases["training"]) == 2
    train = loaded["training"][0][1]
    assert train["image"].shape == (1, *SHAPE) and set(np.unique(train["label"].numpy()).tolist()) == {0, 3, 8}
    assert set(np.unique(loaded["test"][0][1]["label"].numpy()).tolist()) == {0, 5}
    prepare("synapse", out=str(tmp_path / "random"), src=str(src), split="random", test_fraction=0.4, seed=3)
    assert _check_patient_split(_load_all(tmp_path / "random" / "datalist.json"))["test"] != cases["test"]


def _break_missing(src):
    (src / "labelsTr" / "spleen_3.nii.gz").unlink()
    return src / "labelsTr" / "spleen_3.nii.gz"


def _break_shape(src):
    _save(np.zeros((8, 6, 4), np.uint8), src / "labelsTr" / "spleen_3.nii.gz")
    return src / "labelsTr" / "spleen_3.nii.gz"


def _break_value(src):
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, 0] = 7
    _save(label, src / "labelsTr" / "spleen_4.nii.gz")
    return src / "labelsTr" / "spleen_4.nii.gz"


def _break_unreadable(src):
    (src / "imagesTr" / "spleen_2.nii.gz").write_bytes(b"not a nifti file")
    return src / "imagesTr" / "spleen_2.nii.gz"


@pytest.mark.parametrize("damage", [_break_missing, _break_shape, _break_value, _break_unreadable])
def test_damaged_download_leaves_nothing(tmp_path, damage):
    src = _msd(tmp_path / "Task09_Spleen")
    bad = damage(src)
    with pytest.raises((FileNotFoundError, ValueError), match=bad.name):
        prepare("msd", out=str(tmp_path / "out" / "spleen"), src=str(src))
    assert not (tmp_path / "out" / "spleen").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left either


def test_damaged_synapse_and_lits(tmp_path):
    src = _synapse(tmp_path / "Synapse")
    (src / "test_vol_h5" / "case0002.npy.h5").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="case0002.npy.h5"):
        prepare("synapse", out=str(tmp_path / "out"), src=str(src))
    lits = _lits(tmp_path / "LiTS")
    (lits / "Training Batch 2" / "segmentation-2.nii").unlink()
    with pytest.raises(FileNotFoundError, match="segmentation-2.nii"):
        prepare("lits", out=str(tmp_path / "out"), src=str(lits))
    assert not (tmp_path / "out").exists()


def test_options_and_helpers(tmp_path):
    np.testing.assert_allclose(apply_window(np.array([-100.0, -60.0, 40.0, 140.0, 500.0]), (-60, 140)),
                               [-1.0, -1.0, 0.0, 1.0, 1.0])
    label = np.array([0, 1, 2, 2])
    assert map_labels(label, "tumour").tolist() == [0, 0, 1, 1]
    assert map_labels(label, {2: 5}).tolist() == [0, 1, 5, 5]
    split = split_cases([f"p{i}" for i in range(10)], ConvertOptions(seed=1))
    assert split == split_cases([f"p{i}" for i in range(10)][::-1], ConvertOptions(seed=1))
    with pytest.raises(ValueError, match="slices"):
        ConvertOptions(slices="some")
    with pytest.raises(ValueError, match="needs --src"):
        prepare("msd", out=str(tmp_path / "o"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        prepare("msd", out=str(tmp_path / "exists"), src=str(_msd(tmp_path / "T")))


def _photo_cases(n=3):
    """Natively 2D RGB photographs with binary masks, through :class:`Case` directly."""
    from medkd.data.convert import Case

    rng = np.random.default_rng(5)
    cases = []
    for i in range(n):
        image = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        label = np.zeros((6, 8), np.uint8)
        label[1:3, 2:5] = 1 if i else 0  # the first photo has no foreground
        # the paths only name the files in errors; they must exist, the loader does not read them
        cases.append(Case(f"img{i}", Path(__file__), Path(__file__),
                          lambda image=image, label=label: (image, label, np.eye(4)), {"class": f"c{i}"}))
    return cases


def test_photos_written_as_png_with_resize(tmp_path):
    from medkd.data.convert import convert

    cases = _photo_cases()
    opts = ConvertOptions(dims=2, slices="all", resize=(12, 16), test_fraction=0.34, val_fraction=0.0)
    path = convert(cases, tmp_path / "out", opts, allowed_labels={0, 1})
    meta = json.loads(path.read_text())
    entries = meta["training"] + meta["test"]
    assert len(entries) == 3 and all(e["image"].endswith(".png") and e["class"] == "c" + e["case"][-1] for e in entries)
    loaded = _load_all(path)
    for case, data in sum(loaded.values(), []):
        # PIL reads (width, height, channels); image and label keep the same orientation
        assert data["image"].shape == (3, 16, 12) and data["label"].shape == (1, 16, 12)
        expected = np.zeros((12, 16), np.uint8)
        expected[2:6, 4:10] = case != "img0"
        np.testing.assert_array_equal(data["label"][0].numpy().T, expected)
    target = convert(cases, tmp_path / "target", ConvertOptions(dims=2, slices="target", test_fraction=0.0,
                                                                val_fraction=0.0))
    assert [e["case"] for e in json.loads(target.read_text())["training"]] == ["img1", "img2"]
    with pytest.raises(ValueError, match="use dims=2"):
        convert(cases, tmp_path / "d3", ConvertOptions(dims=3))
    with pytest.raises(ValueError, match="window applies to volumes"):
        convert(cases, tmp_path / "w", ConvertOptions(window=(0, 100)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]


def test_resize_inplane_hand_values():
    from medkd.data.convert import resize_inplane

    label = np.array([[0, 1], [2, 3]], np.uint8)
    np.testing.assert_array_equal(resize_inplane(label, (4, 4), nearest=True), np.kron(label, np.ones((2, 2), np.uint8)))
    flat = np.full((3, 5, 2), 7.5, np.float32)
    out = resize_inplane(flat, (6, 4), nearest=False)
    assert out.shape == (6, 4, 2) and out.dtype == np.float32 and np.allclose(out, 7.5)
    ramp = np.array([[0.0, 10.0]], np.float32)  # bilinear, half-pixel centres: 0, 2.5, 7.5, 10
    np.testing.assert_allclose(resize_inplane(ramp, (1, 4), nearest=False)[0], [0.0, 2.5, 7.5, 10.0])
    assert resize_inplane(np.array([[0, 255]], np.uint8), (1, 3), nearest=False).dtype == np.uint8


def test_multichannel_volume(tmp_path):
    from medkd.data.convert import Case, convert

    rng = np.random.default_rng(6)
    image = rng.normal(size=(*SHAPE, 2)).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[2:4, 2:4, 1:3] = 1
    cases = [Case(f"p{i}", Path(__file__), Path(__file__), lambda: (image, label, np.eye(4))) for i in range(2)]
    path = convert(cases, tmp_path / "out", ConvertOptions(dims=3, test_fraction=0.5, val_fraction=0.0))
    data = _load_all(path)["test"][0][1]
    assert data["image"].shape == (2, *SHAPE) and data["label"].shape == (1, *SHAPE)
    with pytest.raises(ValueError, match="use dims=3"):
        convert(cases, tmp_path / "d2", ConvertOptions(dims=2))


def test_unknown_option_names_the_accepted_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['annotator'\] for msd"):
        prepare("msd", out=str(tmp_path / "o"), src=str(_msd(tmp_path / "T")), annotator="2nd")
    assert not (tmp_path / "o").exists()
