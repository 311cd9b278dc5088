"""GKD's evaluation protocol (global confusion matrix + pixel AUC), cross-domain evaluation in one run (load_domains,
ProtocolSaver's group_key) and the domain-shifted demo data."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, TINY_2D, run_workflow
from monai.bundle import ConfigParser
from monai.metrics import compute_roc_auc
from test_eval_protocols import num, read_csv, run_engine

from medkd.data import check_datalist, load_datalist, load_domains, prepare_demo
from medkd.data.demo import SHIFT_PRESETS, DomainShift
from medkd.engines import PROTOCOL_OPTIONS, ProtocolSaver, needs_probabilities
from medkd.metrics import GKDProtocol, confusion_matrix, roc_auc


# ------------------------------------------------------------------------------------------------------------ helpers
def onehot(label_map: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy((np.arange(n).reshape((n,) + (1,) * label_map.ndim) == label_map[None]).astype(np.float32))


def item(label: np.ndarray, prob: np.ndarray, **fields) -> dict:
    """A decollated evaluator item as the bundles' postprocessing gives it: one-hot argmax, one-hot label, softmax."""
    n = prob.shape[0]
    return {"pred": onehot(prob.argmax(0), n), "label": onehot(label, n), "prob": torch.from_numpy(prob.astype(np.float32)), **fields}


def random_case(rng, shape, n=2, noise=1.5) -> tuple[np.ndarray, np.ndarray]:
    """A label map with a blob per class and softmax probabilities that mostly agree with it."""
    label = np.zeros(shape, np.int64)
    for c in range(1, n):
        lo = [int(rng.integers(0, s // 2)) for s in shape]
        label[tuple(slice(a, a + max(2, s // 3)) for a, s in zip(lo, shape))] = c
    logits = rng.normal(0.0, noise, (n, *shape)) + 2.0 * onehot(label, n).numpy()
    e = np.exp(logits)
    return label, e / e.sum(0)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


def naive_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mann-Whitney by brute force: over every (positive, negative) pair, 1 if the positive scores higher, 1/2 on a tie."""
    pos, neg = scores[positives], scores[~positives]
    total = 0.0
    for p in pos:
        for q in neg:
            total += 1.0 if p > q else 0.5 if p == q else 0.0
    return total / (len(pos) * len(neg))


# ---------------------------------------------------------------------------------------------- GKDProtocol, by hand
def test_gkd_binary_hand_worked():
    gt = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    p1 = np.array([[0.9, 0.4, 0.6, 0.1], [0.8, 0.3, 0.2, 0.4]])  # class-1 probability; argmax = p1 > 0.5
    pred = (p1 > 0.5).astype(np.int64)  # [[1, 0, 1, 0], [1, 0, 0, 0]]
    proto = GKDProtocol(2)
    proto.update(pred, gt, np.stack([1 - p1, p1]))
    # TP (0,0),(1,0) = 2; FN (0,1) = 1; FP (0,2) = 1; TN = 4
    assert proto.matrix.tolist() == [[4, 1], [1, 2]]
    s = proto.summary()
    assert (s["tp_class1"], s["fn_class1"], s["fp_class1"], s["tn_class1"]) == (2, 1, 1, 4)
    se, sp, pre = 2 / 3, 4 / 5, 2 / 3
    assert s["acc"] == pytest.approx(6 / 8)
    assert (s["recall_class1"], s["tnr_class1"], s["precision_class1"]) == pytest.approx((se, sp, pre))
    assert s["f1_class1"] == pytest.approx(2 * pre * se / (pre + se))  # test.py's formula
    # IoU1 = 2 / (2 + 1 + 1); IoU0 = 4 / (4 + 1 + 1); mIoU over both classes
    assert (s["iou_class1"], s["iou_class0"], s["miou"]) == pytest.approx((1 / 2, 2 / 3, (1 / 2 + 2 / 3) / 2))
    # AUC by counting: positives 0.9, 0.4, 0.8 against negatives 0.6, 0.1, 0.3, 0.2, 0.4:
    # 0.9 and 0.8 beat all 5; 0.4 beats 0.1, 0.3, 0.2, ties 0.4, loses to 0.6 -> (5 + 5 + 3.5) / 15
    assert s["auc_class1"] == pytest.approx(13.5 / 15)
    assert s["f1_mean"] == s["f1_class1"] and s["auc_mean"] == s["auc_class1"]

    # a field of view leaving out the FP pixel (0, 2) and the TN pixel (1, 3)
    fov = np.ones_like(gt, dtype=bool)
    fov[0, 2] = fov[1, 3] = False
    masked = GKDProtocol(2)
    masked.update(pred, gt, np.stack([1 - p1, p1]), mask=fov)
    m = masked.summary()
    assert masked.matrix.tolist() == [[3, 0], [1, 2]]
    assert (m["acc"], m["precision_class1"], m["tnr_class1"]) == pytest.approx((5 / 6, 1.0, 1.0))
    # AUC over the 6 pixels: negatives 0.1, 0.3, 0.2 -> every positive beats them all
    assert m["auc_class1"] == pytest.approx(1.0)


def test_gkd_three_classes_one_vs_rest_and_miou_with_background():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 1]])
    proto = GKDProtocol(3, auc=False)
    proto.update(pred, gt)
    # rows gt: gt0 -> pred (0, 1, 2); gt1 -> (1, 1, 1); gt2 -> (2, 0)
    assert proto.matrix.tolist() == [[1, 1, 1], [0, 3, 0], [1, 0, 1]]
    s = proto.summary()
    assert s["acc"] == pytest.approx(5 / 8)
    # class 1: TP 3, FN 0, FP 1, TN 4; class 2: TP 1, FN 1, FP 1, TN 5
    assert (s["recall_class1"], s["tnr_class1"], s["f1_class1"]) == pytest.approx((1.0, 4 / 5, 6 / 7))
    assert (s["recall_class2"], s["tnr_class2"], s["f1_class2"]) == pytest.approx((1 / 2, 5 / 6, 1 / 2))
    # IoU0 = 1 / (3 + 2 - 1) = 1/4; IoU1 = 3 / 4; IoU2 = 1 / 3; mIoU includes the background
    assert (s["iou_class0"], s["iou_class1"], s["iou_class2"]) == pytest.approx((1 / 4, 3 / 4, 1 / 3))
    assert s["miou"] == pytest.approx((1 / 4 + 3 / 4 + 1 / 3) / 3)
    assert s["iou_mean"] == pytest.approx((3 / 4 + 1 / 3) / 2)  # foreground only
    assert s["f1_mean"] == pytest.approx((6 / 7 + 1 / 2) / 2)
    assert "auc_class1" not in s


def test_gkd_empty_class_and_errors():
    proto = GKDProtocol(3)
    gt = np.zeros((2, 3), np.int64)
    gt[0, 0] = 1
    prob = np.full((3, 2, 3), 1 / 3)
    proto.update(np.zeros_like(gt), gt, prob)
    s = proto.summary()
    assert s["f1_class1"] == 0.0 and math.isnan(s["precision_class1"])  # missed: Dice 0, nothing predicted
    assert math.isnan(s["f1_class2"]) and math.isnan(s["auc_class2"])  # class 2 absent everywhere
    assert s["auc_class1"] == pytest.approx(0.5)  # all scores tied
    assert math.isnan(s["iou_class2"]) and s["miou"] == pytest.approx((5 / 6 + 0.0) / 2)
    with pytest.raises(ValueError, match="no pixel"):
        GKDProtocol(2).summary()
    with pytest.raises(ValueError, match="needs the softmax probabilities"):
        GKDProtocol(2).update(gt.clip(0, 1), gt.clip(0, 1))
    with pytest.raises(ValueError, match=r"prob must have shape \(num_classes, \*gt.shape\) = \(2, 2, 3\)"):
        GKDProtocol(2).update(gt.clip(0, 1), gt.clip(0, 1), np.zeros((3, 2, 3)))
    with pytest.raises(ValueError, match="mask shape"):
        confusion_matrix(gt, gt, 3, mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2), np.int64), 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_equals_the_pairwise_mann_whitney_count(seed):
    rng = np.random.default_rng(seed)
    n = 300
    positives = rng.random(n) < 0.3
    scores = np.round(rng.random(n) * 0.5 + 0.4 * positives, 2)  # rounded: many ties
    expected = naive_auc(scores, positives)
    assert roc_auc(scores, positives) == pytest.approx(expected, rel=1e-12)
    # MONAI's loop implementation agrees (it is what the vectorised one replaces)
    monai_auc = compute_roc_auc(torch.from_numpy(scores), torch.from_numpy(positives.astype(np.int64)))
    assert roc_auc(scores, positives) == pytest.approx(monai_auc, rel=1e-9)
    # a monotone map of the scores (test.py ranks log-softmax values) leaves it unchanged
    assert roc_auc(np.log(scores + 1e-3), positives) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(roc_auc(scores, np.zeros(n, bool))) and math.isnan(roc_auc(scores, np.ones(n, bool)))
    with pytest.raises(ValueError, match="differ in size"):
        roc_auc(scores, positives[:-1])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        roc_auc(scores, positives * 2)


def test_gkd_auc_pools_pixels_of_all_images():
    rng = np.random.default_rng(3)
    proto = GKDProtocol(3)
    labels, probs = [], []
    for shape in [(6, 7), (5, 5), (4, 4, 3)]:
        label, prob = random_case(rng, shape, n=3)
        proto.update(prob.argmax(0), label, prob)
        labels.append(label.reshape(-1))
        probs.append(prob.reshape(3, -1))
    label, prob = np.concatenate(labels), np.concatenate(probs, axis=1)
    s = proto.summary()
    for c in (1, 2):
        assert s[f"auc_class{c}"] == pytest.approx(naive_auc(prob[c], label == c), rel=1e-6)


# ------------------------------------------------------------------------------------------- ProtocolSaver("gkd")
def test_gkd_pools_globally_not_per_image(tmp_path):
    """Image A: a 100-pixel object found exactly (Dice 1); image B: a 1-pixel object missed, one false positive
    (Dice 0). The per-image mean Dice is 0.5, the global F1 2*100 / (2*100 + 1 + 1)."""
    lab_a = np.zeros((12, 12), np.int64)
    lab_a[1:11, 1:11] = 1
    lab_b = np.zeros((12, 12), np.int64)
    lab_b[0, 0] = 1
    pred_b = np.zeros_like(lab_b)
    pred_b[5, 5] = 1
    prob_a, prob_b = onehot(lab_a, 2).numpy() * 0.8 + 0.1, onehot(pred_b, 2).numpy() * 0.8 + 0.1
    saver = ProtocolSaver("gkd", 2, tmp_path)
    run_engine(saver, [[item(lab_a, prob_a, case="A")], [item(lab_b, prob_b, case="B")]])
    rows = {r["case"]: r for r in read_csv(tmp_path / "gkd_per_case.csv")}
    assert (num(rows["A"]["dice_class1"]), num(rows["B"]["dice_class1"])) == (1.0, 0.0)
    summary = {r["metric"]: num(r["mean"]) for r in read_csv(tmp_path / "gkd_summary.csv")}
    assert summary["dice_class1"] == pytest.approx(0.5) and summary["dice_mean"] == pytest.approx(0.5)
    pooled = {r["metric"]: num(r["value"]) for r in read_csv(tmp_path / "gkd_pooled.csv")}
    assert pooled["f1_class1"] == pytest.approx(200 / 202)
    assert pooled["recall_class1"] == pytest.approx(100 / 101) and pooled["precision_class1"] == pytest.approx(100 / 101)
    assert pooled["acc"] == pytest.approx(286 / 288)
    assert pooled["tn_class1"] == 288 - 102


def test_gkd_saver_fov_from_a_file_and_volumes(tmp_path):
    rng = np.random.default_rng(5)
    lab2, prob2 = random_case(rng, (6, 8))
    lab3, prob3 = random_case(rng, (5, 5, 4))
    fov2 = np.ones((6, 8), np.uint8)
    fov2[:, :2] = 0
    path = tmp_path / "fov.nii.gz"
    nib.save(nib.Nifti1Image(fov2, np.eye(4)), path)
    fov3 = (rng.random((5, 5, 4)) < 0.7).astype(np.float32)
    items = [[item(lab2, prob2, case="P", fov=str(path))], [item(lab3, prob3, case="V", fov=torch.from_numpy(fov3[None]))]]
    saver = ProtocolSaver("gkd", 2, tmp_path / "out", options={"fov_key": "fov"})
    run_engine(saver, items)
    pooled = {r["metric"]: num(r["value"]) for r in read_csv(tmp_path / "out" / "gkd_pooled.csv")}
    ref = GKDProtocol(2)
    ref.update(prob2.argmax(0), lab2, prob2, mask=fov2 > 0)
    ref.update(prob3.argmax(0), lab3, prob3, mask=fov3 > 0)
    for k, v in ref.summary().items():
        assert same(pooled[k], v), k
    assert pooled["tp_class1"] + pooled["fp_class1"] + pooled["fn_class1"] + pooled["tn_class1"] == 36 + fov3.sum()
    # without the FOV every pixel counts (test.py's setting)
    run_engine(ProtocolSaver("gkd", 2, tmp_path / "all"), items)
    total = {r["metric"]: num(r["value"]) for r in read_csv(tmp_path / "all" / "gkd_pooled.csv")}
    assert total["tp_class1"] + total["fp_class1"] + total["fn_class1"] + total["tn_class1"] == 48 + 100
    # auc off: no probabilities needed
    no_prob = [[{k: v for k, v in x.items() if k != "prob"} for x in it] for it in items]
    run_engine(ProtocolSaver("gkd", 2, tmp_path / "noauc", options={"auc": False}), no_prob)
    assert "auc_class1" not in {r["metric"] for r in read_csv(tmp_path / "noauc" / "gkd_pooled.csv")}


def test_gkd_options_and_errors(tmp_path):
    assert PROTOCOL_OPTIONS["gkd"] == {"fov_key": None, "auc": True}
    assert needs_probabilities("gkd") and not needs_probabilities("gkd", {"auc": False})
    with pytest.raises(ValueError, match="fov_key must be None"):
        ProtocolSaver("gkd", 2, tmp_path, options={"fov_key": 3})
    with pytest.raises(ValueError, match="auc must be true or false"):
        ProtocolSaver("gkd", 2, tmp_path, options={"auc": "yes"})
    with pytest.raises(ValueError, match="group_key must be None or an item key"):
        ProtocolSaver("gkd", 2, tmp_path, group_key="")
    lab, prob = random_case(np.random.default_rng(0), (4, 4))
    with pytest.raises(KeyError, match="scores only the field of view 'fov', but case 'A' has no 'fov'"):
        run_engine(ProtocolSaver("gkd", 2, tmp_path, options={"fov_key": "fov"}), [[item(lab, prob, case="A")]])
    with pytest.raises(ValueError, match=r"field-of-view mask 'fov' of case 'A' has shape \(3, 4\)"):
        bad = item(lab, prob, case="A", fov=np.ones((1, 3, 4)))
        run_engine(ProtocolSaver("gkd", 2, tmp_path, options={"fov_key": "fov"}), [[bad]])
    with pytest.raises(KeyError, match="reads softmax probabilities, but the evaluator output has no 'prob'"):
        run_engine(ProtocolSaver("gkd", 2, tmp_path), [[{k: v for k, v in item(lab, prob, case="A").items() if k != "prob"}]])
    with pytest.raises(KeyError, match="groups items by 'domain', but an item has no 'domain'.*load_domains"):
        run_engine(ProtocolSaver("gkd", 2, tmp_path, group_key="domain"), [[item(lab, prob, case="A")]])
    assert not list(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------------------------------ group_key (domains)
def domain_items(seed: int, domain: str) -> list[dict]:
    """Two 2D cases of 2 slices and one 3D case, 3 classes; case ids repeat across domains on purpose."""
    rng = np.random.default_rng(seed)
    out = []
    for case in ("c1", "c2"):
        for z in (1, 0):
            lab, prob = random_case(rng, (8, 9), n=3)
            out.append(item(lab, prob, case=case, slice=torch.tensor(z), domain=domain))
    lab, prob = random_case(rng, (6, 6, 4), n=3)
    out.append(item(lab, prob, case="v", domain=domain))
    return out


@pytest.mark.parametrize("protocol", ["gkd", "dice_hd95", "graph_flow"])
def test_group_key_scores_each_domain_as_if_alone(protocol, tmp_path, caplog):
    source, target = domain_items(10, "source"), domain_items(11, "target")
    mixed = [x for pair in zip(source, target) for x in pair]  # interleaved, as one evaluator run over both
    saver = ProtocolSaver(protocol, 3, tmp_path / "both", group_key="domain")
    with caplog.at_level(logging.INFO, logger="medkd.engines.protocols"):
        run_engine(saver, [mixed[i : i + 3] for i in range(0, len(mixed), 3)])
    rows = read_csv(tmp_path / "both" / f"{protocol}_per_case.csv")
    summary = read_csv(tmp_path / "both" / f"{protocol}_summary.csv")
    assert list(rows[0])[0] == "domain" and list(summary[0])[0] == "domain"
    assert [r["domain"] for r in rows] == ["source"] * 3 + ["target"] * 3  # first-seen order, then by case
    for domain, items in (("source", source), ("target", target)):
        alone = tmp_path / domain
        run_engine(ProtocolSaver(protocol, 3, alone), [items[:3], items[3:]])
        ref_rows = read_csv(alone / f"{protocol}_per_case.csv")
        got_rows = [{k: v for k, v in r.items() if k != "domain"} for r in rows if r["domain"] == domain]
        assert got_rows == ref_rows
        ref_summary = read_csv(alone / f"{protocol}_summary.csv")
        assert [{k: v for k, v in r.items() if k != "domain"} for r in summary if r["domain"] == domain] == ref_summary
        if protocol != "dice_hd95":
            ref_pooled = read_csv(alone / f"{protocol}_pooled.csv")
            pooled = read_csv(tmp_path / "both" / f"{protocol}_pooled.csv")
            assert [{k: v for k, v in r.items() if k != "domain"} for r in pooled if r["domain"] == domain] == ref_pooled
        assert any(f"domain '{domain}', mean over 3 cases" in m for m in caplog.messages)
    # the two domains really differ (so the comparison above can fail)
    assert [r for r in summary if r["domain"] == "source"][0]["mean"] != [r for r in summary if r["domain"] == "target"][0]["mean"]
    if protocol == "gkd":
        assert set(saver.pooled) == {"source", "target"}
        assert any("domain 'target', pooled over its test set: acc=" in m for m in caplog.messages)


# ------------------------------------------------------------------------------------------------- load_domains
@pytest.fixture(scope="module")
def tiny2d_shift(tmp_path_factory) -> Path:
    """The strong shift of the conftest's tiny2d (same seed and arguments)."""
    out = tmp_path_factory.mktemp("tiny2d_shift")
    prepare_demo(out, subjects=3, seed=1, dims=2, spacing=4.0, slices_per_subject=4, unlabelled=1, shift="strong")
    return out


def test_load_domains_tags_prefixes_and_checks(tiny2d, tiny2d_shift, tmp_path):
    items = load_domains({"clean": tiny2d, "shift": tiny2d_shift / "datalist.json"}, split="test")
    clean, shift = load_datalist(tiny2d / "datalist.json", "test"), load_datalist(tiny2d_shift / "datalist.json", "test")
    assert len(items) == len(clean) + len(shift)
    assert [x["domain"] for x in items] == ["clean"] * len(clean) + ["shift"] * len(shift)
    assert [x["case"] for x in items] == [f"clean:{x['case']}" for x in clean] + [f"shift:{x['case']}" for x in shift]
    assert {x["case"] for x in clean} == {x["case"] for x in shift}  # same seed: same case ids ...
    assert not {x["case"] for x in items[: len(clean)]} & {x["case"] for x in items[len(clean) :]}  # ... made unique
    assert [x["image"] for x in items[len(clean) :]] == [x["image"] for x in shift]  # absolute paths, as load_datalist
    assert check_datalist(items, num_classes=3) == items
    assert load_domains({"a": tiny2d}, split="validation", key="site")[0]["site"] == "a"

    with pytest.raises(FileNotFoundError, match=r"domain 'gone': .*nowhere does not exist"):
        load_domains({"clean": tiny2d, "gone": tmp_path / "nowhere"})
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"domain 'bare': datalist file not found: .*empty_folder"):
        load_domains({"bare": tmp_path / "empty_folder"})
    with pytest.raises(KeyError, match=r"domain 'shift': datalist .* has no 'testing' list"):
        load_domains({"shift": tiny2d_shift}, split="testing")
    partial = tmp_path / "no_test.json"
    partial.write_text(json.dumps({"training": [], "test": []}))
    with pytest.raises(ValueError, match=r"domain 'x': the 'test' list of .*no_test.json is empty"):
        load_domains({"x": partial})
    with pytest.raises(ValueError, match="non-empty mapping"):
        load_domains({})
    with pytest.raises(ValueError, match="key must be an entry key other than"):
        load_domains({"a": tiny2d}, key="case")


# ---------------------------------------------------------------------------------------- the bundle, end to end
def test_supervised_bundle_evaluates_gkd_on_one_and_on_two_domains(tiny2d, tiny2d_shift, teacher_2d, tmp_path):
    common = dict(dataset_dir=str(tiny2d), ckpt_dir=str(teacher_2d.parent), eval_protocol="gkd", **TINY_2D)
    single = tmp_path / "single"
    run_workflow("supervised_segmentation", ["train.json", "evaluate.json"], output_dir=str(single), **common)
    for name in ("gkd_per_case.csv", "gkd_summary.csv", "gkd_pooled.csv"):
        assert (single / name).is_file(), name
    test_items = json.loads((tiny2d / "datalist.json").read_text())["test"]
    rows = read_csv(single / "gkd_per_case.csv")
    assert [r["case"] for r in rows] == sorted({e["case"] for e in test_items})
    pooled = {r["metric"]: num(r["value"]) for r in read_csv(single / "gkd_pooled.csv")}
    labels = np.concatenate([np.asarray(nib.load(tiny2d / e["label"]).dataobj).reshape(-1) for e in test_items])
    for c in (1, 2):  # independent: the pooled counts are the test labels' pixels
        assert pooled[f"tp_class{c}"] + pooled[f"fn_class{c}"] == int((labels == c).sum())
        assert 0.0 <= pooled[f"auc_class{c}"] <= 1.0 and 0.0 <= pooled[f"f1_class{c}"] <= 1.0
    assert sum(pooled[f"{k}_class1"] for k in ("tp", "fp", "fn", "tn")) == labels.size

    # the same model on the clean and the shifted test split in ONE run, grouped by domain
    cdir = BUNDLES / "supervised_segmentation" / "configs"
    parser = ConfigParser()
    parser.read_config([str(cdir / "train.json"), str(cdir / "evaluate.json")])
    index = [h["_target_"] for h in parser["validate#handlers"]].index("medkd.engines.ProtocolSaver")
    domains = {"clean": str(tiny2d), "shift": str(tiny2d_shift)}
    both = tmp_path / "both"
    run_workflow(
        "supervised_segmentation", ["train.json", "evaluate.json"], output_dir=str(both), **common,
        **{
            "validate#dataset#data": f"$medkd.data.check_datalist(medkd.data.load_domains({domains!r}, @eval_split), @num_classes)",
            f"validate#handlers#{index}#group_key": "domain",
        },
    )
    per_domain = read_csv(both / "gkd_pooled.csv")
    assert {r["domain"] for r in per_domain} == {"clean", "shift"}
    clean = {r["metric"]: num(r["value"]) for r in per_domain if r["domain"] == "clean"}
    shifted = {r["metric"]: num(r["value"]) for r in per_domain if r["domain"] == "shift"}
    for k, v in pooled.items():  # the clean block equals the clean-only run
        assert same(clean[k], v), k
    for c in (1, 2):  # same labels in the shifted domain, other predictions
        assert shifted[f"tp_class{c}"] + shifted[f"fn_class{c}"] == clean[f"tp_class{c}"] + clean[f"fn_class{c}"]
    assert any(shifted[k] != clean[k] for k in clean)
    cases = {r["case"] for r in read_csv(both / "gkd_per_case.csv")}
    assert cases == {f"{d}:{e['case']}" for d in domains for e in test_items}


# ------------------------------------------------------------------------------------------- shifted demo data
def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shifted_demo_keeps_anatomy_and_changes_appearance(tiny2d, tiny2d_shift):
    clean_list = json.loads((tiny2d / "datalist.json").read_text())
    shift_list = json.loads((tiny2d_shift / "datalist.json").read_text())
    for split in ("training", "validation", "test"):  # same subjects, splits, slices and file names
        assert shift_list[split] == clean_list[split]
    assert shift_list["generator"]["shift"] == {"strength": 1.0, "bias": 0.3, "tissue_gamma": 1 / 1.5, "noise": 0.06,
                                               "noise_type": "rician"}
    assert "shift" not in clean_list["generator"] and shift_list["name"] == "medkd-demo-mni152-shift-1"
    a, b = digest(tiny2d), digest(tiny2d_shift)
    labels = [k for k in a if k.startswith("labelsTr/")]
    images = [k for k in a if k.startswith("imagesTr/")]
    assert labels and all(a[k] == b[k] for k in labels)  # byte-identical labels
    assert all(a[k] != b[k] for k in images)

    def stats(folder):
        img, lab = [], []
        for e in clean_list["training"] + clean_list["validation"] + clean_list["test"]:
            img.append(np.asarray(nib.load(folder / e["image"]).dataobj).reshape(-1))
            lab.append(np.asarray(nib.load(folder / e["label"]).dataobj).reshape(-1))
        img, lab = np.concatenate(img), np.concatenate(lab)
        gm, wm = img[lab == 1], img[lab == 2]
        outside = img[(lab == 0) & (np.abs(img) < 0.3)]  # background, mostly air
        return gm.mean() / wm.mean(), wm.std() / wm.mean(), outside.mean(), img
    ratio_c, cv_c, bg_c, img_c = stats(tiny2d)
    ratio_s, cv_s, bg_s, img_s = stats(tiny2d_shift)
    assert ratio_s > ratio_c + 0.03  # compressed grey/white contrast (gamma < 1)
    assert cv_s > cv_c * 1.3  # stronger bias field (and noise) within white matter
    assert abs(bg_c) < 0.01 and bg_s > 0.03  # Gaussian noise is zero-mean, Rician is not
    assert img_s.min() >= 0.0 and img_c.min() < 0.0  # a magnitude image is non-negative


def test_shift_option_parsing_determinism_and_cli(tmp_path):
    assert DomainShift.parse(None) is None and DomainShift.parse("none") is None and DomainShift.parse(0) is None
    assert DomainShift.parse("Strong") == DomainShift(1.0) and DomainShift.parse("0.25") == DomainShift(0.25)
    assert SHIFT_PRESETS["mild"] == 0.5 and DomainShift.parse(0.5).tissue_gamma == pytest.approx(0.8)
    with pytest.raises(ValueError, match=r"unknown demo shift 'heavy'; use one of \['mild', 'none', 'strong'\]"):
        DomainShift.parse("heavy")
    with pytest.raises(ValueError, match="finite number >= 0, got -1"):
        DomainShift.parse(-1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        prepare_demo(tmp_path / "bad", subjects=3, shift=True)
    args = dict(subjects=3, seed=5, dims=2, spacing=8.0, slices_per_subject=2)
    a = prepare_demo(tmp_path / "a", shift=0.5, **args).parent
    b = prepare_demo(tmp_path / "b", shift="mild", **args).parent
    assert digest(a) == digest(b)  # deterministic; the preset is its strength
    clean = prepare_demo(tmp_path / "clean", **args).parent
    zero = prepare_demo(tmp_path / "zero", shift=0.0, **args).parent
    assert digest(zero) == digest(clean)  # strength 0 is the clean data
    cmd = [sys.executable, "-m", "medkd", "prepare", "demo", "--out", str(tmp_path / "cli"), "--subjects", "3", "--seed", "5",
           "--dims", "2", "--spacing", "8", "--slices_per_subject", "2", "--shift", "mild"]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert digest(tmp_path / "cli") == digest(a)
