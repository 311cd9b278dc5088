"""medkd.engines.ProtocolSaver: the papers' evaluation protocols on an Ignite engine and in both bundles' evaluate.json."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_NAMES, BUNDLES, TINY_2D, error_chain, run_workflow
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from medkd.engines import PROTOCOL_OPTIONS, ProtocolSaver, needs_probabilities
from medkd.metrics import EMKDProtocol, GraphFlowProtocol, per_case_dice_hd95, transunet_case_metrics

C = 3  # classes: background + 2


# ----------------------------------------------------------------------------------------------------- hand-made data
def onehot(label_map: np.ndarray, n: int = C) -> torch.Tensor:
    return torch.from_numpy((np.arange(n).reshape((n,) + (1,) * label_map.ndim) == label_map[None]).astype(np.float32))


def item(label: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None, n: int = C, **fields) -> dict:
    """One decollated evaluator item: one-hot pred/label (as the bundles' postprocessing gives), probabilities."""
    out = {"pred": onehot(pred, n), "label": onehot(label, n), **fields}
    if prob is not None:
        out["prob"] = torch.from_numpy(prob.astype(np.float32))
    return out


def probs_for(pred: np.ndarray, rng) -> np.ndarray:
    """Random softmax probabilities whose argmax is ``pred``."""
    logits = rng.normal(0.0, 1.0, (C,) + pred.shape)
    logits += 4.0 * (np.arange(C).reshape((C,) + (1,) * pred.ndim) == pred[None])
    e = np.exp(logits)
    return e / e.sum(0)


def make_cases():
    """Case A: three 2D slices (indices 5, 2, 7); case B: two 2D slices (1, 0), prediction = label, only class 1;
    case C: a 3D volume; case E: a 3D volume with an empty ground truth and a non-empty prediction."""
    rng = np.random.default_rng(7)
    a = {}
    for z in (5, 2, 7):
        lab = np.zeros((8, 8), np.int64)
        lab[2 : 5 + z // 3, 1:6] = 1
        lab[5:7, 3 : 4 + z // 2] = 2
        pred = lab.copy()
        noise = rng.random((8, 8)) < 0.15
        pred[noise] = rng.integers(0, C, int(noise.sum()))
        pred[np.roll(lab == 1, 1, axis=0) & (lab == 0)] = 1
        a[z] = (lab, pred, probs_for(pred, rng))
    b = {}
    for z in (1, 0):
        lab = np.zeros((8, 8), np.int64)
        lab[2:5, 2:6] = 1  # 12 pixels of class 1, no class 2
        prob = np.zeros((C, 8, 8))
        prob[:, lab == 1] = np.array([0.1, 0.8, 0.1])[:, None]
        prob[:, lab == 0] = np.array([0.9, 0.05, 0.05])[:, None]
        if z == 0:
            prob[:, 0, 0] = [0.5, 0.45, 0.05]  # background by argmax, foreground for EMKD's threshold 0.4
        b[z] = (lab, prob.argmax(0), prob)
    lab_c = np.zeros((8, 8, 4), np.int64)
    lab_c[1:6, 2:7, 1:3] = 1
    lab_c[3:5, 3:5, 0:4] = 2
    pred_c = lab_c.copy()
    pred_c[1:6, 2:7, 3] = 1
    pred_c[0, 0, 0] = 2
    c = (lab_c, pred_c, probs_for(pred_c, rng))
    lab_e = np.zeros((8, 8, 4), np.int64)
    pred_e = np.zeros_like(lab_e)
    pred_e[2:4, 2:4, 1] = 1  # 4 false-positive voxels of class 1
    e = (lab_e, pred_e, 0.1 + 0.7 * onehot(pred_e).numpy())  # 0.8 for the predicted class, 0.1 for the others
    return a, b, c, e


def batches(a, b, c, e, photo=None):
    """Iterations of decollated items, slices out of order and cases interleaved."""
    it = lambda case, trip, **kw: item(*trip, case=case, **kw)  # noqa: E731
    out = [
        [it("A", a[5], slice=torch.tensor(5)), it("B", b[1], slice=torch.tensor(1)), it("A", a[2], slice=torch.tensor(2))],
        [it("C", c), it("B", b[0], slice=torch.tensor(0))],
        [it("E", e), it("A", a[7], slice=torch.tensor(7))],
    ]
    if photo is not None:
        out[1].append(photo)
    return out


def photo_item():
    """A natively 2D image without case/slice, named by its file: scored as its own case in 2D."""
    lab = np.zeros((6, 6), np.int64)
    lab[1:4, 1:4] = 2
    pred = np.zeros_like(lab)
    pred[1:4, 1:4] = 1  # class 2 missed entirely, class 1 predicted where absent
    image = MetaTensor(torch.zeros(1, 6, 6), meta={"filename_or_obj": "/data/imagesTr/photo_003.png"})
    return {**item(lab, pred, probs_for(pred, np.random.default_rng(1))), "image": image}, lab, pred


def run_engine(saver: ProtocolSaver, iterations) -> None:
    """A bare Ignite engine whose state.batch holds the datalist fields and state.output the predictions."""
    engine = Engine(lambda eng, batch: [{k: v for k, v in x.items() if k in ("pred", "label", "prob", "image")} for x in batch])
    saver.attach(engine)
    engine.run(iterations, max_epochs=1)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(s: str) -> float:
    return float(s) if s != "" else math.nan


def assert_close(a: float, b: float) -> None:
    assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9), (a, b)


def stacked(slices: dict) -> tuple[np.ndarray, np.ndarray]:
    zs = sorted(slices)
    return np.stack([slices[z][0] for z in zs], -1), np.stack([slices[z][1] for z in zs], -1)


# --------------------------------------------------------------------------------------------- (a) handler on Ignite
def test_dice_hd95_stacks_slices_in_slice_order_and_handles_empty_masks(tmp_path):
    a, b, c, e = make_cases()
    photo, photo_lab, photo_pred = photo_item()
    saver = ProtocolSaver("dice_hd95", C, tmp_path)
    run_engine(saver, batches(a, b, c, e, photo))
    rows = {r["case"]: r for r in read_csv(tmp_path / "dice_hd95_per_case.csv")}
    assert list(rows) == ["A", "B", "C", "E", "photo_003"]  # sorted by case
    assert [int(rows[k]["items"]) for k in rows] == [3, 2, 1, 1, 1]

    lab_a, pred_a = stacked(a)
    expected = {
        "A": per_case_dice_hd95(pred_a, lab_a, C),
        "C": per_case_dice_hd95(c[1], c[0], C),
        "photo_003": per_case_dice_hd95(photo_pred, photo_lab, C),  # 2D
    }
    for case, m in expected.items():
        for k, v in m.items():
            assert_close(num(rows[case][k]), v)
    # stacking in feed order (5, 2, 7) instead of slice order gives another HD95: the order is checked
    feed = per_case_dice_hd95(np.stack([a[z][1] for z in (5, 2, 7)], -1), np.stack([a[z][0] for z in (5, 2, 7)], -1), C)
    assert any(not math.isclose(feed[k], expected["A"][k]) for k in feed if k.startswith("hd95"))
    # hand-worked: B predicted perfectly, class 2 absent from both; E: empty ground truth, 4 false positives
    assert (num(rows["B"]["dice_class1"]), num(rows["B"]["hd95_class1"])) == (1.0, 0.0)
    assert math.isnan(num(rows["B"]["dice_class2"])) and math.isnan(num(rows["B"]["hd95_class2"]))
    assert num(rows["B"]["dice_mean"]) == 1.0 and num(rows["B"]["hd95_mean"]) == 0.0
    assert num(rows["E"]["dice_class1"]) == 0.0 and math.isnan(num(rows["E"]["hd95_class1"]))
    assert math.isnan(num(rows["E"]["dice_class2"]))
    assert num(rows["photo_003"]["dice_class1"]) == 0.0 and num(rows["photo_003"]["dice_class2"]) == 0.0

    summary = {r["metric"]: r for r in read_csv(tmp_path / "dice_hd95_summary.csv")}
    dice1 = [num(rows[k]["dice_class1"]) for k in rows]
    assert num(summary["dice_class1"]["mean"]) == pytest.approx(np.mean(dice1))
    assert int(summary["dice_class1"]["n"]) == 5 and int(summary["dice_class2"]["n"]) == 3  # B and E: class 2 absent
    assert "items" not in summary  # counts stay in the per-case file


def test_spacing_from_the_label_affine(tmp_path):
    lab = np.zeros((8, 8, 6), np.int64)
    lab[2:6, 2:6, 1:5] = 1
    pred = np.zeros_like(lab)
    pred[3:7, 2:6, 0:4] = 1
    affine = torch.diag(torch.tensor([0.5, 2.0, 3.0, 1.0], dtype=torch.float64))
    x = item(lab, pred, n=2, case="V")
    x["label"] = MetaTensor(x["label"], affine=affine)
    run_engine(ProtocolSaver("dice_hd95", 2, tmp_path, options={"spacing": "meta"}), [[x]])
    row = read_csv(tmp_path / "dice_hd95_per_case.csv")[0]
    assert_close(num(row["hd95_class1"]), per_case_dice_hd95(pred, lab, 2, spacing=(0.5, 2.0, 3.0))["hd95_class1"])
    assert not math.isclose(num(row["hd95_class1"]), per_case_dice_hd95(pred, lab, 2)["hd95_class1"])


def test_transunet_rows_match_direct_calls_on_the_stacked_volumes(tmp_path):
    a, b, c, e = make_cases()
    saver = ProtocolSaver("transunet", C, tmp_path)
    run_engine(saver, batches(a, b, c, e))
    rows = {r["case"]: r for r in read_csv(tmp_path / "transunet_per_case.csv")}
    vols = {"A": stacked(a), "B": stacked(b), "C": c[:2], "E": e[:2]}
    for case, (lab, pred) in vols.items():
        for k, v in transunet_case_metrics(pred, lab, C).items():
            assert_close(num(rows[case][k]), v)
    # TransUNet's empty-mask conventions, hand-worked: E has an empty ground truth
    assert (num(rows["E"]["dice_class1"]), num(rows["E"]["hd95_class1"])) == (1.0, 0.0)  # prediction non-empty
    assert (num(rows["E"]["dice_class2"]), num(rows["E"]["hd95_class2"])) == (0.0, 0.0)  # prediction empty
    assert (num(rows["B"]["dice_class2"]), num(rows["B"]["dice_mean"])) == (0.0, 0.5)
    summary = {r["metric"]: num(r["mean"]) for r in read_csv(tmp_path / "transunet_summary.csv")}
    per_organ = [np.mean([num(rows[k][f"dice_class{o}"]) for k in rows]) for o in (1, 2)]
    assert summary["dice_mean"] == pytest.approx(np.mean(per_organ))  # TransUNet's number: mean over organs


def test_emkd_thresholds_probabilities_per_case_and_leaves_out_cases_without_target(tmp_path):
    a, b, c, e = make_cases()
    saver = ProtocolSaver("emkd", C, tmp_path)
    run_engine(saver, batches(a, b, c, e))
    rows = {r["case"]: r for r in read_csv(tmp_path / "emkd_per_case.csv")}
    # hand-worked, case B class 1: 2 slices x 12 target pixels, all predicted, plus the 0.45 pixel (> 0.4)
    p, g, i = 25, 24, 24
    assert (int(rows["B"]["P_class1"]), int(rows["B"]["G_class1"]), int(rows["B"]["I_class1"])) == (p, g, i)
    assert_close(num(rows["B"]["dice_class1"]), (2 * i + 1) / (p + g + 1))
    assert_close(num(rows["B"]["voe_class1"]), 2 * (p - i) / (p + g))
    assert_close(num(rows["B"]["rvd_class1"]), p / g - 1)
    # no ground truth: NaN (EMKD leaves the case out), counts kept
    assert int(rows["E"]["P_class1"]) == 4 and int(rows["E"]["G_class1"]) == 0
    assert all(math.isnan(num(rows["E"][f"{m}_class1"])) for m in ("dice", "voe", "rvd"))
    assert math.isnan(num(rows["B"]["dice_class2"]))
    # direct calls of EMKDProtocol on the same slices, one-vs-rest per class
    for cls in (1, 2):
        ref = EMKDProtocol(threshold=0.4)
        for case, slices in (("A", a.values()), ("B", b.values()), ("C", [c]), ("E", [e])):
            for lab, _, prob in slices:
                ref.update(case, np.stack([1 - prob[cls], prob[cls]]), lab == cls)
        summary = {r["metric"]: num(r["mean"]) for r in read_csv(tmp_path / "emkd_summary.csv")}
        for m in ("dice", "voe", "rvd"):
            assert summary[f"{m}_class{cls}"] == pytest.approx(ref.summary()[m])
        for r in ref.per_case():
            assert int(rows[r["case"]][f"P_class{cls}"]) == r["P"] and int(rows[r["case"]][f"I_class{cls}"]) == r["I"]
    # another threshold moves the 0.45 pixel out
    saver = ProtocolSaver("emkd", C, tmp_path / "t05", options={"threshold": 0.5})
    run_engine(saver, batches(a, b, c, e))
    rows = {r["case"]: r for r in read_csv(tmp_path / "t05" / "emkd_per_case.csv")}
    assert int(rows["B"]["P_class1"]) == 24


def test_graph_flow_pools_one_confusion_matrix_with_optional_crop(tmp_path):
    lab1 = np.zeros((6, 6), np.int64)
    lab1[2:4, 2:4] = 1
    pred1 = lab1.copy()
    pred1[0, 0:3] = 1  # 3 errors outside the central 2x2 window
    lab2 = np.zeros((6, 6, 2), np.int64)  # a 3D case: counted as its 2 axial slices
    lab2[2:4, 2:4, :] = 1
    pred2 = lab2.copy()
    pred2[2, 2, 1] = 0  # 1 error inside the window
    pred2[5, 5, 0] = 1  # 1 outside
    data = [[item(lab1, pred1, n=2, case="P1", slice=0)], [item(lab2, pred2, n=2, case="P2")]]
    run_engine(ProtocolSaver("graph_flow", 2, tmp_path / "full"), data)
    pooled = {r["metric"]: num(r["value"]) for r in read_csv(tmp_path / "full" / "graph_flow_pooled.csv")}
    assert pooled["acc"] == pytest.approx((36 * 3 - 5) / (36 * 3))
    # IoU of class 1: TP = 4 + 7, FP = 3 + 1, FN = 1
    assert pooled["iou_class1"] == pytest.approx(11 / (11 + 4 + 1))
    ref = GraphFlowProtocol(2)
    ref.update(pred1, lab1)
    ref.update(np.moveaxis(pred2, -1, 0), np.moveaxis(lab2, -1, 0))
    for k, v in ref.summary().items():
        assert_close(pooled[k], v)
    rows = {r["case"]: r for r in read_csv(tmp_path / "full" / "graph_flow_per_case.csv")}
    assert num(rows["P1"]["acc"]) == pytest.approx(33 / 36) and num(rows["P2"]["acc"]) == pytest.approx(70 / 72)

    run_engine(ProtocolSaver("graph_flow", 2, tmp_path / "crop", options={"crop_size": 2, "crop_start": 2}), data)
    pooled = {r["metric"]: num(r["value"]) for r in read_csv(tmp_path / "crop" / "graph_flow_pooled.csv")}
    assert pooled["acc"] == pytest.approx(11 / 12)  # 3 windows of 4 pixels, 1 error


def test_pooled_binary_binarizes_like_the_release(tmp_path):
    lab = np.array([[1, 1, 1, 0, 0, 1]])
    p1 = np.array([[0.3, 0.6, 0.7, 0.9, 0.2, 0.95]])  # class-1 probability of a two-class softmax
    prob = np.stack([1 - p1, p1])
    counts = {"logits": (2, 1, 2), "sigmoid": (3, 1, 1), "argmax": (3, 1, 1)}  # p > 0.6225 / p > 0.5 / argmax
    for mode, (tp, fp, fn) in counts.items():
        x = item(lab, prob.argmax(0), prob, n=2, case="S")
        half = {k: (v[..., :3] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
        rest = {**{k: (v[..., 3:] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}, "case": "T"}
        run_engine(ProtocolSaver("pooled_binary", 2, tmp_path / mode, options={"binarize": mode}), [[half], [rest]])
        pooled = {r["metric"]: num(r["value"]) for r in read_csv(tmp_path / mode / "pooled_binary_pooled.csv")}
        assert (pooled["tp_class1"], pooled["fp_class1"], pooled["fn_class1"]) == (tp, fp, fn), mode
        assert pooled["dice_class1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert pooled["recall_class1"] == pytest.approx(tp / (tp + fn)) and pooled["dice_mean"] == pooled["dice_class1"]
        rows = {r["case"]: r for r in read_csv(tmp_path / mode / "pooled_binary_per_case.csv")}
        assert int(rows["S"]["tp_class1"]) + int(rows["T"]["tp_class1"]) == tp


@pytest.mark.parametrize(
    "protocol, options, data, match",
    [
        ("dice_hd96", None, None, r"unknown evaluation protocol 'dice_hd96'; choose one of \['dice_hd95', 'emkd'"),
        ("dice_hd95", {"threshold": 0.4}, None, r"\['threshold'\] do not apply to the evaluation protocol 'dice_hd95'"),
        ("emkd", {"threshold": 1.5}, None, "threshold must be a probability"),
        ("pooled_binary", {"binarize": "otsu"}, None, "binarize must be"),
        ("emkd", None, "no_case", r"'emkd' scores whole cases .* add the patient id \('case'\)"),
        ("dice_hd95", None, "slice_without_case", r"has a 'slice' index but no 'case'"),
        ("emkd", None, "no_prob", r"no 'prob': copy them before the argmax .*CopyItemsd"),
        ("dice_hd95", None, "no_slice", r"case 'A' has 2 items but not every one has a 'slice' index"),
        ("transunet", None, "same_slice", r"case 'A' lists the same slice index twice"),
    ],
)
def test_clear_errors(protocol, options, data, match, tmp_path):
    lab = np.zeros((4, 4), np.int64)
    lab[1:3, 1:3] = 1
    x = item(lab, lab, probs_for(lab, np.random.default_rng(0)))
    x["image"] = MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": "slice_007.nii.gz"})
    items = {
        "no_case": [x],
        "slice_without_case": [{**x, "slice": 3}],
        "no_prob": [{k: v for k, v in x.items() if k != "prob"} | {"case": "A"}],
        "no_slice": [{**x, "case": "A"}, {**x, "case": "A"}],
        "same_slice": [{**x, "case": "A", "slice": 2}, {**x, "case": "A", "slice": 2}],
    }
    with pytest.raises((ValueError, KeyError), match=match):
        saver = ProtocolSaver(protocol, C, tmp_path, options=options)
        run_engine(saver, [items[data]])
    assert not list(tmp_path.iterdir())  # nothing written


def test_needs_probabilities():
    assert needs_probabilities("emkd") and needs_probabilities("pooled_binary")
    assert not needs_probabilities("pooled_binary", {"binarize": "argmax"})
    assert not any(needs_probabilities(p) for p in ("dice_hd95", "transunet", "graph_flow"))


# ---------------------------------------------------------------------------------- (b) evaluate.json of each bundle
def eval_parser(bundle: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    cdir = BUNDLES / bundle / "configs"
    parser.read_config([str(cdir / "train.json"), str(cdir / "evaluate.json")])
    parser.update({"bundle_root": str(BUNDLES / bundle), **overrides})
    return parser


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_evaluate_json_selects_every_protocol(bundle, tmp_path):
    handlers = eval_parser(bundle)["validate#handlers"]
    index = [h["_target_"] for h in handlers].index("medkd.engines.ProtocolSaver")
    # the project's common protocol by default; the GKD bundle evaluates cross-domain with GKD's own protocol
    assert eval_parser(bundle)["eval_protocol"] == {"gkd_segmentation": "gkd"}.get(bundle, "dice_hd95")
    for protocol in PROTOCOL_OPTIONS:
        parser = eval_parser(bundle, eval_protocol=protocol, output_dir=str(tmp_path))
        saver = parser.get_parsed_content(f"validate#handlers#{index}")
        assert isinstance(saver, ProtocolSaver) and saver.protocol == protocol and saver.num_classes == 3
        assert saver.output_dir == tmp_path
        post = parser.get_parsed_content("validate#postprocessing")
        names = [type(t).__name__ for t in post.transforms]
        assert ("CopyItemsd" in names) == needs_probabilities(protocol), (protocol, names)
        if "CopyItemsd" in names:  # the probabilities are copied after the softmax and before the argmax
            assert names.index("Activationsd") < names.index("CopyItemsd") < names.index("AsDiscreted")
    parser = eval_parser(bundle, eval_protocol="graph_flow", eval_protocol_options={"crop_size": 64, "crop_start": 95})
    assert parser.get_parsed_content(f"validate#handlers#{index}").options == {"crop_size": 64, "crop_start": 95}
    with pytest.raises(Exception) as err:
        eval_parser(bundle, eval_protocol="voe").get_parsed_content(f"validate#handlers#{index}")
    assert "unknown evaluation protocol 'voe'" in error_chain(err.value)


# --------------------------------------------------------------------------------------- (c) real evaluate runs
def test_demo_datalists_carry_case_and_slice(tiny2d, tiny3d):
    for entry in json.loads((tiny2d / "datalist.json").read_text())["test"]:
        stem = Path(entry["image"]).name
        assert entry["case"] == entry["subject"] and re.fullmatch(rf"{entry['case']}_z(\d+)\.nii\.gz", stem)
        assert entry["slice"] == int(re.search(r"_z(\d+)", stem).group(1))
    for entry in json.loads((tiny3d / "datalist.json").read_text())["test"]:
        assert entry["case"] == entry["subject"] and "slice" not in entry


def test_supervised_bundle_evaluate_writes_dice_hd95_per_case(tiny2d, teacher_2d, tmp_path):
    out = tmp_path / "eval"
    run_workflow("supervised_segmentation", ["train.json", "evaluate.json"], dataset_dir=str(tiny2d),
                 ckpt_dir=str(teacher_2d.parent), output_dir=str(out), save_predictions=True, **TINY_2D)
    test_items = json.loads((tiny2d / "datalist.json").read_text())["test"]
    assert (out / "val_mean_dice_raw.csv").is_file()  # MetricsSaver still works
    rows = read_csv(out / "dice_hd95_per_case.csv")
    cases = sorted({e["case"] for e in test_items})
    assert [r["case"] for r in rows] == cases
    # independent check: stack the saved predictions and the label files of each case by slice index
    for row in rows:
        entries = sorted((e for e in test_items if e["case"] == row["case"]), key=lambda e: e["slice"])
        assert int(row["items"]) == len(entries)
        seg = [np.asarray(nib.load(out / "predictions" / Path(e["image"]).name.replace(".nii.gz", "_seg.nii.gz")).dataobj)
               for e in entries]
        lab = [np.asarray(nib.load(tiny2d / e["label"]).dataobj) for e in entries]
        pred = np.stack([s.reshape(s.shape[:2]) for s in seg], -1).astype(np.int64)
        ref = per_case_dice_hd95(pred, np.stack(lab, -1).astype(np.int64), 3)
        for k, v in ref.items():
            assert_close(num(row[k]), v)
    assert {r["metric"] for r in read_csv(out / "dice_hd95_summary.csv")} >= {"dice_class1", "hd95_class2", "dice_mean"}


def test_emkd_bundle_evaluate_with_the_emkd_protocol(tiny2d, teacher_2d, tmp_path):
    ckpt = tmp_path / "student"
    common = dict(dataset_dir=str(tiny2d), ckpt_dir=str(ckpt), teacher_ckpt=str(teacher_2d), **TINY_2D)
    run_workflow("emkd_segmentation", ["train.json"], output_dir=str(ckpt / "eval"), **common)
    out = tmp_path / "eval"
    run_workflow("emkd_segmentation", ["train.json", "evaluate.json"], output_dir=str(out), eval_protocol="emkd", **common)
    assert (out / "val_mean_dice_raw.csv").is_file()
    test_items = json.loads((tiny2d / "datalist.json").read_text())["test"]
    rows = read_csv(out / "emkd_per_case.csv")
    assert [r["case"] for r in rows] == sorted({e["case"] for e in test_items})
    for row in rows:  # the ground-truth counts are the case's label voxels over its listed slices
        labels = [np.asarray(nib.load(tiny2d / e["label"]).dataobj) for e in test_items if e["case"] == row["case"]]
        for cls in (1, 2):
            assert int(row[f"G_class{cls}"]) == sum(int((lab == cls).sum()) for lab in labels)
            assert 0.0 <= num(row[f"dice_class{cls}"]) <= 1.0
    assert not (out / "dice_hd95_per_case.csv").exists()
