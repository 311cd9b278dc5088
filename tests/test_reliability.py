"""Runs a user can trust: exact resume, consistent checkpoints, no silent failures, errors that name the file/key,
readable failures of `python -m monai.bundle run`, inference in the training geometry."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, TINY_2D, copy_datalist, error_chain, step_trainer, workflow
from ignite.engine import Engine, Events
from monai.networks.nets import UNet
from torch import nn

from medkd.data import check_datalist, load_datalist
from medkd.distill import Distiller
from medkd.engines import AtomicCheckpointSaver, TrainingState, check_output_channels, parse_bool
from medkd.io import load_state_dict_file

SUP = "supervised_segmentation"


def tiny(out: Path, data: Path, **kw) -> dict:
    return {**TINY_2D, "batch_size": 2, "dataset_dir": str(data), "ckpt_dir": str(out), "output_dir": str(out / "eval"), **kw}


def train(out: Path, data: Path, interrupt=None, **kw) -> dict:
    """Train the supervised bundle in-process; ``interrupt`` (an ignite event) raises there, like a kill."""
    wf = workflow(SUP, ["train.json"], **tiny(out, data, **kw))
    trainer = wf.parser.get_parsed_content("train#trainer")  # built first in every run: the same construction order
    if interrupt is not None:
        def kill(engine):
            raise KeyboardInterrupt("killed")

        trainer.add_event_handler(interrupt, kill)
    try:
        wf.run()
    except KeyboardInterrupt:
        pass
    wf.finalize()
    return torch.load(out / "train_state.pt", weights_only=True)


# ---------------------------------------------------------------- resume


def test_parse_bool_accepts_the_usual_spellings_and_names_the_key():
    for text in ("true", "True", "1", "yes", "YES", "on", True, 1):
        assert parse_bool(text, "resume") is True
    for text in ("false", "FALSE", "0", "no", "off", False, 0):
        assert parse_bool(text, "resume") is False
    with pytest.raises(ValueError, match="resume must be true or false.*'maybe'"):
        parse_bool("maybe", "resume")


def test_resume_false_as_the_command_line_writes_it_starts_over(tmp_path):
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    first = step_trainer(net, opt)
    TrainingState(tmp_path / "s.pt", {"network": net, "optimizer": opt}).attach(first)
    first.run([0, 1], max_epochs=2)
    again = step_trainer(net, opt)
    TrainingState(tmp_path / "s.pt", {"network": net, "optimizer": opt}, resume="false").attach(again)
    epochs_run = []
    again.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs_run.append(e.state.epoch))
    again.run([0, 1], max_epochs=2)
    assert epochs_run == [1, 2]  # started over; resuming a finished run would run no epoch


def test_resumed_run_is_bit_identical_after_a_kill_mid_epoch_and_at_an_epoch_boundary(tiny2d, tmp_path):
    """2 iterations per epoch, 3 epochs: kill in the middle of epoch 2, or right after epoch 1 was saved."""
    ref = train(tmp_path / "ref", tiny2d, epochs=3)["network"]
    for name, event in (("mid", Events.ITERATION_COMPLETED(once=3)), ("boundary", Events.EPOCH_COMPLETED(once=1))):
        out = tmp_path / name
        stopped = train(out, tiny2d, interrupt=event, epochs=3)
        assert stopped["trainer"]["iteration"] == 2  # the kill happened part-way, after epoch 1 was saved
        resumed = train(out, tiny2d, epochs=3)
        assert resumed["trainer"]["iteration"] == 6
        assert all(torch.equal(ref[k], resumed["network"][k]) for k in ref), name
        assert not list(out.glob(".*.tmp")) and not list(out.glob(".*.pending"))


@pytest.mark.slow
def test_resumed_run_is_bit_identical_with_worker_processes(tiny2d, tmp_path):
    ref = train(tmp_path / "ref", tiny2d, epochs=3, num_workers=2)["network"]
    train(tmp_path / "k", tiny2d, interrupt=Events.ITERATION_COMPLETED(once=3), epochs=3, num_workers=2)
    resumed = train(tmp_path / "k", tiny2d, epochs=3, num_workers=2)["network"]
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


class _Kill(Exception):
    pass


def _scored_run(ckpt: Path, scores: list[float], kill_at=None, kill_commit=False, max_epochs=3):
    """A trainer whose epoch e "validates" with score scores[e-1] (the weights are filled with it) into a best-model
    saver, under a TrainingState; ``kill_at`` raises after the best model is saved, before the state is written."""
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = Engine(lambda e, b: None)
    trainer.state.best_metric, trainer.state.best_metric_epoch = -1, -1
    saver = AtomicCheckpointSaver(str(ckpt), {"model": net}, save_key_metric=True, key_metric_name="dice",
                                  key_metric_filename="model.pt")

    def validate(engine):
        score = scores[engine.state.epoch - 1]
        engine.state.metrics = {"dice": score}
        if score > engine.state.best_metric:
            engine.state.best_metric, engine.state.best_metric_epoch = score, engine.state.epoch
        with torch.no_grad():
            net.weight.fill_(score)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    saver.attach(trainer)
    if kill_at is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=kill_at), lambda e: (_ for _ in ()).throw(_Kill()))
    state = TrainingState(ckpt / "train_state.pt", {"network": net, "optimizer": opt, "best_model_saver": saver})
    state.attach(trainer)
    if kill_commit:
        saver.commit = lambda: (_ for _ in ()).throw(_Kill())
    try:
        trainer.run([0], max_epochs=max_epochs)
    except _Kill:
        pass
    return trainer


def test_best_model_and_training_state_stay_consistent_whatever_the_kill(tmp_path):
    # killed after epoch 2's better model was saved but before the state recording it: model.pt keeps epoch 1's
    _scored_run(tmp_path, [0.5, 0.9, 0.1], kill_at=2)
    assert load_state_dict_file(tmp_path / "model.pt")["weight"].flatten().tolist() == [0.5, 0.5]
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["trainer"]["iteration"] == 1
    # the resumed run redoes epoch 2 (a worse score now): model.pt stays the stored best, no "new best" below it
    _scored_run(tmp_path, [0.5, 0.3, 0.4])
    assert load_state_dict_file(tmp_path / "model.pt")["weight"].flatten().tolist() == [0.5, 0.5]
    assert not list(tmp_path.glob(".model.pt.*"))
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)["best_model_saver"]
    assert state["best_metric"] == 0.5 and state["best_metric_epoch"] == 1


def test_a_state_written_before_its_model_was_renamed_commits_it_on_resume(tmp_path):
    _scored_run(tmp_path, [0.5, 0.9, 0.1], kill_commit=True)  # killed right after epoch 1's state was written
    assert not (tmp_path / "model.pt").exists() and len(list(tmp_path.glob(".model.pt.*.pending"))) == 1
    resumed = _scored_run(tmp_path, [0.5, 0.9, 0.1])
    assert load_state_dict_file(tmp_path / "model.pt")["weight"].flatten().tolist() == pytest.approx([0.9, 0.9])
    assert resumed.state.best_metric == 0.9 and not list(tmp_path.glob(".model.pt.*"))


def test_stale_temp_files_are_removed_and_an_earlier_model_is_kept_beside(tmp_path, caplog):
    old = nn.Linear(2, 1)
    torch.save(old.state_dict(), tmp_path / "model.pt")
    stale = [tmp_path / f".model.pt.{'a' * 32}.tmp", tmp_path / f".train_state.pt.{'b' * 32}.tmp",
             tmp_path / f".model.pt.{'c' * 32}.pending"]
    other = tmp_path / f".data.json.{'d' * 32}.tmp"  # not a file of this run
    for path in stale + [other]:
        path.write_bytes(b"x" * 100)
    with caplog.at_level(logging.WARNING):
        _scored_run(tmp_path, [0.2, 0.1, 0.0])
    assert not any(p.exists() for p in stale) and other.exists()
    kept = list(tmp_path.glob("model.replaced-*.pt"))
    assert len(kept) == 1 and torch.equal(load_state_dict_file(kept[0])["weight"], old.weight.detach())
    assert load_state_dict_file(tmp_path / "model.pt")["weight"].flatten().tolist() == pytest.approx([0.2, 0.2])
    assert any("was not written by this run" in r.getMessage() and kept[0].name in r.getMessage() for r in caplog.records)


def _state_run(path, lr=0.1, epochs=2, net=None, resume=True):
    net = net or nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    trainer = step_trainer(net, opt)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
    TrainingState(path, {"network": net, "optimizer": opt, "lr_scheduler": sched}, resume=resume).attach(trainer)
    trainer.run([0, 1], max_epochs=epochs)


@pytest.mark.parametrize("change, match", [
    ({"lr": 0.01}, r"optimizer initial_lr \(the learning rate, e\.g\. --learning_rate\): stored 0\.1, now 0\.01.*--resume false"),
    ({"epochs": 4}, r"epochs: stored run has 2, this run 4.*--resume false"),
    ({"net": "other"}, r"train_state\.pt: its 'network' does not fit this run.*--resume false"),
])
def test_resume_refuses_changed_hyperparameters_epochs_and_networks_naming_them(tmp_path, change, match):
    path = tmp_path / "train_state.pt"
    _state_run(path)
    before = path.read_bytes()
    net = nn.Linear(3, 4) if change.get("net") else None
    with pytest.raises(ValueError, match=match):
        _state_run(path, lr=change.get("lr", 0.1), epochs=change.get("epochs", 2), net=net)
    assert path.read_bytes() == before
    _state_run(path, lr=change.get("lr", 0.1), epochs=change.get("epochs", 2), net=net, resume="no")  # starts over


@pytest.mark.parametrize("content", [b"garbage", "truncate"])
def test_unreadable_training_state_names_the_file_and_the_way_out(tmp_path, content):
    path = tmp_path / "train_state.pt"
    _state_run(path)
    path.write_bytes(content if isinstance(content, bytes) else path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot read the training state .*train_state\.pt.*--resume false"):
        _state_run(path)


# ---------------------------------------------------------------- silent failures


def test_a_run_shorter_than_val_interval_still_ends_with_a_model(tiny2d, tmp_path):
    train(tmp_path, tiny2d, epochs=1, val_interval=2)
    assert (tmp_path / "model.pt").is_file()


def _edited(tiny2d, tmp_path, edit):
    return copy_datalist(tiny2d, tmp_path / "data", edit)


def _nan_validation(data_dir: Path) -> None:
    entry = json.loads((data_dir / "datalist.json").read_text())["validation"][0]
    img = nib.load(data_dir / entry["image"])
    arr = np.asarray(img.dataobj, dtype=np.float32).copy()
    arr[5, 5] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), data_dir / entry["image"])


@pytest.mark.parametrize("case, overrides, match", [
    ("empty_validation", {}, r"the 'validation' list of datalist .*datalist\.json is empty"),
    ("empty_training", {}, r"the 'training' list of datalist .*datalist\.json is empty"),
    ("nan_validation", {}, r"image .*sub-\d+_z\d+\.nii\.gz has 1 non-finite value"),
    ("val_interval", {"val_interval": 0}, r"val_interval must be an integer of at least 1"),
    ("epochs", {"epochs": 0}, r"epochs must be an integer of at least 1"),
    ("label_key", {}, r"datalist entry 0 of the 'training' list .* has no 'label' key"),
])
def test_bad_schedules_and_lists_stop_before_training(case, overrides, match, tiny2d, tmp_path):
    def edit(d):
        if case.startswith("empty_"):
            d[case.split("_")[1]] = []
        if case == "label_key":
            d["training"][0].pop("label")

    data = _edited(tiny2d, tmp_path, edit)
    if case == "nan_validation":
        _nan_validation(data)
    out = tmp_path / "ckpt"
    with pytest.raises(Exception) as err:
        train(out, data, **overrides)
    assert re.search(match, error_chain(err.value)), error_chain(err.value)
    assert not (out / "model.pt").exists() and not (out / "train_state.pt").exists()


def test_read_only_output_folder_is_found_before_the_first_epoch(tiny2d, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(Exception) as err:  # (a file in the way: a read-only folder does not stop root)
        workflow(SUP, ["train.json"], **tiny(blocker / "models", tiny2d)).run()
    assert "cannot write in the output folder" in error_chain(err.value) and "not_a_folder" in error_chain(err.value)


# ---------------------------------------------------------------- errors naming the file


def _one(items, **changes):
    return [dict(items[0], **changes)]


def test_datalist_check_names_bad_files(tiny2d, tmp_path):
    items = load_datalist(tiny2d / "datalist.json", "training")
    img = nib.load(items[0]["image"])
    arr = np.asarray(img.dataobj, dtype=np.float32)

    inf = tmp_path / "inf.nii.gz"
    bad = arr.copy()
    bad[1, 2] = np.inf
    nib.save(nib.Nifti1Image(bad, img.affine), inf)
    with pytest.raises(ValueError, match=r"image .*inf\.nii\.gz has 1 non-finite value"):
        check_datalist(_one(items, image=str(inf)), num_classes=3)

    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(Path(items[0]["image"]).read_bytes()[:-400])
    with pytest.raises(ValueError, match=r"cannot read image file .*cut\.nii\.gz.*truncated or corrupt"):
        check_datalist(_one(items, image=str(truncated)), num_classes=3)

    from PIL import Image

    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((64, 48, 3), np.uint8)).save(rgb)
    with pytest.raises(ValueError, match=r"image .*rgb\.png has 3 channel\(s\).*in_channels=1"):
        check_datalist([{"image": str(rgb)}], spatial_dims=2, in_channels=1)

    vol = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 64, 5), np.float32), img.affine), vol)
    with pytest.raises(ValueError, match=r"vol\.nii\.gz has shape \(48, 64, 5\), a 3D image, but this bundle is 2D"):
        check_datalist([{"image": str(vol)}], spatial_dims=2, in_channels=1)
    with pytest.raises(ValueError, match=r"image .*sub-.*has shape \(48, 64\), a 2D image, but this bundle is 3D"):
        check_datalist(items[:1], num_classes=3, spatial_dims=3, in_channels=1)
    one_slice = tmp_path / "slice.nii.gz"  # a 3D volume of one slice is 3D
    nib.save(nib.Nifti1Image(np.zeros((32, 48, 1), np.float32), img.affine), one_slice)
    check_datalist([{"image": str(one_slice)}], spatial_dims=3, in_channels=1)
    assert check_datalist(items, num_classes=3, spatial_dims=2, in_channels=1, require_label=True) == items


def test_inference_checks_its_images_up_front(tiny2d, tmp_path):
    def edit(d):
        d["test"][0]["image"] = "vol.nii.gz"

    data = _edited(tiny2d, tmp_path, edit)
    nib.save(nib.Nifti1Image(np.zeros((48, 64, 5), np.float32), np.eye(4)), data / "vol.nii.gz")
    with pytest.raises(Exception) as err:
        wf = workflow(SUP, ["inference.json"], "infer", dataset_dir=str(data), ckpt_dir=str(tmp_path),
                      output_dir=str(tmp_path / "inf"), load_pretrain=False, roi_size=[48, 64])
        wf.run()
    assert re_search(r"vol\.nii\.gz has shape \(48, 64, 5\), a 3D image, but this bundle is 2D", error_chain(err.value))


def re_search(pattern, text):
    return re.search(pattern, text) is not None


def test_student_and_teacher_channels_are_checked_naming_the_keys(tmp_path):
    def unet(out):
        return UNet(2, 1, out, channels=(4, 8), strides=(2,), num_res_units=0)

    with pytest.raises(ValueError, match=r"network_def \(the student\) outputs 2 channels but num_classes is 3"):
        check_output_channels(Distiller(unet(2), nn.CrossEntropyLoss()), 3, 1, [16, 16])
    teacher = unet(2)
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    from medkd.distill import LossTerm
    from medkd.losses import PredictionMapDistillation

    terms = [LossTerm("kd", PredictionMapDistillation(), 1.0, ["s.logits", "t.logits"])]
    distiller = Distiller(unet(3), nn.CrossEntropyLoss(), terms, teacher=teacher, teacher_ckpt=tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"teacher_def outputs 2 channels but the student \(network_def\) outputs 3"):
        check_output_channels(distiller, 3, 1, [16, 16])
    check_output_channels(Distiller(unet(3), nn.CrossEntropyLoss()), 3, 1, [16, 16])


# ---------------------------------------------------------------- messages


def test_a_failing_cli_run_shows_the_real_error_first_and_last(tiny2d, tmp_path):
    data = _edited(tiny2d, tmp_path, lambda d: d["validation"][0].pop("label"))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLES / SUP / "configs" / "train.json"),
           "--bundle_root", str(BUNDLES / SUP), "--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "ck"),
           "--output_dir", str(tmp_path / "ck" / "eval"), "--roi_size", "[48,64]", "--epochs", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("ERROR: ")]
    assert len(errors) == 2 and errors[-1] == len(lines) - 1 and lines[errors[0]] == lines[errors[1]]
    assert not any("Traceback" in line for line in lines[: errors[0]])  # nothing of the failure before it
    assert re_search(r"^ERROR: KeyError: datalist entry 0 of the 'validation' list of datalist .*datalist\.json has no "
                     r"'label' key", lines[-1])
    assert "Failed to evaluate ConfigExpression" not in done.stderr and done.stderr.count("Traceback (most recent") == 1


def test_validation_does_not_log_a_resume_at_every_epoch(tiny2d, tmp_path, capfd):
    train(tmp_path, tiny2d, epochs=2, val_interval=1)
    log = capfd.readouterr().out  # the bundle's logging.conf logs to stdout
    assert "SupervisedEvaluator - INFO - Got new best metric of val_mean_dice" in log  # the evaluator's lines are here
    assert "KDTrainer - INFO - Engine run resuming from iteration 0" in log  # the trainer's start line stays
    assert "SupervisedEvaluator - INFO - Engine run resuming" not in log


# ---------------------------------------------------------------- inference geometry


def _infer(data: Path, out: Path, configs=("inference.json",), **kw):
    wf = workflow(SUP, list(configs), "infer", dataset_dir=str(data), ckpt_dir=str(out), output_dir=str(out / "seg"),
                  load_pretrain=False, **kw)
    wf.run()
    wf.finalize()
    return {p.name: np.asarray(nib.load(p).dataobj) for p in (out / "seg").glob("*_seg.nii.gz")}


def test_inference_reorients_and_resamples_to_the_training_geometry(tiny2d, tmp_path):
    """An untrained network (fixed seed) is no flip- or scale-equivariant: without reorientation/resampling the
    flipped and the upsampled images would be segmented differently."""
    test = json.loads((tiny2d / "datalist.json").read_text())["test"][:1]
    src = nib.load(tiny2d / test[0]["image"])
    arr = np.asarray(src.dataobj, dtype=np.float32)

    def with_image(name, array, affine):
        def edit(d):
            d["test"] = [{"image": name}]

        folder = copy_datalist(tiny2d, tmp_path / name.split(".")[0], edit)
        nib.save(nib.Nifti1Image(array, affine), folder / name)
        return folder

    flip = src.affine.copy()
    flip[:, 1] = -flip[:, 1]
    flip[:3, 3] = src.affine[:3, 3] + src.affine[:3, 1] * (arr.shape[1] - 1)
    geom = {"pixdim": [4.0, 4.0], "roi_size": [48, 64]}
    ref = _infer(with_image("orig.nii.gz", arr, src.affine), tmp_path / "o", **geom)["orig_seg.nii.gz"]
    flipped = _infer(with_image("flip.nii.gz", arr[:, ::-1].copy(), flip), tmp_path / "f", **geom)["flip_seg.nii.gz"]
    assert np.array_equal(flipped[:, ::-1], ref)
    # the same anatomy at half the voxel size: resampled to 4 mm, segmented, brought back to the 2 mm grid
    fine = np.kron(arr, np.ones((2, 2), np.float32))
    aff = src.affine.copy()
    aff[:2, :2] /= 2
    aff[:3, 3] -= src.affine[:3, 0] / 4 + src.affine[:3, 1] / 4
    up = _infer(with_image("fine.nii.gz", fine, aff), tmp_path / "u", **geom)["fine_seg.nii.gz"]
    assert up.shape[:2] == fine.shape
    agree = np.mean(up[::2, ::2].reshape(ref.shape) == ref)
    assert agree > 0.9, agree



def test_inference_keeps_the_shape_of_a_one_slice_volume(tmp_path, tiny2d):
    img = nib.load(tiny2d / json.loads((tiny2d / "datalist.json").read_text())["test"][0]["image"])
    vol = np.asarray(img.dataobj, dtype=np.float32)[:32, :48, None]
    folder = tmp_path / "one"
    folder.mkdir()
    nib.save(nib.Nifti1Image(vol, img.affine), folder / "v.nii.gz")
    (folder / "datalist.json").write_text(json.dumps({"test": [{"image": "v.nii.gz"}]}))
    segs = _infer(folder, tmp_path / "o", spatial_dims=3, roi_size=[32, 32, 32], pixdim=[4.0, 4.0, 4.0], axcodes="RAS")
    assert segs["v_seg.nii.gz"].shape == (32, 48, 1)
    flat = _infer(tiny2d, tmp_path / "t", roi_size=[48, 64], pixdim=[4.0, 4.0])  # 2D images stay 2D
    assert {s.shape for s in flat.values()} == {img.shape}
