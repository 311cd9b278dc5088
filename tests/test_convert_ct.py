"""``python -m medkd prepare kits19|chaos|flare22|synapse``: CT readers on small replicas of the released layouts."""

from __future__ import annotations

import json
import re

import h5py
import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from medkd.cli import prepare
from medkd.data.datalist import load_datalist
from medkd.data.datasets import SYNAPSE_SPLIT, SYNAPSE_TEST, SYNAPSE_TRAIN

ROWS, COLS, DEPTH = 8, 6, 5


def _load_all(datalist_path):
    load = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"])])
    return {key: [(item["case"], item, load(item)) for item in load_datalist(datalist_path, key)]
            for key in ("training", "validation", "test")}


def _patients(loaded):
    cases = {key: {c for c, _, _ in items} for key, items in loaded.items()}
    assert not cases["training"] & cases["validation"]
    assert not cases["training"] & cases["test"]
    assert not cases["validation"] & cases["test"]
    return cases


def _values(loaded):
    return set(np.unique(np.concatenate([d["label"].numpy().ravel() for _, _, d in sum(loaded.values(), [])])).tolist())


def _assert_nothing_left(out_parent):
    assert not out_parent.exists() or list(out_parent.iterdir()) == []  # no output, no temporary folder


# ------------------------------------------------------------------------------------------------------------ KiTS19

# the released KiTS19 affine: axes (slice, height, width), negative axis-swapped diagonal
KITS_AFFINE = np.array([[0.0, 0.0, -0.8, 0.0], [0.0, -0.75, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def _kits_case(rng):
    image = rng.uniform(-400, 600, size=(DEPTH, ROWS, COLS)).astype(np.float32)  # (slices, H, W)
    label = np.zeros((DEPTH, ROWS, COLS), np.uint8)
    label[1:4, 2:6, 1:4] = 1  # kidney on slices 1..3
    label[2, 3:5, 2] = 2  # tumour on slice 2
    return image, label


def _kits(root, labelled=range(5), unlabelled=(210, 211)):
    rng = np.random.default_rng(10)
    data = root / "data"
    arrays = {}
    for i in labelled:
        folder = data / f"case_{i:05d}"
        folder.mkdir(parents=True)
        image, label = _kits_case(rng)
        nib.save(nib.Nifti1Image(image, KITS_AFFINE), str(folder / "imaging.nii.gz"))
        nib.save(nib.Nifti1Image(label, KITS_AFFINE), str(folder / "segmentation.nii.gz"))
        arrays[folder.name] = (image, label)
    for i in unlabelled:  # the challenge's test set: imaging only
        folder = data / f"case_{i:05d}"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(_kits_case(rng)[0], KITS_AFFINE), str(folder / "imaging.nii.gz"))
    (data / "kits.json").write_text("[]")
    return root, arrays


def test_kits19_3d_axial_last_window_and_affine(tmp_path, capsys):
    src, arrays = _kits(tmp_path / "kits19")
    out = tmp_path / "out"
    prepare("kits19", out=str(out), src=str(src), dims=3, test_fraction=0.2, val_fraction=0.25)
    assert "skipped 2 unlabelled test-set case(s)" in capsys.readouterr().out
    loaded = _load_all(out / "datalist.json")
    cases = _patients(loaded)
    assert sorted(c for v in cases.values() for c in v) == [f"case_{i:05d}" for i in range(5)]
    assert (len(cases["training"]), len(cases["validation"]), len(cases["test"])) == (3, 1, 1)
    assert _values(loaded) == {0, 1, 2}
    for case, entry, data in sum(loaded.values(), []):
        image, label = arrays[case]
        assert data["image"].shape == (1, ROWS, COLS, DEPTH) and data["label"].shape == (1, ROWS, COLS, DEPTH)
        # axial axis last; window [-200, 300] -> [-1, 1] written out by hand
        expected = np.clip(np.transpose(image, (1, 2, 0)), -200, 300) / 250.0 - 0.2
        np.testing.assert_allclose(data["image"][0].numpy(), expected, atol=1e-5)
        np.testing.assert_array_equal(data["label"][0].numpy(), np.transpose(label, (1, 2, 0)))
        written = nib.load(str(out / entry["image"])).affine
        for k, i, j in [(0, 0, 0), (4, 7, 5), (2, 3, 1)]:  # same voxel, same world position
            np.testing.assert_allclose(written @ [i, j, k, 1], KITS_AFFINE @ [k, i, j, 1])
    meta = json.loads((out / "datalist.json").read_text())
    assert meta["options"]["window"] == [-200.0, 300.0] and meta["labels"]["2"] == "tumour"


def test_kits19_2d_slices_from_data_folder(tmp_path):
    src, arrays = _kits(tmp_path / "kits19", labelled=range(3), unlabelled=())
    out = tmp_path / "out"
    prepare("kits19", out=str(out), src=str(src / "data"), test_fraction=0.34, val_fraction=0.0,
            label_map="tumour")
    loaded = _load_all(out / "datalist.json")
    _patients(loaded)
    items = sum(loaded.values(), [])
    assert len(items) == 3 and {e["slice"] for _, e, _ in items} == {2}  # tumour only on slice 2 of each case
    for case, entry, data in items:
        assert data["image"].shape == (1, ROWS, COLS)
        np.testing.assert_array_equal(data["label"][0].numpy(), arrays[case][1][2] == 2)  # axial slice z = 2


def test_kits19_missing_labelled_segmentation_is_an_error(tmp_path):
    src, _ = _kits(tmp_path / "kits19", labelled=range(3), unlabelled=(209,))  # 209 is in the labelled range
    with pytest.raises(FileNotFoundError, match=r"case_00209.segmentation\.nii\.gz"):
        prepare("kits19", out=str(tmp_path / "out" / "k"), src=str(src))
    _assert_nothing_left(tmp_path / "out")


# ------------------------------------------------------------------------------------------------------------ CHAOS

INTERCEPT = -1024.0


def _write_dicom(path, stored, position, instance, spacing=(0.7, 0.8)):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    ds.RescaleIntercept, ds.RescaleSlope = INTERCEPT, 1.0
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 3.0
    ds.InstanceNumber = instance
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _chaos_patient(folder, hu_slices, masks, z_positions):
    """Files i0000,0000b.dcm ... and liver_GT_000.png ... in the given (file-name) order."""
    (folder / "DICOM_anon").mkdir(parents=True)
    (folder / "Ground").mkdir()
    for k, (hu, mask, z) in enumerate(zip(hu_slices, masks, z_positions)):
        stored = hu - INTERCEPT
        stored = stored.astype(np.uint16 if k % 2 else np.int16)  # both pixel representations
        _write_dicom(folder / "DICOM_anon" / f"i{k:04d},0000b.dcm", stored, (-100.0, -80.0, z), k + 1)
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "Ground" / f"liver_GT_{k:03d}.png")


def _chaos(root, patients=("1", "2", "5", "6", "8"), reversed_patient="2"):
    """CHAOS_Train_Sets/Train_Sets/CT/<patient>/...; slice k of every patient has HU 100 * k + pattern and liver at
    row k. ``reversed_patient``'s file names run from head to feet (z falling), the others from feet to head."""
    ct = root / "Train_Sets" / "CT"
    pattern = np.arange(ROWS * COLS, dtype=np.float64).reshape(ROWS, COLS) - 20
    for patient in patients:
        hu = [100.0 * k + pattern for k in range(4)]
        masks = []
        for k in range(4):
            mask = np.zeros((ROWS, COLS), np.uint8)
            mask[k, 1 : 1 + k] = 1  # slice 0 has no liver
            masks.append(mask)
        z = [50.0 - 3.0 * k for k in range(4)] if patient == reversed_patient else [20.0 + 3.0 * k for k in range(4)]
        _chaos_patient(ct / patient, hu, masks, z)
    (root / "Train_Sets" / "MR").mkdir()  # the MR half of the release is ignored
    return root


def test_chaos_3d_pairs_by_name_orders_by_position(tmp_path):
    src = _chaos(tmp_path / "CHAOS_Train_Sets")
    out = tmp_path / "out"
    prepare("chaos", out=str(out), src=str(src), dims=3, window=None, test_fraction=0.2, val_fraction=0.25)
    loaded = _load_all(out / "datalist.json")
    cases = _patients(loaded)
    assert sorted(c for v in cases.values() for c in v) == [f"chaos_ct_{p}" for p in ("1", "2", "5", "6", "8")]
    assert (len(cases["training"]), len(cases["validation"]), len(cases["test"])) == (3, 1, 1)
    assert _values(loaded) == {0, 1}
    pattern = np.arange(ROWS * COLS, dtype=np.float64).reshape(ROWS, COLS) - 20
    for case, entry, data in sum(loaded.values(), []):
        image, label = data["image"][0].numpy(), data["label"][0].numpy()
        assert image.shape == label.shape == (ROWS, COLS, 4)
        # file k (by name) sits at output slice k, or 3 - k when its names run head to feet
        files = [3, 2, 1, 0] if case == "chaos_ct_2" else [0, 1, 2, 3]
        for z, k in enumerate(files):
            np.testing.assert_array_equal(image[..., z], 100.0 * k + pattern)  # HU = stored + intercept
            expected = np.zeros((ROWS, COLS), np.uint8)
            expected[k, 1 : 1 + k] = 1  # the PNG of the same file index, 255 -> 1
            np.testing.assert_array_equal(label[..., z], expected)
        affine = nib.load(str(out / entry["image"])).affine
        first_z = 41.0 if case == "chaos_ct_2" else 20.0
        # DICOM LPS -> RAS: rows run along -y (0.7 mm), columns along -x (0.8 mm), slices up +z (3 mm)
        np.testing.assert_allclose(affine, [[0, -0.8, 0, 100.0], [-0.7, 0, 0, 80.0], [0, 0, 3.0, first_z],
                                            [0, 0, 0, 1]], atol=1e-6)


def test_chaos_2d_target_slices_default_window_and_src_levels(tmp_path):
    from medkd.data.ct_datasets import read_chaos

    src = _chaos(tmp_path / "CHAOS_Train_Sets", patients=("1", "2", "5"))
    for level in (src, src / "Train_Sets", src / "Train_Sets" / "CT"):
        assert [c.case_id for c in read_chaos(level).cases] == ["chaos_ct_1", "chaos_ct_2", "chaos_ct_5"]
    out = tmp_path / "out"
    prepare("chaos", out=str(out), src=str(src / "Train_Sets"), test_fraction=0.34, val_fraction=0.0)
    loaded = _load_all(out / "datalist.json")
    _patients(loaded)
    items = sum(loaded.values(), [])
    assert len(items) == 3 * 3  # slices 1..3 of each patient hold liver
    for _, _, data in items:
        assert data["image"].shape == (1, ROWS, COLS) and data["label"][0].numpy().any()
        # window [-60, 140] -> [-1, 1] by hand: HU of the slice is 100 * k + pattern
        image = data["image"][0].numpy()
        assert -1.0 <= image.min() and image.max() <= 1.0
    hu = 100.0 * 1 + np.arange(ROWS * COLS, dtype=np.float64).reshape(ROWS, COLS) - 20
    slice1 = next(d for c, e, d in items if c == "chaos_ct_1" and e["slice"] == 1)
    np.testing.assert_allclose(slice1["image"][0].numpy(), (np.clip(hu, -60, 140) + 60) / 100.0 - 1.0, atol=1e-6)


def test_chaos_test_set_and_several_ct_folders(tmp_path):
    test_set = tmp_path / "CHAOS_Test_Sets" / "Test_Sets" / "CT" / "3" / "DICOM_anon"
    test_set.mkdir(parents=True)
    _write_dicom(test_set / "i0000,0000b.dcm", np.zeros((ROWS, COLS), np.int16), (0, 0, 0), 1)
    with pytest.raises(FileNotFoundError, match="CHAOS test set"):
        prepare("chaos", out=str(tmp_path / "out" / "c"), src=str(tmp_path / "CHAOS_Test_Sets"))
    _chaos(tmp_path / "CHAOS_Train_Sets", patients=("1",))
    with pytest.raises(ValueError, match="several CT/ folders"):
        prepare("chaos", out=str(tmp_path / "out" / "c"), src=str(tmp_path))
    _assert_nothing_left(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------- FLARE22

FLARE_AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _flare(root, n=4):
    rng = np.random.default_rng(12)
    labelled = root / "Training" / "FLARE22_LabeledCase50"
    (labelled / "images").mkdir(parents=True)
    (labelled / "labels").mkdir()
    arrays = {}
    for i in range(1, n + 1):
        image = rng.uniform(-300, 400, size=(ROWS, COLS, DEPTH)).astype(np.float32)
        label = np.zeros((ROWS, COLS, DEPTH), np.uint8)
        label[1:4, 1:3, 1:4] = 1  # liver
        label[5:7, 2:5, 2] = 13  # left kidney
        label[0, 0, 3] = 5 + (i % 2)  # aorta or inferior vena cava
        nib.save(nib.Nifti1Image(image, FLARE_AFFINE), str(labelled / "images" / f"FLARE22_Tr_{i:04d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, FLARE_AFFINE), str(labelled / "labels" / f"FLARE22_Tr_{i:04d}.nii.gz"))
        arrays[f"FLARE22_Tr_{i:04d}"] = (image, label)
    unlabelled = root / "Training" / "FLARE22_UnlabeledCase1-1000"
    unlabelled.mkdir()
    for i in (1, 2):
        nib.save(nib.Nifti1Image(np.zeros((ROWS, COLS, DEPTH), np.float32), FLARE_AFFINE),
                 str(unlabelled / f"Case_{i:05d}_0000.nii.gz"))
    return root, arrays


def test_flare22_labelled_cases_window_0_1(tmp_path, capsys):
    src, arrays = _flare(tmp_path / "FLARE22")
    out = tmp_path / "out"
    prepare("flare22", out=str(out), src=str(src), dims=3, test_fraction=0.25, val_fraction=0.0)
    assert "2 unlabelled case(s)" in capsys.readouterr().out
    loaded = _load_all(out / "datalist.json")
    cases = _patients(loaded)
    assert sorted(c for v in cases.values() for c in v) == sorted(arrays)  # no Case_XXXXX
    assert len(cases["test"]) == 1 and _values(loaded) == {0, 1, 5, 6, 13}
    for case, _, data in sum(loaded.values(), []):
        image, label = arrays[case]
        np.testing.assert_allclose(data["image"][0].numpy(), (np.clip(image, -125, 275) + 125) / 400.0, atol=1e-6)
        np.testing.assert_array_equal(data["label"][0].numpy(), label)
    meta = json.loads((out / "datalist.json").read_text())
    assert meta["options"]["window"] == [-125.0, 275.0] and meta["options"]["out_range"] == [0.0, 1.0]
    assert len(meta["labels"]) == 14 and meta["labels"]["13"] == "left kidney"

    prepare("flare22", out=str(tmp_path / "slices"), src=str(src / "Training" / "FLARE22_LabeledCase50"),
            test_fraction=0.25, val_fraction=0.0)
    entries = sum(_load_all(tmp_path / "slices" / "datalist.json").values(), [])
    assert len(entries) == 4 * 3 and all(d["image"].shape == (1, ROWS, COLS) for _, _, d in entries)


# ----------------------------------------------------------------------------------------------------------- Synapse


def test_synapse_published_split():
    assert len(SYNAPSE_TRAIN) == 18 and len(SYNAPSE_TEST) == 12 and not set(SYNAPSE_TRAIN) & set(SYNAPSE_TEST)
    assert {int(c[4:]) for c in SYNAPSE_SPLIT} == {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 21, 22, 23, 24, 25, 26, 27, 28, 29,
                                                    30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40}
    assert {"case0001", "case0002", "case0003", "case0004", "case0008", "case0022"} <= set(SYNAPSE_TEST)


def _synapse(root, train, test):
    rng = np.random.default_rng(13)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    for case in train:
        for z in range(3):
            label = np.zeros((ROWS, COLS), np.uint8)
            label[2:4, 2:4] = 7
            np.savez(root / "train_npz" / f"{case}_slice{z:03d}.npz", image=rng.random((ROWS, COLS)), label=label)
    for case in test:
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
            f["image"], f["label"] = rng.random((3, ROWS, COLS)), np.full((3, ROWS, COLS), 8, np.uint8)
    return root


def test_synapse_split_by_published_ids(tmp_path, capsys):
    # case0008 is a published test case even if its slices sit in train_npz
    src = _synapse(tmp_path / "Synapse", train=("case0031", "case0008", "case0040"), test=("case0035",))
    prepare("synapse", out=str(tmp_path / "out"), src=str(src), dims=3, val_fraction=0.0)
    assert "26 of the 30 cases of the published split are not in the download" in capsys.readouterr().out
    cases = _patients(_load_all(tmp_path / "out" / "datalist.json"))
    assert cases["test"] == {"case0008", "case0035"} and cases["training"] == {"case0031", "case0040"}

    other = _synapse(tmp_path / "Other", train=("case0031", "case0041"), test=("case0035",))
    with pytest.raises(ValueError, match=r"\['case0041'\] are not in the standard split.*--split random"):
        prepare("synapse", out=str(tmp_path / "bad" / "s"), src=str(other))
    _assert_nothing_left(tmp_path / "bad")
    prepare("synapse", out=str(tmp_path / "random"), src=str(other), split="random", test_fraction=0.34,
            val_fraction=0.0)
    assert sum(len(v) for v in _patients(_load_all(tmp_path / "random" / "datalist.json")).values()) == 3


# ----------------------------------------------------------------------------------------------- damaged replicas


def _kits_damage(kind, root):
    src, _ = _kits(root, labelled=range(3), unlabelled=())
    case = src / "data" / "case_00001"
    if kind == "missing":
        (case / "segmentation.nii.gz").unlink()
        return src, case / "segmentation.nii.gz"
    if kind == "shape":
        nib.save(nib.Nifti1Image(np.zeros((DEPTH, ROWS, COLS - 1), np.uint8), KITS_AFFINE),
                 str(case / "segmentation.nii.gz"))
        return src, case / "segmentation.nii.gz"
    if kind == "value":
        label = np.zeros((DEPTH, ROWS, COLS), np.uint8)
        label[0, 0, 0] = 3
        nib.save(nib.Nifti1Image(label, KITS_AFFINE), str(case / "segmentation.nii.gz"))
        return src, case / "segmentation.nii.gz"
    (case / "imaging.nii.gz").write_bytes(b"not a nifti file")
    return src, case / "imaging.nii.gz"


def _chaos_damage(kind, root):
    src = _chaos(root, patients=("1", "2", "5"))
    patient = src / "Train_Sets" / "CT" / "5"
    png = patient / "Ground" / "liver_GT_002.png"
    if kind == "missing":
        png.unlink()
        return src, png
    if kind == "shape":
        Image.fromarray(np.zeros((ROWS, COLS + 2), np.uint8)).save(png)
        return src, png
    if kind == "value":
        mask = np.zeros((ROWS, COLS), np.uint8)
        mask[1, 1] = 128
        Image.fromarray(mask).save(png)
        return src, png
    dicom = patient / "DICOM_anon" / "i0001,0000b.dcm"
    dicom.write_bytes(b"not a dicom file")
    return src, dicom


def _flare_damage(kind, root):
    src, _ = _flare(root, n=3)
    labels = src / "Training" / "FLARE22_LabeledCase50" / "labels"
    if kind == "missing":
        (labels / "FLARE22_Tr_0002.nii.gz").unlink()
        return src, labels / "FLARE22_Tr_0002.nii.gz"
    if kind == "shape":
        nib.save(nib.Nifti1Image(np.zeros((ROWS, COLS, DEPTH + 1), np.uint8), FLARE_AFFINE),
                 str(labels / "FLARE22_Tr_0003.nii.gz"))
        return src, labels / "FLARE22_Tr_0003.nii.gz"
    if kind == "value":
        label = np.zeros((ROWS, COLS, DEPTH), np.uint8)
        label[0, 0, 0] = 14
        nib.save(nib.Nifti1Image(label, FLARE_AFFINE), str(labels / "FLARE22_Tr_0001.nii.gz"))
        return src, labels / "FLARE22_Tr_0001.nii.gz"
    image = src / "Training" / "FLARE22_LabeledCase50" / "images" / "FLARE22_Tr_0002_0000.nii.gz"
    image.write_bytes(b"\x1f\x8b garbage")
    return src, image


@pytest.mark.parametrize("kind", ["missing", "shape", "value", "unreadable"])
@pytest.mark.parametrize("dataset, damage", [("kits19", _kits_damage), ("chaos", _chaos_damage),
                                             ("flare22", _flare_damage)])
def test_damaged_download_names_the_file_and_leaves_nothing(tmp_path, dataset, damage, kind):
    src, bad = damage(kind, tmp_path / "download")
    (tmp_path / "out").mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(bad.name)) as error:
        prepare(dataset, out=str(tmp_path / "out" / dataset), src=str(src), dims=3)
    if dataset == "chaos" and kind == "missing":  # a slice-count mismatch names the patient's folders
        assert str(bad.parent) in str(error.value) and "4 DICOM slices but" in str(error.value)
    _assert_nothing_left(tmp_path / "out")


def test_chaos_extra_dicom_slice_names_the_folder(tmp_path):
    src = _chaos(tmp_path / "CHAOS_Train_Sets", patients=("1", "2"))
    dicom_dir = src / "Train_Sets" / "CT" / "2" / "DICOM_anon"
    _write_dicom(dicom_dir / "i0004,0000b.dcm", np.zeros((ROWS, COLS), np.int16), (-100, -80, 90), 5)
    with pytest.raises(ValueError, match=re.escape(str(dicom_dir)) + ".*5 DICOM slices but .* 4 PNG masks"):
        prepare("chaos", out=str(tmp_path / "out" / "c"), src=str(src))
    assert not (tmp_path / "out").exists()
