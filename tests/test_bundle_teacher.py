"""Teachers from MONAI bundle folders (``medkd.distill.bundle``): zoo-layout bundles written here (random weights,
small sizes) in the config layout of spleen_ct_segmentation (3D UNet), wholeBody/brats (SegResNet),
ventricular_short_axis_3label (2D UNet) and swin_unetr_btcv_segmentation; the ``teacher_bundle`` key of the KD
bundles; and clear errors for bundles that cannot serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES, TINY_2D, workflow

from medkd.distill import (BundleTeacherError, bundle_teacher_ckpt, bundle_teacher_network, check_teacher_fits,
                           load_bundle_teacher)
from medkd.distill.bundle import resolve_config
from medkd.networks import resolve_tap

# network_def of each zoo bundle, shrunk; out_channels 3 = the demo data's classes (background, GM, WM)
ZOO = {
    "spleen_ct_segmentation": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                               "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 2, "norm": "batch"},
    "wholeBody_ct_segmentation": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                  "init_filters": 16, "blocks_down": [1, 2, 2], "blocks_up": [1, 1],
                                  "dropout_prob": 0.2},
    "ventricular_short_axis_3label": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                      "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 2},
    "swin_unetr_btcv_segmentation": {"_target_": "SwinUNETR", "spatial_dims": 3, "in_channels": 1,
                                     "out_channels": 3, "feature_size": 24, "use_checkpoint": False},
}


def _preprocessing(dims: int) -> list[dict]:
    if dims == 2:  # ventricular / endoscopic style: intensity scaling, no resampling
        return [{"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "ScaleIntensityd", "keys": "@image_key"},
                {"_target_": "EnsureTyped", "keys": "@image_key"}]
    return [{"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},  # spleen style
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": "$@a_min", "a_max": "$@a_min + 1000.0",
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "@image_key"}]


def write_zoo_bundle(root: Path, name: str, definition: dict | None = None, weights: str = "model.pt",
                     loader: str = "top") -> Path:
    """A bundle folder in the model zoo's layout (``configs/inference.json``, ``metadata.json``, ``models/``), its
    weights random, written from ``definition`` (default: ``ZOO[name]``). ``loader``: ``top`` (a top-level
    ``checkpointloader`` like spleen) or ``handlers`` (a CheckpointLoader in ``handlers`` whose path is a
    conditional expression, like wholeBody's ``highres``). ``weights``: ``model.pt``, ``model.ts`` or ``none``."""
    from monai.bundle import ConfigParser

    definition = definition or ZOO[name]
    dims = definition["spatial_dims"]
    bundle = root / name
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    roi = [64 if definition["_target_"] == "SwinUNETR" else 32] * dims  # Swin's instance norm needs > 1 voxel at 1/32
    path = ("$@bundle_root + '/models/model.pt' if @highres else @bundle_root + '/models/model_lowres.pt'"
            if loader == "handlers" else "$@bundle_root + '/models/model.pt'")
    checkpoint = {"_target_": "CheckpointLoader", "load_path": path, "load_dict": {"model": "@network"},
                  "map_location": "@device"}
    inference = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".", "output_dir": "$@bundle_root + '/eval'", "dataset_dir": f"/workspace/data/{name}",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "image_key": "image", "pixdim": [8.0] * 3, "a_min": 0.0, "highres": False,
        "network_def": definition, "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(dims)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": ({"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 4, "overlap": 0.5}
                    if dims == 3 else {"_target_": "SimpleInferer"}),
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "separate_folder": False, "resample": False}]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}] + ([checkpoint] if loader == "handlers" else []),
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }
    if loader == "top":
        inference["checkpointloader"] = checkpoint
        inference["initialize"].append("$@checkpointloader(@evaluator)")
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference, indent=4))
    meta = json.loads((BUNDLES / "supervised_segmentation" / "configs" / "metadata.json").read_text())
    for io in ("inputs", "outputs"):
        fmt = next(iter(meta["network_data_format"][io].values()))
        fmt["spatial_shape"] = [f"{roi[0]}*n"] * dims  # verify_net_in_out tries n = 1
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = definition["out_channels"]
    meta["name"] = name
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
    (bundle / "LICENSE").write_text("Apache License 2.0 (test bundle)\n")
    torch.manual_seed(0)
    net = ConfigParser({"n": definition}).get_parsed_content("n")
    file = "model_lowres.pt" if loader == "handlers" else "model.pt"
    if weights == "model.pt":
        torch.save(net.state_dict(), bundle / "models" / file)
    elif weights == "model.ts":
        torch.jit.script(net.eval()).save(str(bundle / "models" / "model.ts"))
    return bundle


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_bundle_loads_as_teacher_with_its_weights_and_taps(name, tmp_path):
    loader = "handlers" if name == "wholeBody_ct_segmentation" else "top"
    bundle = write_zoo_bundle(tmp_path, name, loader=loader)
    teacher = load_bundle_teacher(bundle)
    definition = ZOO[name]
    assert (teacher.spatial_dims, teacher.in_channels, teacher.out_channels) == (definition["spatial_dims"], 1, 3)
    # the loader's conditional path picked the low-resolution file (highres false), as the bundle itself would
    assert teacher.checkpoint.name == ("model_lowres.pt" if loader == "handlers" else "model.pt")
    saved = torch.load(teacher.checkpoint, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in teacher.network.state_dict().items())
    for alias in ("low", "enc1", "bottleneck"):
        assert resolve_tap(teacher.network, alias, "teacher") is not None
    x = torch.randn(1, 1, *([64 if name.startswith("swin") else 32] * definition["spatial_dims"]))
    assert teacher.network(x).shape == (1, 3, *x.shape[2:])


def test_bundle_code_is_never_run_only_network_def_is_built(tmp_path):
    bundle = write_zoo_bundle(tmp_path, "spleen_ct_segmentation")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    marker = tmp_path / "ran"
    config["imports"].append(f"$open({str(marker)!r}, 'w').write('x')")
    config["network"] = f"$open({str(marker)!r}, 'w').write('x')"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    load_bundle_teacher(bundle)
    assert not marker.exists()
    # an expression inside network_def that is not plain arithmetic is refused, not evaluated
    config["network_def"]["out_channels"] = f"$len(open({str(marker)!r}, 'w').write('x') * 'ab')"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleTeacherError, match=r"network_def#out_channels.*is not evaluated"):
        load_bundle_teacher(bundle)
    assert not marker.exists()


def test_resolve_config_evaluates_only_literals_refs_and_arithmetic():
    config = {"a": 3, "b": "@a", "c": {"d": [1, "$@b * 2"]}, "flag": False}
    assert resolve_config("$@b * 2 + 1 if not @flag else 0", config) == 7
    assert resolve_config("@c", config) == {"d": [1, 6]}
    assert resolve_config("$@a >= 3 and @a < 4", config) is True
    for bad in ("$__import__('os')", "$torch.device('cpu')", "$(1).__class__", "$[x for x in (1,)]"):
        with pytest.raises(BundleTeacherError, match="is not evaluated"):
            resolve_config(bad, config)
    with pytest.raises(BundleTeacherError, match="reference @missing is not in the config"):
        resolve_config("@missing", config)
    with pytest.raises(BundleTeacherError, match="reference cycle"):
        resolve_config("@x", {"x": "@y", "y": "@x"})


def test_bundle_local_code_mismatching_weights_and_missing_weights_are_clear_errors(tmp_path):
    local = dict(ZOO["spleen_ct_segmentation"], _target_="scripts.networks.UNesT")
    bundle = write_zoo_bundle(tmp_path / "a", "spleen_ct_segmentation")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["network_def"] = local
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleTeacherError, match=r"_target_ 'scripts.networks.UNesT' is neither a MONAI component"):
        load_bundle_teacher(bundle)
    bundle = write_zoo_bundle(tmp_path / "b", "spleen_ct_segmentation")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["network_def"]["channels"] = [8, 16, 64]  # weights were saved for [8, 16, 32]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleTeacherError, match=r"model.pt does not match .*inference.json#network_def \(UNet\)"):
        load_bundle_teacher(bundle)
    bundle = write_zoo_bundle(tmp_path / "c", "spleen_ct_segmentation", weights="none")
    with pytest.raises(BundleTeacherError, match="has no weights"):
        load_bundle_teacher(bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["network_def"]["norm"] = "no_such_norm"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleTeacherError, match=r"cannot build .*network_def \(UNet\)"):
        load_bundle_teacher(bundle, load_weights=False)


def test_torchscript_teacher_gives_logits_only(tmp_path):
    bundle = write_zoo_bundle(tmp_path, "ventricular_short_axis_3label", weights="model.ts")
    teacher = load_bundle_teacher(bundle)
    assert teacher.torchscript and (teacher.spatial_dims, teacher.in_channels, teacher.out_channels) == (2, 1, 3)
    reference = torch.jit.load(str(bundle / "models" / "model.ts"))
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(teacher.network(x), reference(x))
    from medkd.distill import LiveTeacher, LossTerm
    from medkd.losses import PredictionMapDistillation

    logits_term = LossTerm("kd", PredictionMapDistillation(), 1.0, ["s.logits", "t.logits"])
    net = bundle_teacher_network(None, bundle, [logits_term], 2, 1, 3)
    live = LiveTeacher(net, bundle_teacher_ckpt(None, bundle), {})  # weights through a weights-only state dict
    assert torch.equal(live(x)["t.logits"], reference(x))
    tap_term = LossTerm("at", PredictionMapDistillation(), 1.0, ["s.low", "t.low"])
    with pytest.raises(BundleTeacherError, match=r"TorchScript and gives logits only, but KD terms read \['t.low'\]"):
        bundle_teacher_network(None, bundle, [tap_term], 2, 1, 3)


def test_interface_check_names_both_values(tmp_path):
    teacher = load_bundle_teacher(write_zoo_bundle(tmp_path, "spleen_ct_segmentation"))
    check_teacher_fits(teacher, 3, 1, 3)
    with pytest.raises(BundleTeacherError, match=r"num_classes \(out_channels\) 3 .* but the KD bundle has num_classes "
                                                 r"\(out_channels\) 2"):
        check_teacher_fits(teacher, 3, 1, 2)
    with pytest.raises(BundleTeacherError, match=r"spatial_dims 3 .* has spatial_dims 2"):
        check_teacher_fits(teacher, 2, 1, 3)
    with pytest.raises(BundleTeacherError, match=r"in_channels 1 .* has in_channels 4"):
        check_teacher_fits(teacher, 3, 4, 3)


def test_kd_bundle_distils_from_teacher_bundle(tiny2d, tmp_path):
    """emkd_segmentation with ``--teacher_bundle``: the Distiller's live teacher is the bundle's network with its
    weights, its taps (low/high) by alias; a class-count mismatch stops the run before training."""
    bundle = write_zoo_bundle(tmp_path, "ventricular_short_axis_3label")
    wf = workflow("emkd_segmentation", ["train.json"], dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path / "m"),
                  output_dir=str(tmp_path / "e"), teacher_bundle=str(bundle), **TINY_2D)
    live = wf.parser.get_parsed_content("distiller").teacher
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v.cpu()) for k, v in live.network.state_dict().items())
    x = torch.randn(1, 1, 48, 64)
    out = live(x)
    assert set(out) == {"t.logits", "t.low", "t.high"} and out["t.low"].shape[-2:] == (24, 32)
    with pytest.raises(Exception) as failed:  # MONAI wraps the error of a config expression in its own
        wf = workflow("emkd_segmentation", ["train.json"], dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path / "m2"),
                      output_dir=str(tmp_path / "e2"), teacher_bundle=str(bundle), num_classes=2, **TINY_2D)
        wf.parser.get_parsed_content("distiller")
    error, messages = failed.value, []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    assert any(isinstance(m, str) and "has num_classes (out_channels) 3 (inference.json network_def) but the KD bundle "
               "has num_classes (out_channels) 2" in m for m in messages), messages
    assert not (tmp_path / "m2").exists()


@pytest.mark.parametrize("bundle", ["emkd_segmentation", "gkd_segmentation", "graph_flow_segmentation",
                                    "mtms_ckd_segmentation"])
def test_kd_bundles_keep_their_own_teacher_when_teacher_bundle_is_null(bundle):
    config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    assert config["teacher_bundle"] is None
    block = config["teacher"] if bundle == "graph_flow_segmentation" else config["distiller"]
    text = json.dumps(block)
    assert "bundle_teacher_network(@teacher_def, @teacher_bundle" in text and \
        "bundle_teacher_ckpt(@teacher_ckpt, @teacher_bundle)" in text
    sentinel = torch.nn.Linear(1, 1)
    assert bundle_teacher_network(sentinel, None) is sentinel and bundle_teacher_ckpt("t.pt", None) == "t.pt"


def _strings(node, path="", parent=None):
    """(id, parent container, string) of every string in a config."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}#{k}" if path else k, node)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}#{i}", node)
    elif isinstance(node, str):
        yield path, parent, node


def test_every_config_that_builds_a_teacher_honours_teacher_bundle():
    """Every train/stage config and recipe of every bundle: wherever ``@teacher_def`` is used (distiller blocks, live
    teachers, tap_channels), it goes through bundle_teacher_network(@teacher_def, @teacher_bundle...), and each
    teacher checkpoint next to it through bundle_teacher_ckpt; recipes that add a teacher to the teacher-free ACW-SKD
    declare teacher_bundle null. (MTMS-CKD's train_teacher.json trains the teacher itself: not a KD teacher.)"""
    seen = 0
    for path in sorted(BUNDLES.glob("*/configs/**/*.json")):
        if path.name in ("metadata.json", "train_teacher.json"):
            continue
        config = json.loads(path.read_text())
        for key, parent, text in _strings(config):
            if "@teacher_def" in text:
                seen += 1
                assert text.count("@teacher_def") == text.count("bundle_teacher_network(@teacher_def, @teacher_bundle"), \
                    f"{path}#{key}: {text}"
            if key.endswith(("#teacher_ckpt", "#checkpoint")) and "bundle_teacher_network" in json.dumps(parent):
                assert text == "$medkd.distill.bundle_teacher_ckpt(@teacher_ckpt, @teacher_bundle)", f"{path}#{key}"
        if "@teacher_bundle" in path.read_text() and "acw_skd" in str(path):
            assert "teacher_bundle" in config and config["teacher_bundle"] is None, path
    assert seen >= 40  # the KD bundles' train.json, their stage configs and recipes


def test_acw_skd_recipe_and_gkd_alignment_read_the_teacher_bundle(tiny2d, tmp_path):
    """ACW-SKD + recipes/kd_fitnet.json (a plain Distiller with a teacher) and GKD's teacher alignment network with
    ``--teacher_bundle``: the teacher is the bundle's network with its weights, and the FitNet regressor / MSAN input
    are sized from the bundle teacher's taps (channel counts measured here with a forward hook)."""
    bundle = write_zoo_bundle(tmp_path, "ventricular_short_axis_3label")
    teacher = load_bundle_teacher(bundle).network.eval()

    def channels(tap: str) -> int:
        found = []
        handle = resolve_tap(teacher, tap, "teacher").register_forward_hook(lambda m, i, o: found.append(o.shape[1]))
        with torch.no_grad():
            teacher(torch.zeros(1, 1, 48, 64))
        handle.remove()
        return int(found[0])

    wf = workflow("acw_skd_segmentation", ["train.json", "recipes/kd_fitnet.json"], dataset_dir=str(tiny2d),
                  ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "e"), teacher_bundle=str(bundle), **TINY_2D)
    distiller = wf.parser.get_parsed_content("distiller")
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    live = distiller.teacher
    assert all(torch.equal(saved[k], v.cpu()) for k, v in live.network.state_dict().items())
    fitnet = distiller.terms[0].loss
    assert fitnet.teacher_channels == channels("high") != 64  # 64: the bundle's own teacher_def at 'high'
    wf = workflow("gkd_segmentation", ["train.json"], dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path / "g"),
                  output_dir=str(tmp_path / "ge"), teacher_bundle=str(bundle), **TINY_2D)
    tap = wf.parser.get_parsed_content("teacher_tap")
    assert wf.parser.get_parsed_content("teacher_msan_def#in_channels") == channels(tap)
