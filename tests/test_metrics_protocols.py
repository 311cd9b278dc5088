"""medkd.metrics.protocols: every metric against hand-computed values on tiny arrays."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from medkd.metrics import (
    GASTRIC_CROP_START,
    EMKDProtocol,
    GraphFlowProtocol,
    PooledBinaryProtocol,
    TransUNetProtocol,
    center_crop_2d,
    emkd_binarize,
    medpy_hd95,
    mtms_binarize,
    per_case_dice_hd95,
    transunet_case_metrics,
    write_results,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI-internal deprecation in the HD code


# ---------------------------------------------------------------------------------------------------------------- EMKD
def _probs(fg: np.ndarray) -> np.ndarray:
    """Two-channel softmax probabilities (C, ...) with channel 1 = ``fg``."""
    return np.stack([1.0 - fg, fg])


def test_emkd_threshold_is_strict_at_0_4():
    fg = np.array([[0.4, 0.41], [0.39, 1.0]])
    assert emkd_binarize(_probs(fg)).tolist() == [[False, True], [False, True]]
    batch = torch.from_numpy(np.stack([_probs(fg)] * 2))  # (B, C, H, W)
    assert emkd_binarize(batch, channel_dim=1).shape == (2, 2, 2)


def test_emkd_protocol_hand_values():
    proto = EMKDProtocol()
    # case "a", slice 1: pred fg = {(0,1)} (0.4 itself is background), gt = {(0,0), (0,1)}
    proto.update("a", _probs(np.array([[0.4, 0.9], [0.1, 0.2]])), np.array([[1, 1], [0, 0]]))
    # case "a", slice 2 (binary pred): pred = {(0,0), (1,1)}, gt = {(0,0)}
    proto.update("a", np.array([[1, 0], [0, 1]]), np.array([[1, 0], [0, 0]]))
    # case "b": gt empty, pred = 1 voxel -> left out of the summary
    proto.update("b", np.array([[1, 0], [0, 0]]), np.zeros((2, 2), dtype=np.int64))
    # case "c": P = 2, G = 4, I = 2
    proto.update("c", np.array([[1, 1], [0, 0]]), np.ones((2, 2), dtype=np.int64))
    rows = {r["case"]: r for r in proto.per_case()}
    # a: P = 1 + 2 = 3, G = 2 + 1 = 3, I = 1 + 1 = 2
    assert (rows["a"]["P"], rows["a"]["G"], rows["a"]["I"]) == (3, 3, 2)
    assert rows["a"]["dice"] == pytest.approx((2 * 2 + 1) / (3 + 3 + 1))  # 5/7
    assert rows["a"]["voe"] == pytest.approx(2 * (3 - 2) / (3 + 3))  # 1/3
    assert rows["a"]["rvd"] == pytest.approx(3 / 3 - 1)  # 0
    # c: dice = 5/7, voe = 2*0/6 = 0, rvd = 2/4 - 1 = -0.5
    assert (rows["c"]["dice"], rows["c"]["voe"], rows["c"]["rvd"]) == pytest.approx((5 / 7, 0.0, -0.5))
    # b: dice = (0 + 1)/(1 + 0 + 1) = 0.5, voe = 2*1/1 = 2, rvd undefined
    assert rows["b"]["dice"] == pytest.approx(0.5) and rows["b"]["voe"] == 2.0 and math.isnan(rows["b"]["rvd"])
    s = proto.summary()
    assert s["num_cases"] == 2
    assert (s["dice"], s["voe"], s["rvd"]) == pytest.approx((5 / 7, (1 / 3 + 0) / 2, (0 - 0.5) / 2))


def test_emkd_protocol_no_gt_and_bad_shapes():
    proto = EMKDProtocol()
    proto.update(0, np.zeros((2, 2), dtype=np.int64), np.zeros((2, 2), dtype=np.int64))
    assert math.isnan(proto.per_case()[0]["voe"])  # P + G = 0
    assert proto.summary()["num_cases"] == 0 and math.isnan(proto.summary()["dice"])
    with pytest.raises(ValueError, match="channel axis"):
        proto.update(0, np.zeros((2, 3, 3)), np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="differ"):
        proto.update(0, np.zeros((3, 3), dtype=np.int64), np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="at least 2 channels"):
        emkd_binarize(np.zeros((1, 2, 2)))


# ------------------------------------------------------------------------------------------------------------- HD95
def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Object voxels with a face neighbour outside the object or outside the array."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return mask & ~inner


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    pa = np.argwhere(_brute_surface(a)) * spacing
    pb = np.argwhere(_brute_surface(b)) * spacing
    d = cdist(pa, pb)  # all pairwise distances between the two surfaces
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def test_medpy_hd95_hand_value():
    # single voxels at (0, 0) and (0, 3): every surface distance is 3
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0, 0], b[0, 3] = True, True
    assert medpy_hd95(a, b) == pytest.approx(3.0)
    assert medpy_hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    # a 3x3 square vs itself shifted right by 1 column: surfaces are the 8 border voxels each
    a, b = np.zeros((5, 6), bool), np.zeros((5, 6), bool)
    a[1:4, 1:4], b[1:4, 2:5] = True, True
    # pred->gt: column 1 (3 voxels) at distance 1, others 0; gt->pred: column 4 (3 voxels) at 1, others 0
    # pooled 16 values: 10 zeros, 6 ones -> 95th percentile = 1
    assert medpy_hd95(a, b) == pytest.approx(1.0)


@pytest.mark.parametrize("shape, spacing", [((7, 8), (1.0, 1.0)), ((5, 6, 7), (2.0, 0.5, 1.0)), ((6, 6, 6), None)])
def test_medpy_hd95_matches_brute_force(shape, spacing):
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random(shape) > 0.6, rng.random(shape) > 0.7
        want = _brute_hd95(a, b, np.ones(len(shape)) if spacing is None else np.array(spacing))
        assert medpy_hd95(a, b, spacing=spacing) == pytest.approx(want)


def test_medpy_hd95_pools_both_directions_unlike_monai():
    from monai.metrics import compute_hausdorff_distance

    # pred: 3x3 square (surface: its 8 border voxels); gt: the same square plus one voxel at (0, 8)
    a = np.zeros((3, 9), bool)
    a[0:3, 0:3] = True
    b = a.copy()
    b[0, 8] = True
    # pred->gt: 8 zeros; gt->pred: 8 zeros and 6 (from (0, 8) to (0, 2))
    # pooled 17 values (16 zeros, one 6): rank 0.95 * 16 = 15.2 -> 0.2 * 6 = 1.2
    assert medpy_hd95(a, b) == pytest.approx(1.2) == _brute_hd95(a, b, np.ones(2))
    # MONAI: max of directed 95th percentiles = gt->pred over 9 values: rank 7.6 -> 0.6 * 6 = 3.6
    ta, tb = torch.tensor(a)[None, None], torch.tensor(b)[None, None]
    monai = compute_hausdorff_distance(ta, tb, percentile=95, include_background=True)
    assert float(monai) == pytest.approx(3.6)


def test_medpy_hd95_errors():
    with pytest.raises(ValueError, match="empty"):
        medpy_hd95(np.zeros((3, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="differ"):
        medpy_hd95(np.ones((3, 3)), np.ones((3, 4)))


# ---------------------------------------------------------------------------------------------------------- TransUNet
def test_transunet_conventions_and_summary():
    gt = np.zeros((2, 4, 4), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[0, 0, 0:2] = 1  # class 1: gt 2 voxels
    pred[0, 0, 0] = 1  # class 1: pred 1 voxel inside -> dice = 2*1/(1+2) = 2/3
    pred[1, 3, 3] = 2  # class 2: pred only -> (1, 0)
    gt[1, 2, 2] = 3  # class 3: gt only, pred empty -> (0, 0)
    # class 4: both empty -> (0, 0)
    m = transunet_case_metrics(pred, gt, num_classes=5)
    assert m["dice_class1"] == pytest.approx(2 / 3)
    # class-1 surfaces: pred {(0,0,0)}, gt {(0,0,0), (0,0,1)} -> distances pred->gt [0], gt->pred [0, 1]
    # pooled [0, 0, 1]: 95th percentile = 0 + 0.9 * (1 - 0) = 0.9 (linear interpolation at rank 1.9)
    assert m["hd95_class1"] == pytest.approx(0.9)
    assert (m["dice_class2"], m["hd95_class2"]) == (1.0, 0.0)
    assert (m["dice_class3"], m["hd95_class3"]) == (0.0, 0.0)
    assert (m["dice_class4"], m["hd95_class4"]) == (0.0, 0.0)

    proto = TransUNetProtocol(num_classes=3)
    proto.update("x", torch.from_numpy(pred.clip(0, 2)), torch.from_numpy(gt.clip(0, 2)))  # class 3 -> 2 in gt
    proto.update("y", gt.clip(0, 2), gt.clip(0, 2))  # perfect: (1, 0) for both classes
    rows = proto.per_case()
    # case x, class 2: pred {(1,3,3)}, gt {(1,2,2)} -> dice 0, both surfaces 1 voxel at sqrt(2)
    assert rows[0]["dice_class2"] == 0.0 and rows[0]["hd95_class2"] == pytest.approx(math.sqrt(2))
    assert rows[0]["dice_mean"] == pytest.approx((2 / 3 + 0) / 2)
    s = proto.summary()
    assert s["dice_class1"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["hd95_class2"] == pytest.approx(math.sqrt(2) / 2)
    assert s["dice"] == pytest.approx(((2 / 3 + 1) / 2 + (0 + 1) / 2) / 2)
    assert s["num_cases"] == 2


def test_transunet_bad_input():
    with pytest.raises(ValueError, match="integer"):
        transunet_case_metrics(np.zeros((3, 3)), np.zeros((3, 3), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="outside"):
        transunet_case_metrics(np.full((3, 3), 5), np.zeros((3, 3), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="at least 2"):
        TransUNetProtocol(num_classes=1)
    with pytest.raises(ValueError, match="no case"):
        TransUNetProtocol(num_classes=2).summary()


# --------------------------------------------------------------------------------------------------------- Graph Flow
def test_center_crop():
    x = np.arange(256 * 256).reshape(256, 256)
    crop = center_crop_2d(x, 64, start=GASTRIC_CROP_START)
    assert crop.shape == (64, 64) and crop[0, 0] == 95 * 256 + 95 and crop[-1, -1] == 158 * 256 + 158
    assert center_crop_2d(x, 64)[0, 0] == 96 * 256 + 96  # exact centre
    assert center_crop_2d(torch.zeros(2, 5, 7, dtype=torch.int64), 3).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="does not fit"):
        center_crop_2d(x, 64, start=200)
    with pytest.raises(ValueError, match="at least 2 dims"):
        center_crop_2d(np.zeros(5), 2)


def test_graph_flow_confusion_hand_values():
    gt = np.array([[0, 0, 1], [1, 1, 255]])  # 255 is ignored
    pred = np.array([[0, 1, 1], [0, 1, 0]])
    proto = GraphFlowProtocol(num_classes=2)
    proto.update(pred, gt)
    # rows gt, cols pred: gt0 -> pred (0, 1); gt1 -> pred (1, 0, 1)
    assert proto.matrix.tolist() == [[1, 1], [1, 2]]
    s = proto.summary()
    assert s["acc"] == pytest.approx(3 / 5)
    # IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 2 / (3 + 3 - 2) = 1/2
    assert (s["iou_class0"], s["iou_class1"], s["miou"]) == pytest.approx((1 / 3, 1 / 2, 5 / 12))
    # precision = 2/3, recall = 2/3, TNR = 1/2, F1 = 2/3
    assert (s["precision"], s["recall"], s["tnr"], s["f1"]) == pytest.approx((2 / 3, 2 / 3, 1 / 2, 2 / 3))


def test_graph_flow_crop_only_counts_the_window():
    gt = np.zeros((1, 6, 6), dtype=np.int64)
    pred = np.ones_like(gt)  # wrong everywhere outside the window
    pred[:, 2:4, 2:4] = 0
    gt[:, 2, 2] = 1  # the window [2:4, 2:4] holds 3 correct background pixels and one missed foreground pixel
    proto = GraphFlowProtocol(num_classes=2, crop_size=2)
    proto.update(pred, gt)
    assert proto.matrix.tolist() == [[3, 0], [1, 0]]
    s = proto.summary()
    # ACC 3/4; IoU0 = 3 / (3 + 4 - 3) = 3/4; IoU1 = 0 / 1 = 0; mIoU = 3/8
    assert (s["acc"], s["miou"]) == pytest.approx((3 / 4, 3 / 8))
    assert math.isnan(s["precision"])  # nothing predicted as class 1
    with pytest.raises(ValueError, match="no pixel"):
        GraphFlowProtocol().summary()
    with pytest.raises(ValueError, match="outside"):
        GraphFlowProtocol().update(np.full((2, 2), 2), np.zeros((2, 2), dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------- MTMS-CKD
def test_mtms_binarize_modes():
    logits = torch.tensor([0.5, 0.51, 0.3, -0.1])
    assert mtms_binarize(logits).tolist() == [False, True, False, False]  # raw logits > 0.5
    assert mtms_binarize(logits, mode="sigmoid").tolist() == [True, True, True, False]  # sigmoid > 0.5 <=> logit > 0
    with pytest.raises(ValueError, match="mode"):
        mtms_binarize(logits, mode="softmax")


def test_pooled_binary_hand_values():
    proto = PooledBinaryProtocol()
    proto.update(np.array([[1, 1], [0, 0]]), np.array([[1, 0], [1, 0]]))  # TP 1, FP 1, FN 1
    proto.update(np.array([[1, 0], [0, 0]]), np.zeros((2, 2), dtype=np.int64))  # empty gt: FP 1
    proto.update(np.ones((2, 2), dtype=bool), np.ones((2, 2), dtype=np.int64))  # TP 4
    s = proto.summary()
    assert (s["tp"], s["fp"], s["fn"]) == (5, 2, 1)
    # dice = 10/13, iou = 5/8, precision = 5/7, recall = 5/6
    assert (s["dice"], s["iou"], s["precision"], s["recall"]) == pytest.approx((10 / 13, 5 / 8, 5 / 7, 5 / 6))
    empty = PooledBinaryProtocol()
    empty.update(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 2), dtype=np.int64))
    assert all(math.isnan(empty.summary()[k]) for k in ("dice", "iou", "precision", "recall"))


# ------------------------------------------------------------------------------------------------------------- common
def test_per_case_dice_hd95_hand_values_and_empty_masks():
    gt = np.zeros((6, 6), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[0, 0:2] = 1
    pred[0, 0] = 1  # class 1: dice 2*1/(1+2) = 2/3
    pred[5, 5] = 2  # class 2: empty gt -> dice 0, hd95 NaN
    gt[3, 3] = 3  # class 3: empty pred -> dice 0, hd95 NaN
    # class 4: both empty -> NaN, NaN
    m = per_case_dice_hd95(pred, gt, num_classes=5)
    assert m["dice_class1"] == pytest.approx(2 / 3)
    # MONAI: directed pred->gt 95th pct of [0] = 0; gt->pred of [0, 1] = 0.95; max = 0.95
    assert m["hd95_class1"] == pytest.approx(0.95)
    assert m["dice_class2"] == 0.0 and m["dice_class3"] == 0.0
    assert all(math.isnan(m[k]) for k in ("hd95_class2", "hd95_class3", "dice_class4", "hd95_class4"))


def test_per_case_dice_hd95_3d_spacing():
    a, b = np.zeros((3, 4, 4), dtype=np.int64), np.zeros((3, 4, 4), dtype=np.int64)
    a[0, 0, 0], b[2, 0, 0] = 1, 1  # two voxels 2 slices apart
    m = per_case_dice_hd95(torch.from_numpy(a), torch.from_numpy(b), num_classes=2, spacing=(2.5, 1.0, 1.0))
    assert m["dice_class1"] == 0.0 and m["hd95_class1"] == pytest.approx(5.0)


def test_per_case_dice_hd95_bad_input():
    with pytest.raises(ValueError, match="2D or 3D"):
        per_case_dice_hd95(np.zeros((2, 2, 2, 2), dtype=np.int64), np.zeros((2, 2, 2, 2), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="differ"):
        per_case_dice_hd95(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 3), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="integer"):
        per_case_dice_hd95(np.zeros((2, 2), dtype=np.float32), np.zeros((2, 2), dtype=np.int64), 2)


# ------------------------------------------------------------------------------------------------------------ results
def test_write_results(tmp_path):
    rows = [
        {"case": "a", "dice": 0.5, "hd95": 2.0, "P": 3},
        {"case": "b", "dice": 1.0, "hd95": math.nan, "P": 4},
        {"case": "c", "dice": 0.0, "hd95": 4.0, "P": 0, "extra": "x"},
    ]
    per_case, summary = write_results(rows, tmp_path / "out", "emkd")
    assert per_case.name == "emkd_per_case.csv" and summary.name == "emkd_summary.csv"
    with open(per_case) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["case", "dice", "hd95", "P", "extra"] and table[2]["extra"] == "x"
    with open(summary) as f:
        stats = {r["metric"]: r for r in csv.DictReader(f)}
    assert set(stats) == {"dice", "hd95"}  # ints and strings are not metrics
    # dice: mean 0.5, population std sqrt(((0)^2 + 0.5^2 + 0.5^2)/3) = sqrt(1/6)
    assert float(stats["dice"]["mean"]) == pytest.approx(0.5)
    assert float(stats["dice"]["std"]) == pytest.approx(math.sqrt(1 / 6))
    # hd95: NaN dropped -> values (2, 4): mean 3, std 1, n 2
    assert (float(stats["hd95"]["mean"]), float(stats["hd95"]["std"]), stats["hd95"]["n"]) == (3.0, 1.0, "2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["emkd_per_case.csv", "emkd_summary.csv"]
    with pytest.raises(ValueError, match="no rows"):
        write_results([], tmp_path, "x")


def test_write_results_with_groups(tmp_path):
    rows = [
        {"domain": "clean", "case": "a", "dice": 0.5},
        {"domain": "clean", "case": "b", "dice": 1.0},
        {"case": "a", "dice": 0.2, "domain": "shift"},
    ]
    per_case, summary = write_results(rows, tmp_path, "gkd", group_key="domain")
    with open(per_case) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["domain", "case", "dice"] and [r["domain"] for r in table] == ["clean", "clean", "shift"]
    with open(summary) as f:
        stats = list(csv.DictReader(f))
    # one block per group, each over its own rows: clean mean 0.75, std 0.25; shift 0.2, std 0
    assert [(r["domain"], r["metric"], float(r["mean"]), float(r["std"]), r["n"]) for r in stats] == [
        ("clean", "dice", 0.75, 0.25, "2"),
        ("shift", "dice", pytest.approx(0.2), 0.0, "1"),
    ]
    with pytest.raises(ValueError, match=r"group_key 'domain': rows \[0\] do not have it"):
        write_results([{"case": "x", "dice": 1.0}], tmp_path, "y", group_key="domain")
