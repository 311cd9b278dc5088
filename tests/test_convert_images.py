"""``python -m medkd prepare busi|cvc_clinicdb|chasedb1|drive|stare|m2caiseg``: readers of the 2D photo downloads on
tiny replicas of their released layouts (same folder and file names, same file formats), loaded back with MONAI."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from medkd.cli import prepare
from medkd.data.datalist import load_datalist

H, W = 6, 8
FORMATS = {".gif": "GIF", ".tif": "TIFF", ".png": "PNG", ".jpg": "JPEG", ".ppm": "PPM"}


def _save(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` in the format of ``path``'s suffix (``.ppm.gz``: a gzip-compressed PPM)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gz = path.name.endswith(".gz")
    suffix = Path(path.name[:-3]).suffix if gz else path.suffix
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format=FORMATS[suffix])
    path.write_bytes(gzip.compress(buffer.getvalue()) if gz else buffer.getvalue())
    return path


def _region(rows, cols, value=255):
    """A 0/``value`` mask with the block ``rows`` x ``cols`` set, and its {0, 1} expectation."""
    mask = np.zeros((H, W), np.uint8)
    mask[rows, cols] = value
    return mask, (mask > 0).astype(np.uint8)


A = _region(slice(1, 3), slice(2, 5))
B = _region(slice(3, 6), slice(0, 2))
EMPTY = _region(slice(0, 0), slice(0, 0))


def _rgb(seed):
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _load_all(out: Path) -> dict[str, tuple[str, dict, dict]]:
    """``{case: (split, entry, loaded)}`` of every datalist entry, loaded by LoadImaged + EnsureChannelFirstd."""
    load = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"])])
    meta = json.loads((out / "datalist.json").read_text())
    result = {}
    for split in ("training", "validation", "test"):
        if not meta[split]:  # MONAI's datalist loader fails on an empty "test" list
            continue
        for entry, item in zip(meta[split], load_datalist(out / "datalist.json", split)):
            assert entry["case"] not in result
            result[entry["case"]] = (split, entry, load(item))
    return result


def _label(data) -> np.ndarray:
    """The loaded label back in (H, W) orientation (PIL reads PNGs as (width, height))."""
    assert data["label"].shape == (1, W, H)
    return data["label"][0].numpy().T


def _rgb_image(data) -> np.ndarray:
    assert data["image"].shape == (3, W, H)
    return np.transpose(data["image"].numpy(), (2, 1, 0))


def _splits(loaded) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"training": set(), "validation": set(), "test": set()}
    for case, (split, _, _) in loaded.items():
        out[split].add(case)
    return out


@dataclass
class Replica:
    src: Path  # what --src points at
    image: Path  # the image and label of the case the damage tests break
    label: Path
    colour_mask: bool = False


# ------------------------------------------------------------------------------------------------------ replicas
def _busi(root: Path) -> Replica:
    """Dataset_BUSI_with_GT inside the folder an archive was extracted into; RGB PNGs with equal channels."""
    top = root / "archive" / "Dataset_BUSI_with_GT"
    specs = {("benign", 1): [A], ("benign", 2): [A, B], ("benign", 10): [B], ("malignant", 1): [B],
             ("normal", 1): [EMPTY]}
    for (cls, n), masks in specs.items():
        grey = np.full((H, W), 10 * n + len(cls), np.uint8)
        _save(top / cls / f"{cls} ({n}).png", np.stack([grey] * 3, -1))
        for k, (mask, _) in enumerate(masks):
            _save(top / cls / f"{cls} ({n})_mask{'' if k == 0 else f'_{k}'}.png", mask)
    return Replica(root / "archive", top / "benign" / "benign (1).png", top / "benign" / "benign (1)_mask.png")


def _cvc(root: Path, layout: str = "tif") -> Replica:
    """CVC-ClinicDB: Original/N.tif + Ground Truth/N.tif, the PNG variant, or both (Kaggle: TIF/ and PNG/)."""
    top = root / "CVC-ClinicDB"
    folders = {"tif": [(top, ".tif", 4)], "png": [(top / "PNG", ".png", 4)],
               "both": [(top / "TIF", ".tif", 4), (top / "PNG", ".png", 3)]}[layout]
    for folder, suffix, n in folders:
        for i in range(1, n + 1):
            _save(folder / "Original" / f"{i}{suffix}", _rgb(i))
            _save(folder / "Ground Truth" / f"{i}{suffix}", (A if i % 2 else B)[0])
    folder, suffix, _ = folders[0]
    return Replica(root if layout == "both" else top, folder / "Original" / f"1{suffix}",
                   folder / "Ground Truth" / f"1{suffix}")


CHASE = ("01L", "01R", "02L", "10R", "11L", "14R")


def _chase(root: Path) -> Replica:
    top = root / "CHASEDB1"
    for i, name in enumerate(CHASE):
        _save(top / f"Image_{name}.jpg", _rgb(i))
        _save(top / f"Image_{name}_1stHO.png", A[0])
        _save(top / f"Image_{name}_2ndHO.png", B[0])
    return Replica(top, top / "Image_01L.jpg", top / "Image_01L_1stHO.png")


def _drive(root: Path) -> Replica:
    top = root / "DRIVE"
    for n in (21, 22, 23):
        _save(top / "training" / "images" / f"{n}_training.tif", _rgb(n))
        _save(top / "training" / "1st_manual" / f"{n}_manual1.gif", A[0])
        _save(top / "training" / "mask" / f"{n}_training_mask.gif", np.full((H, W), 255, np.uint8))
    for n in ("01", "02"):
        _save(top / "test" / "images" / f"{n}_test.tif", _rgb(int(n)))
        _save(top / "test" / "1st_manual" / f"{n}_manual1.gif", A[0])
        _save(top / "test" / "2nd_manual" / f"{n}_manual2.gif", B[0])
        _save(top / "test" / "mask" / f"{n}_test_mask.gif", np.full((H, W), 255, np.uint8))
    return Replica(top, top / "training" / "images" / "21_training.tif",
                   top / "training" / "1st_manual" / "21_manual1.gif")


def _stare(root: Path, gz: bool = True) -> Replica:
    """20 labelled images in the release, here 2 (im0001, im0002) plus an unlabelled one (im0006)."""
    top, ext = root / "STARE", ".ppm.gz" if gz else ".ppm"
    for n in (1, 2, 6):
        _save(top / "stare-images" / f"im{n:04d}{ext}", _rgb(n))
    for n in (1, 2):
        _save(top / "labels-ah" / f"im{n:04d}.ah{ext}", np.stack([A[0]] * 3, -1))  # stored as colour PPM
        _save(top / "labels-vk" / f"im{n:04d}.vk{ext}", B[0])
    return Replica(top, top / "stare-images" / f"im0001{ext}", top / "labels-ah" / f"im0001.ah{ext}")


LIVER, GRASPER, HOOK_ALT, UNKNOWN = (85, 170, 0), (0, 85, 170), (0, 170, 255), (170, 0, 85)


def _m2cai_mask(kind: int):
    """A colour-coded ground truth and its hand-mapped class indices (black 0, grasper 1, hook 3, liver 10,
    unknown 18)."""
    rgb, expected = np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.uint8)
    rgb[1:3, 2:5], expected[1:3, 2:5] = LIVER, 10
    rgb[3:6, 0:2], expected[3:6, 0:2] = (GRASPER, 1) if kind % 2 else (HOOK_ALT, 3)
    rgb[0, 7], expected[0, 7] = UNKNOWN, 18
    return rgb, expected


M2CAI = {"train": (0, 1), "trainval": (0, 1, 2), "test": (0, 1)}


def _m2cai(root: Path) -> Replica:
    top = root / "m2caiSeg dataset"
    for folder, numbers in M2CAI.items():
        for n in numbers:
            _save(top / folder / "images" / f"{n}.jpg", _rgb(n))
            _save(top / folder / "groundtruth" / f"{n}_gt.png", _m2cai_mask(n)[0])
    return Replica(root, top / "train" / "images" / "0.jpg", top / "train" / "groundtruth" / "0_gt.png",
                   colour_mask=True)


# ------------------------------------------------------------------------------------------------- conversions
def test_busi(tmp_path):
    src = _busi(tmp_path).src
    out = tmp_path / "out"
    prepare("busi", out=str(out), src=str(src), test_fraction=0.2, val_fraction=0.25)
    meta = json.loads((out / "datalist.json").read_text())
    assert meta["channels"] == 1 and meta["labels"] == {"0": "background", "1": "lesion"}
    assert meta["options"]["slices"] == "all"
    loaded = _load_all(out)
    assert set(loaded) == {"benign_001", "benign_002", "benign_010", "malignant_001", "normal_001"}
    assert {k: len(v) for k, v in _splits(loaded).items()} == {"training": 3, "validation": 1, "test": 1}
    expected = {"benign_001": A[1], "benign_002": np.maximum(A[1], B[1]), "benign_010": B[1],
                "malignant_001": B[1], "normal_001": EMPTY[1]}
    for case, (_, entry, data) in loaded.items():
        cls, n = case.split("_")
        assert entry["class"] == cls
        assert data["image"].shape == (1, W, H)  # grey
        np.testing.assert_array_equal(data["image"][0].numpy().T, np.full((H, W), 10 * int(n) + len(cls)))
        np.testing.assert_array_equal(_label(data), expected[case])


@pytest.mark.parametrize("layout", ["tif", "png", "both"])
def test_cvc_clinicdb_layouts(tmp_path, layout):
    src = _cvc(tmp_path, layout).src
    out = tmp_path / "out"
    prepare("cvc_clinicdb", out=str(out), src=str(src), test_fraction=0.25, val_fraction=0.0, seed=1)
    loaded = _load_all(out)
    assert set(loaded) == {"001", "002", "003", "004"}  # with both, the 4-image TIFF release is used
    assert {k: len(v) for k, v in _splits(loaded).items()} == {"training": 3, "validation": 0, "test": 1}
    for case, (_, _, data) in loaded.items():
        np.testing.assert_array_equal(_rgb_image(data), _rgb(int(case)))
        np.testing.assert_array_equal(_label(data), (A if int(case) % 2 else B)[1])
    assert json.loads((out / "datalist.json").read_text())["channels"] == 3


def test_mask_threshold_for_antialiased_masks(tmp_path):
    replica = _cvc(tmp_path)
    soft = A[0].copy()
    soft[0, 0], soft[5, 7] = 100, 200  # anti-aliased edge values
    _save(replica.label, soft)
    with pytest.raises(ValueError, match=re.escape(str(replica.label)) + r" has values \[0, 100, 200, 255\]"):
        prepare("cvc_clinicdb", out=str(tmp_path / "strict"), src=str(replica.src))
    for threshold, on in ((200, [(5, 7)]), (100, [(0, 0), (5, 7)])):  # value >= threshold -> 1
        out = tmp_path / f"t{threshold}"
        prepare("cvc_clinicdb", out=str(out), src=str(replica.src), mask_threshold=threshold, test_fraction=0.0,
                val_fraction=0.0)
        expected = A[1].copy()
        for rc in on:
            expected[rc] = 1
        np.testing.assert_array_equal(_label(_load_all(out)["001"][2]), expected)
    with pytest.raises(ValueError, match="mask_threshold must be an integer in 1..255"):
        prepare("cvc_clinicdb", out=str(tmp_path / "bad"), src=str(replica.src), mask_threshold=0)


def test_chasedb1_annotators_and_standard_split(tmp_path):
    src = _chase(tmp_path).src
    for annotator, (_, expected) in (("1st", A), ("2nd", B)):
        out = tmp_path / annotator
        prepare("chasedb1", out=str(out), src=str(src), annotator=annotator, val_fraction=0.25)
        loaded = _load_all(out)
        splits = _splits(loaded)
        assert splits["test"] == {"Image_11L", "Image_14R"}  # 11L..14R are the test images
        assert splits["training"] | splits["validation"] == {f"Image_{n}" for n in ("01L", "01R", "02L", "10R")}
        assert len(splits["validation"]) == 1
        for _, _, data in loaded.values():
            assert _rgb_image(data).shape == (H, W, 3)  # JPEG: lossy, values not compared
            np.testing.assert_array_equal(_label(data), expected)
        assert json.loads((out / "datalist.json").read_text())["annotator"] == annotator
    with pytest.raises(ValueError, match=r"annotator must be one of \['1st', '2nd'\]"):
        prepare("chasedb1", out=str(tmp_path / "x"), src=str(src), annotator="3rd")


def test_drive_standard_split_second_annotator_and_challenge_release(tmp_path, capsys):
    src = _drive(tmp_path).src
    out = tmp_path / "first"
    prepare("drive", out=str(out), src=str(src), val_fraction=0.34)
    loaded = _load_all(out)
    splits = _splits(loaded)
    assert splits["test"] == {"01_test", "02_test"}
    assert splits["training"] | splits["validation"] == {"21_training", "22_training", "23_training"}
    for case, (_, _, data) in loaded.items():
        np.testing.assert_array_equal(_rgb_image(data), _rgb(int(case[:2])))
        np.testing.assert_array_equal(_label(data), A[1])
    assert not any("fov" in e for _, e, _ in loaded.values())  # FOV masks are not converted

    prepare("drive", out=str(tmp_path / "second"), src=str(src), annotator="2nd")
    loaded = _load_all(tmp_path / "second")
    assert _splits(loaded) == {"training": set(), "validation": set(), "test": {"01_test", "02_test"}}
    assert all(np.array_equal(_label(d), B[1]) for _, _, d in loaded.values())

    # the grand-challenge release has no test annotations: training images only, seeded split
    shutil.rmtree(src / "test" / "1st_manual")
    shutil.rmtree(src / "test" / "2nd_manual")
    prepare("drive", out=str(tmp_path / "challenge"), src=str(src), test_fraction=0.34, val_fraction=0.0)
    assert "withholds the test annotations" in capsys.readouterr().out
    meta = json.loads((tmp_path / "challenge" / "datalist.json").read_text())
    assert meta["test_annotations"] is False
    assert len(meta["training"]) == 2 and len(meta["test"]) == 1
    assert {e["case"] for e in meta["training"] + meta["test"]} == {"21_training", "22_training", "23_training"}
    with pytest.raises(FileNotFoundError, match="no test/2nd_manual/"):
        prepare("drive", out=str(tmp_path / "x"), src=str(src), annotator="2nd")


@pytest.mark.parametrize("gz", [True, False])
def test_stare_labelled_images_only(tmp_path, gz):
    src = _stare(tmp_path, gz).src
    for annotator, (_, expected) in (("ah", A), ("vk", B)):
        out = tmp_path / annotator
        prepare("stare", out=str(out), src=str(src), annotator=annotator, test_fraction=0.5, val_fraction=0.0)
        loaded = _load_all(out)
        assert set(loaded) == {"im0001", "im0002"}  # im0006 has no label
        assert {k: len(v) for k, v in _splits(loaded).items()} == {"training": 1, "validation": 0, "test": 1}
        for case, (_, _, data) in loaded.items():
            np.testing.assert_array_equal(_rgb_image(data), _rgb(int(case[2:])))
            np.testing.assert_array_equal(_label(data), expected)


def test_m2caiseg_colours_and_release_split(tmp_path):
    replica = _m2cai(tmp_path)
    out = tmp_path / "out"
    prepare("m2caiseg", out=str(out), src=str(replica.src), val_fraction=0.34)
    meta = json.loads((out / "datalist.json").read_text())
    assert len(meta["labels"]) == 19 and meta["labels"]["10"] == "liver" and meta["channels"] == 3
    loaded = _load_all(out)
    splits = _splits(loaded)
    assert splits["test"] == {"test_0", "test_1"}
    assert splits["training"] | splits["validation"] == {"train_0", "train_1", "val_2"}  # val_2: trainval only
    assert len(splits["validation"]) == 1
    for case, (_, entry, data) in loaded.items():
        release, n = case.split("_")
        assert entry["release_split"] == release
        assert _rgb_image(data).shape == (H, W, 3)
        np.testing.assert_array_equal(_label(data), _m2cai_mask(int(n))[1])

    # a blended edge colour: strict by default, mapped with a tolerance
    rgb, expected = _m2cai_mask(0)
    rgb[5, 7] = (87, 172, 1)  # distance 3 from liver
    expected[5, 7] = 10
    _save(replica.label, rgb)
    with pytest.raises(ValueError, match=re.escape(str(replica.label)) + r" has colours .*\(87, 172, 1\): 1 px"):
        prepare("m2caiseg", out=str(tmp_path / "strict"), src=str(replica.src))
    with pytest.raises(ValueError, match="has colours"):
        prepare("m2caiseg", out=str(tmp_path / "tight"), src=str(replica.src), colour_tolerance=2.9)
    prepare("m2caiseg", out=str(tmp_path / "tolerant"), src=str(replica.src), colour_tolerance=3)
    np.testing.assert_array_equal(_label(_load_all(tmp_path / "tolerant")["train_0"][2]), expected)


# ---------------------------------------------------------------------------------------------- damaged downloads
REPLICAS = {"busi": _busi, "cvc_clinicdb": _cvc, "chasedb1": _chase, "drive": _drive, "stare": _stare,
            "m2caiseg": _m2cai}


def _missing(r: Replica):
    r.label.unlink()
    return FileNotFoundError, "file not found: " + re.escape(str(r.label))


def _shape(r: Replica):
    _save(r.label, np.zeros((H - 1, W, 3) if r.colour_mask else (H - 1, W), np.uint8))
    return ValueError, "label " + re.escape(str(r.label)) + " has shape"


def _value(r: Replica):
    bad = np.zeros((H, W, 3) if r.colour_mask else (H, W), np.uint8)
    bad[2, 3] = 7
    _save(r.label, bad)
    return ValueError, re.escape(str(r.label)) + (" has colours" if r.colour_mask else r" has values \[0, 7\]")


def _unreadable(r: Replica):
    r.image.write_bytes(b"not an image")
    return ValueError, "cannot read " + re.escape(str(r.image)) + ":"


@pytest.mark.parametrize("damage", [_missing, _shape, _value, _unreadable])
@pytest.mark.parametrize("dataset", sorted(REPLICAS))
def test_damaged_download_names_the_file_and_leaves_nothing(tmp_path, dataset, damage):
    replica = REPLICAS[dataset](tmp_path / "download")
    error, pattern = damage(replica)
    with pytest.raises(error, match=pattern):
        prepare(dataset, out=str(tmp_path / "out" / dataset), src=str(replica.src))
    assert list((tmp_path / "out").iterdir()) == []  # no output, no temporary folder


def test_reader_errors_before_conversion(tmp_path):
    busi = _busi(tmp_path / "b")
    orphan = busi.image.parent / "benign (7)_mask.png"
    _save(orphan, A[0])
    with pytest.raises(FileNotFoundError, match=re.escape("benign (7).png")):
        prepare("busi", out=str(tmp_path / "out"), src=str(busi.src))
    orphan.unlink()
    shutil.copytree(busi.src / "Dataset_BUSI_with_GT", busi.src / "copy")
    with pytest.raises(ValueError, match="several BUSI folder"):
        prepare("busi", out=str(tmp_path / "out"), src=str(busi.src))
    # src one level inside the download's top folder
    prepare("busi", out=str(tmp_path / "inside"), src=str(busi.src / "copy" / "benign"), test_fraction=0.0)
    assert len(json.loads((tmp_path / "inside" / "datalist.json").read_text())["training"]) == 5
    with pytest.raises(FileNotFoundError, match="no CVC-ClinicDB folder"):
        prepare("cvc_clinicdb", out=str(tmp_path / "out"), src=str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="no STARE labels of annotator 'vk'"):
        prepare("stare", out=str(tmp_path / "out"), src=str(tmp_path / "b"), annotator="vk")
    assert not (tmp_path / "out").exists()
