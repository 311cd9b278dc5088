"""``python -m medkd compress``: zoo-layout teacher bundles (written by test_bundle_teacher.write_zoo_bundle, random
weights, small sizes) compressed end to end on the tiny demo data; the exported student passes the zoo checks and
runs its inference.json with the repository's medkd blocked; bad inputs are clear errors that write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SCHEMA
from monai.bundle import verify_metadata, verify_net_in_out
from test_bundle_teacher import ZOO, write_zoo_bundle
from test_export_bundle import BLOCKED_RUN, blocked_run

from medkd.compress import adapt_preprocessing, compress, read_items, student_definition
from medkd.distill import BundleTeacherError, load_bundle_teacher
from medkd.io import load_state_dict_file


def test_teacher_transforms_act_on_labels_with_nearest_interpolation():
    chain = [{"_target_": "LoadImaged", "keys": "img", "image_only": True},
             {"_target_": "Spacingd", "keys": "img", "pixdim": [2, 2, 2], "mode": "bilinear"},
             {"_target_": "Resized", "keys": ["img"], "spatial_size": [8, 8, 8]},
             {"_target_": "ScaleIntensityRanged", "keys": "img", "a_min": 0, "a_max": 1, "b_min": 0, "b_max": 1},
             {"_target_": "CropForegroundd", "keys": "img", "source_key": "img"}]
    out = adapt_preprocessing(chain, "img", "label")
    assert out[0]["keys"] == ["image", "label"]
    assert out[1]["keys"] == ["image", "label"] and out[1]["mode"] == ["bilinear", "nearest"]
    assert out[2]["mode"] == ["area", "nearest"]  # Resized's default mode for the image
    assert out[3]["keys"] == ["image"]  # intensity: image only
    assert out[4]["keys"] == ["image", "label"] and out[4]["source_key"] == "image"
    assert adapt_preprocessing(chain, "img", None)[1]["keys"] == ["image"]
    # applied to a labelled pair: the label keeps integer values (nearest), the image is interpolated
    from monai.bundle import ConfigParser

    pipe = ConfigParser({"c": {"_target_": "Compose", "transforms": adapt_preprocessing(chain[2:3], "img", "label")}})
    label = torch.zeros(1, 4, 4, 4)
    label[:, :2] = 2
    data = pipe.get_parsed_content("c")({"image": torch.rand(1, 4, 4, 4), "label": label})
    assert set(data["label"].unique().tolist()) == {0.0, 2.0}


@pytest.mark.parametrize("name,key,expected", [
    ("spleen_ct_segmentation", "channels", {"half": [4, 8, 16], "quarter": [2, 4, 8], "eighth": [2, 2, 4]}),
    ("wholeBody_ct_segmentation", "init_filters", {"half": 8, "quarter": 8}),
    ("swin_unetr_btcv_segmentation", "feature_size", {"half": 12}),
])
def test_student_presets_scale_the_teacher_width(name, key, expected, tmp_path):
    teacher = load_bundle_teacher(write_zoo_bundle(tmp_path, name), load_weights=False)
    for preset, value in expected.items():
        definition = student_definition(teacher, preset)
        assert definition[key] == value
        assert {k: v for k, v in definition.items() if k != key} == {k: v for k, v in ZOO[name].items() if k != key}
    enet = student_definition(load_bundle_teacher(write_zoo_bundle(tmp_path / "2d", "ventricular_short_axis_3label")),
                              "ENet")
    assert enet == {"_target_": "medkd.networks.ENet", "in_channels": 1, "out_channels": 3}
    with pytest.raises(ValueError, match="is not a class medkd or MONAI knows"):
        student_definition(teacher, "NoSuchNet")


def test_read_items_holds_out_splits_and_strips_labels_when_label_free(tiny2d, tmp_path):
    full = read_items(tiny2d / "datalist.json", "datalist")
    content = json.loads((tiny2d / "datalist.json").read_text())
    assert [len(full[k]) for k in ("training", "validation", "test")] == [len(content[k]) for k in
                                                                         ("training", "validation", "test")]
    free = read_items(tiny2d / "datalist.json", "none")
    assert all(set(d) == {"image"} for k in ("training", "validation") for d in free[k])
    assert all("label" in d for d in free["test"])  # test labels, where given, score the student
    folder = tmp_path / "images"
    folder.mkdir()
    for d in content["training"] + content["test"]:
        shutil.copy(d["image"] if Path(d["image"]).is_absolute() else tiny2d / d["image"], folder)
    items = read_items(folder, "none", seed=3)
    names = [Path(d["image"]).name for k in ("training", "validation", "test") for d in items[k]]
    assert sorted(names) == sorted(p.name for p in folder.iterdir()) and len(items["test"]) >= 1
    with pytest.raises(ValueError, match="needs a datalist JSON"):
        read_items(folder, "datalist")


def _bad_network_def(bundle: Path) -> None:
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["network_def"]["strides"] = "$__import__('os').getcwd()"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))


def _mismatching_weights(bundle: Path) -> None:
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["network_def"]["num_res_units"] = 1
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case,pattern", [
    ("network_def", r"network_def#strides: expression .* is not evaluated"),
    ("weights", r"model.pt does not match .*network_def \(UNet\)"),
    ("classes", r"has values \[2\] outside the classes 0..1 \(num_classes=2\)"),
    ("dims", r"is 2D after the teacher's preprocessing but the teacher .* is 3D"),
])
def test_bad_teacher_or_data_is_a_clear_error_and_writes_nothing(case, pattern, tiny2d, tmp_path):
    if case == "classes":  # a spleen-like 2-class teacher, labels with 3 classes
        definition = dict(ZOO["ventricular_short_axis_3label"], out_channels=2)
        bundle = write_zoo_bundle(tmp_path, "ventricular_short_axis_3label", definition)
    elif case == "dims":
        bundle = write_zoo_bundle(tmp_path, "spleen_ct_segmentation")
    else:
        bundle = write_zoo_bundle(tmp_path, "ventricular_short_axis_3label")
        (_bad_network_def if case == "network_def" else _mismatching_weights)(bundle)
    out = tmp_path / "out"
    with pytest.raises((BundleTeacherError, ValueError), match=pattern):
        compress(bundle, tiny2d / "datalist.json", out, epochs=1, labels="datalist" if case == "classes" else "none")
    assert not out.exists()


def _infer_blocked(bundle: Path, images: list[Path], tmp_path: Path) -> list[Path]:
    """Run the exported student's inference.json with the repository's medkd unimportable; returns the outputs."""
    data = tmp_path / "user_data"
    (data / "imagesTs").mkdir(parents=True)
    for image in images:
        shutil.copy(image, data / "imagesTs" / image.name)
    cwd = tmp_path / "user"
    cwd.mkdir()
    (tmp_path / "blocked_run.py").write_text(BLOCKED_RUN)
    out = tmp_path / "predictions"
    blocked_run(tmp_path, cwd, bundle, "monai.bundle",
                ["run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                 "--dataset_dir", str(data), "--output_dir", str(out)])
    return sorted(out.glob("*_seg.nii.gz"))


@pytest.mark.slow  # one KD bundle run, inference and export per teacher: 30-90 s each on 2 busy cores
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_bundle_compresses_end_to_end(name, tiny2d, tiny3d, tmp_path):
    dims = ZOO[name]["spatial_dims"]
    data = (tiny2d if dims == 2 else tiny3d) / "datalist.json"
    bundle = write_zoo_bundle(tmp_path / "zoo", name)
    out = tmp_path / "out"
    report = compress(bundle, data, out, student="half", epochs=1, labels="none", batch_size=2)

    # the report: the student is the teacher's architecture at half width, measured against the teacher
    assert report["models"]["teacher"]["params"] > 2 * report["models"]["student"]["params"]
    student = report["models"]["student"]
    agreement = student["dice_teacher_agreement"]["mean"]
    assert 0.0 <= agreement <= 1.0 and student["dice_labels"] is not None  # the demo datalist has test labels
    assert json.loads((out / "report.json").read_text())["student"] == report["student"]
    assert "agreement Dice with the teacher" in (out / "report.md").read_text()

    # the exported bundle: zoo checks, the trained weights, the teacher's own pre/post-processing
    exported = out / report["bundle_dir"]
    verify_metadata(meta_file=str(exported / "configs" / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out(net_id="network_def", meta_file=str(exported / "configs" / "metadata.json"),
                      config_file=str(exported / "configs" / "inference.json"))
    shipped = load_state_dict_file(exported / "models" / "model.pt")
    trained = load_state_dict_file(out / "work" / "student" / "model.pt")
    assert shipped.keys() == trained.keys() and all(torch.equal(shipped[k], trained[k]) for k in shipped)
    teacher_config = json.loads((bundle / "configs" / "inference.json").read_text())
    student_config = json.loads((exported / "configs" / "inference.json").read_text())
    for key in ("preprocessing", "inferer", "postprocessing"):
        assert student_config[key] == teacher_config[key]
    assert student_config["network_def"] == report["student"]

    # resumable: the same command reuses the prepared data and the trained student
    again = compress(bundle, data, out, student="half", epochs=1, labels="none", batch_size=2)
    # (JSON text: a class the random teacher never predicts has NaN agreement, and NaN != NaN)
    assert json.dumps(again["models"]["student"]["dice_teacher_agreement"]) == \
        json.dumps(student["dice_teacher_agreement"])

    if name == "ventricular_short_axis_3label":  # offline KD: the teacher's outputs cached once, then served
        offline = compress(bundle, data, tmp_path / "offline", student="half", epochs=2, labels="none", batch_size=2,
                           teacher_views=1, export=False)
        work = tmp_path / "offline" / "work"
        manifest = json.loads((work / "teacher_cache" / "manifest.json").read_text())
        assert manifest["views"] == 1 and manifest["complete"] and offline["teacher_views"] == 1
        assert f"--teacher_cache {work / 'teacher_cache'}" in (work / "logs" / "student.log").read_text().splitlines()[0]

    if name == "ventricular_short_axis_3label":  # zoo users run inference.json without medkd
        test = [Path(d["image"]) for d in json.loads(data.read_text())["test"]]
        test = [p if p.is_absolute() else data.parent / p for p in test]
        segs = _infer_blocked(exported, test, tmp_path)
        assert len(segs) == len(test)
        seg = np.asarray(nib.load(segs[0]).dataobj)
        assert seg.shape[:2] == nib.load(test[0]).shape[:2] and set(np.unique(seg)) <= {0, 1, 2}


def test_2d_images_with_channels_keep_2d_through_the_prepared_files(tmp_path):
    """A 2D RGB teacher (PNG images): the prepared NIfTI files read back as (3, H, W) images and (1, H, W) labels in
    the KD bundle's transforms and in the evaluation, and pass check_datalist as 2D with 3 channels."""
    from monai.bundle import ConfigParser
    from PIL import Image

    from medkd.compress import _load, prepare, teacher_pipeline, training_overrides
    from medkd.data import check_datalist

    bundle = write_zoo_bundle(tmp_path, "ventricular_short_axis_3label",
                              dict(ZOO["ventricular_short_axis_3label"], in_channels=3))
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        rgb = rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)
        label = rng.integers(0, 3, (32, 40), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / f"img{i}.png")
        Image.fromarray(label).save(tmp_path / f"lab{i}.png")
        items.append({"image": str(tmp_path / f"img{i}.png"), "label": str(tmp_path / f"lab{i}.png")})
    teacher = load_bundle_teacher(bundle)
    pipeline = teacher_pipeline(teacher)
    datalist = prepare(teacher, pipeline, {"training": items[:2], "test": items[2:]}, tmp_path / "prepared")
    entries = json.loads(datalist.read_text())
    train = [{k: str(datalist.parent / d[k]) for k in ("image", "label")} for d in entries["training"]]
    check_datalist(train, 3, spatial_dims=2, in_channels=3)
    config = training_overrides(teacher, pipeline, {"_target_": "UNet"}, [16, 16])
    chain = ConfigParser({"roi_size": [16, 16], "c": {"_target_": "Compose",
                                                        "transforms": config["train#deterministic_transforms"]}})
    sample = chain.get_parsed_content("c")(train[0])
    # LoadImage reads a PNG as (W, H, C): the expected arrays, after the teacher's ScaleIntensityd (min-max to 0..1)
    rgb = np.asarray(Image.open(items[0]["image"]), dtype=np.float32).transpose(2, 1, 0)
    rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min())
    label = np.asarray(Image.open(items[0]["label"])).T
    assert tuple(sample["image"].shape) == (3, 40, 32) and tuple(sample["label"].shape) == (1, 40, 32)
    np.testing.assert_allclose(sample["image"].numpy(), rgb, atol=1e-6)
    np.testing.assert_array_equal(sample["label"][0].numpy(), label)
    test = entries["test"][0]
    assert tuple(_load(datalist.parent / test["image"], 2).shape) == (3, 40, 32)
    assert tuple(_load(datalist.parent / test["teacher"], 2).shape) == (1, 40, 32)


def test_width_preset_of_a_torchscript_teacher_is_a_clear_error(tmp_path):
    bundle = write_zoo_bundle(tmp_path, "ventricular_short_axis_3label", weights="model.ts")
    teacher = load_bundle_teacher(bundle)
    assert teacher.torchscript
    with pytest.raises(ValueError, match=r"student preset 'half' scales the teacher's network_def, but .*model.ts is "
                                         r"a TorchScript teacher"):
        student_definition(teacher, "half")
    assert student_definition(teacher, "ENet")["_target_"] == "medkd.networks.ENet"  # a named student still works


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path):
    from medkd.compress import _run

    folder = tmp_path / "work" / "student"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"")
    settings = {"configs": ["train.json", "recipes/kd_logits.json"], "overrides": {"epochs": "20", "seed": "0"}}
    (folder / "done.json").write_text(json.dumps({"seconds": 1.0, "settings": settings}))
    # the same settings: skipped (no bundle run starts), the finished model returned
    assert _run("student", "emkd_segmentation", settings["configs"], {"epochs": 20, "seed": 0}, tmp_path / "work") \
        == folder / "model.pt"
    with pytest.raises(ValueError, match=r"finished 'student' run with other settings \(--epochs: 20 then, 50 now\)"):
        _run("student", "emkd_segmentation", settings["configs"], {"epochs": 50, "seed": 0}, tmp_path / "work")
    with pytest.raises(ValueError, match=r"configs \['train.json', 'recipes/kd_logits.json'\] then"):
        _run("student", "emkd_segmentation", ["train.json"], {"epochs": 20, "seed": 0}, tmp_path / "work")
