"""Every bundle: model-zoo checks, a few real iterations of each config, resume, bad input, 3D recipe."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (BUNDLE_NAMES, BUNDLES, ROOT, SCHEMA, STAGES, TINY_2D, TINY_3D, copy_datalist, error_chain, run_workflow,
                      stages_of, workflow)
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out


def cfg(bundle: str, name: str) -> str:
    return str(BUNDLES / bundle / "configs" / name)


def has_teacher(bundle: str) -> bool:
    return "teacher_def" in json.loads(Path(cfg(bundle, "train.json")).read_text())


def kd_overrides(bundle: str, teacher: Path | None) -> dict:
    """The supervised teacher for KD bundles; bundles that train their own teacher (a stage) need none."""
    own_stage = (BUNDLES / bundle / "configs" / "train_teacher.json").is_file()
    return {"teacher_ckpt": str(teacher)} if has_teacher(bundle) and not own_stage else {}


@pytest.fixture(scope="module")
def trained(tiny2d, teacher_2d, tmp_path_factory) -> dict[str, Path]:
    """Each bundle trained for one epoch on the tiny 2D data; returns bundle -> checkpoint folder."""
    out = {}
    for bundle in BUNDLE_NAMES:
        ckpt = tmp_path_factory.mktemp(bundle)
        run_workflow(bundle, ["train.json"], dataset_dir=str(tiny2d), ckpt_dir=str(ckpt), output_dir=str(ckpt / "eval"),
                     **TINY_2D, **kd_overrides(bundle, teacher_2d))
        out[bundle] = ckpt
    return out


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_bundle_files_and_metadata(bundle, tmp_path):
    root = BUNDLES / bundle
    for name in ("LICENSE", "large_files.yml", "docs/README.md", "configs/metadata.json", "configs/train.json",
                 "configs/evaluate.json", "configs/inference.json", "configs/multi_gpu_train.json", "configs/logging.conf"):
        assert (root / name).is_file(), f"{bundle} lacks {name}"
    verify_metadata(meta_file=cfg(bundle, "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["required_packages_version"] == meta["optional_packages_version"]
    broken = dict(meta)
    del broken["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(Exception, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_verify_net_in_out_and_torchscript_export(bundle, trained, tmp_path):
    verify_net_in_out(net_id="network_def", meta_file=cfg(bundle, "metadata.json"), config_file=cfg(bundle, "inference.json"))
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(trained[bundle] / "model.pt"),
                meta_file=cfg(bundle, "metadata.json"), config_file=cfg(bundle, "inference.json"))
    scripted = torch.jit.load(str(ts))
    wf = workflow(bundle, ["inference.json"], workflow_type="infer")
    net = wf.parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(trained[bundle] / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 32, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_train_saves_student_only_and_state(bundle, trained):
    state = torch.load(trained[bundle] / "model.pt", weights_only=True)
    wf = workflow(bundle, ["train.json"], dataset_dir="unused")
    student = wf.parser.get_parsed_content("network_def")
    assert set(state) == set(student.state_dict())  # the bare student: no teacher, no adapters
    train_state = torch.load(trained[bundle] / "train_state.pt", weights_only=True)
    assert train_state["trainer"]["iteration"] == train_state["trainer"]["epoch_length"]  # one epoch
    assert {"network", "optimizer", "lr_scheduler", "kd_terms", "best_model_saver"} <= set(train_state)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_every_loss_term_reaches_tensorboard(bundle, trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (trained[bundle] / "eval").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    wf = workflow(bundle, ["train.json"], dataset_dir="unused")
    terms = [t.name for t in wf.parser.get_parsed_content("kd_terms") if t is not None] if "kd_terms" in wf.parser.config else []
    expected = {"loss", "loss_task"} | {f"loss_{n}" for n in terms} | {f"raw_{n}" for n in terms}
    assert expected <= tags, expected - tags
    assert "val_mean_dice" in tags


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_evaluate_and_inference(bundle, trained, tiny2d, tmp_path, teacher_2d):
    eval_dir = tmp_path / "eval"
    run_workflow(bundle, ["train.json", "evaluate.json"], dataset_dir=str(tiny2d), ckpt_dir=str(trained[bundle]),
                 output_dir=str(eval_dir), save_predictions=True, **TINY_2D, **kd_overrides(bundle, teacher_2d))
    rows = (eval_dir / "val_mean_dice_raw.csv").read_text().splitlines()
    test_items = json.loads((tiny2d / "datalist.json").read_text())["test"]
    assert len(rows) == 1 + len(test_items)
    dice = [float(v) for row in rows[1:] for v in row.split(",")[1:]]
    assert all(0.0 <= v <= 1.0 for v in dice if not np.isnan(v))
    assert len(list((eval_dir / "predictions").glob("*_seg.nii.gz"))) == len(test_items)

    infer_dir = tmp_path / "infer"
    run_workflow(bundle, ["inference.json"], workflow_type="infer", dataset_dir=str(tiny2d), ckpt_dir=str(trained[bundle]),
                 output_dir=str(infer_dir), roi_size=TINY_2D["roi_size"])
    for item in test_items:
        stem = Path(item["image"]).name.replace(".nii.gz", "")
        seg = nib.load(infer_dir / f"{stem}_seg.nii.gz")
        image = nib.load(tiny2d / item["image"])
        assert seg.shape[:2] == image.shape
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2}
        assert np.allclose(seg.affine, image.affine)


def test_kd_bundle_refuses_missing_or_mismatching_teacher(tiny2d, tmp_path):
    out = tmp_path / "run"
    common = dict(dataset_dir=str(tiny2d), ckpt_dir=str(out), output_dir=str(out / "eval"), **TINY_2D)
    with pytest.raises(Exception) as err:
        run_workflow("emkd_segmentation", ["train.json"], teacher_ckpt=str(tmp_path / "missing.pt"), **common)
    assert f"teacher checkpoint not found: {tmp_path / 'missing.pt'}" in error_chain(err.value)
    wf = workflow("emkd_segmentation", ["train.json"], dataset_dir=str(tiny2d))
    torch.save(wf.parser.get_parsed_content("network_def").state_dict(), tmp_path / "student_as_teacher.pt")
    with pytest.raises(Exception) as err:
        run_workflow("emkd_segmentation", ["train.json"], teacher_ckpt=str(tmp_path / "student_as_teacher.pt"), **common)
    assert "student_as_teacher.pt does not match teacher_def UNet" in error_chain(err.value)
    assert not (out / "train_state.pt").exists() and not (out / "model.pt").exists()


def test_baseline_and_kd_bundles_share_the_schedule():
    """The no-KD baseline is only fair if data, schedule, optimiser and evaluation are the same in both bundles."""
    sup = json.loads(Path(cfg("supervised_segmentation", "train.json")).read_text())
    kd = json.loads(Path(cfg("emkd_segmentation", "train.json")).read_text())
    different = {"network_def", "distiller"}
    kd_only = {"teacher_def", "teacher_ckpt", "teacher_taps", "student_taps", "kd_terms", "temperature", "imd_p",
               "pmd_weight", "imd_weight", "rad_weight", "teacher_bundle"}
    assert set(kd) - set(sup) == kd_only and set(sup) <= set(kd)
    for key in set(sup) - different:
        assert sup[key] == kd[key], f"'{key}' differs between the supervised and the EMKD bundle"
    assert kd["network_def"] == json.loads(Path(cfg("emkd_segmentation", "inference.json")).read_text())["network_def"]
    assert sup["network_def"] == kd["teacher_def"]
    # the other configs are copies (each bundle is self-contained for the model zoo): they must not drift apart
    for name in ("evaluate.json", "multi_gpu_train.json", "logging.conf"):
        assert Path(cfg("supervised_segmentation", name)).read_text() == Path(cfg("emkd_segmentation", name)).read_text(), name
    sup_inf = json.loads(Path(cfg("supervised_segmentation", "inference.json")).read_text())
    kd_inf = json.loads(Path(cfg("emkd_segmentation", "inference.json")).read_text())
    assert {k: v for k, v in sup_inf.items() if k != "network_def"} == {k: v for k, v in kd_inf.items() if k != "network_def"}


def test_bundle_json_is_zoo_formatted():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "format_json.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"image file not found: .*sub-\d+_z\d+\.nii\.gz"),
        ("shape", r"has shape \(48, 64\) but label .*labelsTr/.*has shape \(48, 32\)"),
        ("label_value", r"label .*labelsTr/.*has values \[5\] outside the classes 0..2"),
    ],
)
def test_bad_input_is_a_clear_error_and_overwrites_nothing(case, match, tiny2d, trained, tmp_path):
    data = copy_datalist(tiny2d, tmp_path / "data")
    entry = json.loads((data / "datalist.json").read_text())["validation"][0]
    if case == "missing":
        (data / entry["image"]).unlink()
    else:
        lab = nib.load(data / entry["label"])
        arr = np.asarray(lab.dataobj).copy()
        if case == "shape":
            arr = arr[:, :32]
        else:
            arr[3, 3] = 5
        nib.save(nib.Nifti1Image(arr, lab.affine), data / entry["label"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("model.pt", "train_state.pt"):
        (ckpt / name).write_bytes((trained["supervised_segmentation"] / name).read_bytes())
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ckpt.iterdir()}
    with pytest.raises(Exception) as err:
        run_workflow("supervised_segmentation", ["train.json"], dataset_dir=str(data), ckpt_dir=str(ckpt),
                     output_dir=str(ckpt / "eval"), **{**TINY_2D, "epochs": 3}, check=False)
    assert re.search(match, error_chain(err.value)), error_chain(err.value)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ckpt.iterdir()}
    assert after == before


def test_resume_after_a_kill_continues_with_the_same_command(tiny2d, tmp_path):
    """Kill a CLI run once its first epoch is saved; the same command resumes epoch counter and optimiser state."""
    out = tmp_path / "run"
    epochs = 6
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg("supervised_segmentation", "train.json"),
           "--bundle_root", str(BUNDLES / "supervised_segmentation"), "--dataset_dir", str(tiny2d), "--ckpt_dir", str(out),
           "--output_dir", str(out / "eval"), "--roi_size", "[48,64]", "--epochs", str(epochs), "--batch_size", "2",
           "--val_interval", "1", "--learning_rate", "0.001"]
    state = out / "train_state.pt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = torch.load(state, weights_only=True)
    stopped_at = first["trainer"]["iteration"] // first["trainer"]["epoch_length"]
    assert 1 <= stopped_at < epochs, "the run must be killed part-way"
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Resumed training from {state} at epoch {stopped_at} of {epochs}" in done.stdout + done.stderr
    final = torch.load(state, weights_only=True)
    iters_per_epoch = final["trainer"]["epoch_length"]
    assert final["trainer"]["iteration"] == epochs * iters_per_epoch
    adam_steps = {float(s["step"]) for s in final["optimizer"]["state"].values()}
    assert adam_steps == {float(epochs * iters_per_epoch)}, "optimiser state must continue, not restart"
    assert final["lr_scheduler"]["last_epoch"] == epochs


@pytest.mark.parametrize("bundle", [b for b in BUNDLE_NAMES if (BUNDLES / b / "configs" / "recipes" / "demo_3d.json").is_file()])
def test_3d_recipe_trains(bundle, tiny3d, tmp_path):
    recipe = ["train.json", "recipes/demo_3d.json"]
    teacher_dir = tmp_path / "teacher3d"
    extra = {}
    if has_teacher(bundle):
        run_workflow("supervised_segmentation", recipe, dataset_dir=str(tiny3d), ckpt_dir=str(teacher_dir),
                     output_dir=str(teacher_dir / "eval"), **TINY_3D)
        extra = {"teacher_ckpt": str(teacher_dir / "model.pt")}
    out = tmp_path / "run"
    wf = run_workflow(bundle, recipe, dataset_dir=str(tiny3d), ckpt_dir=str(out), output_dir=str(out / "eval"), **TINY_3D, **extra)
    assert wf.parser.get_parsed_content("spatial_dims") == 3
    state = torch.load(out / "model.pt", weights_only=True)
    assert any(v.ndim == 5 for v in state.values())  # 3D convolution kernels


# Loaded at interpreter start-up in every torchrun worker (PYTHONPATH): records, per rank, every file the process
# opens for writing, renames or removes under WATCH (Python audit events), and writes the list at exit.
WRITE_AUDIT = """
import atexit, json, os, sys
_watch, _log, _rank = os.environ.get("MEDKD_AUDIT_WATCH"), os.environ.get("MEDKD_AUDIT_LOG"), os.environ.get("RANK")
if _watch and _log and _rank is not None:
    _seen = []
    _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (not mode and isinstance(flags, int) and flags & _writing):
                _seen.append(str(path))
        elif event == "os.rename":  # also raised by os.replace: (src, dst, ...)
            _seen.extend([str(args[0]), str(args[1])])
        elif event == "os.remove":  # also raised by os.unlink
            _seen.append(str(args[0]))
    sys.addaudithook(_hook)
    def _dump():
        with open(os.path.join(_log, f"rank{_rank}.json"), "w") as f:
            json.dump(sorted({p for p in _seen if os.path.abspath(p).startswith(_watch)}), f)
    atexit.register(_dump)
"""


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_multi_gpu_config_under_torchrun_on_cpu(bundle, tiny2d, teacher_2d, tmp_path):
    """multi_gpu_train.json with 2 processes (gloo on CPU): the data split over the ranks, rank 0 alone writes files."""
    out = tmp_path / "ddp"
    # batch 1 gives several steps per epoch on the tiny data; contrastive terms need 2 samples (in-batch negatives)
    batch, epochs, world = (2 if bundle == "mtms_ckd_segmentation" else 1), 2, 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={world}", "-m",
           "monai.bundle", "run", "--config_file", str([cfg(bundle, "train.json"), cfg(bundle, "multi_gpu_train.json")]),
           "--bundle_root", str(BUNDLES / bundle), "--dataset_dir", str(tiny2d), "--ckpt_dir", str(out),
           "--output_dir", str(out / "eval"), "--roi_size", "[48,64]", "--epochs", str(epochs), "--batch_size", str(batch),
           "--val_interval", "1"]
    for key, value in kd_overrides(bundle, teacher_2d).items():
        cmd += [f"--{key}", value]
    for stage in stages_of(bundle):  # earlier stages (paraphrasers, teacher, ...) write their files into the same ckpt_dir
        run_workflow(bundle, ["train.json", stage], check=False, dataset_dir=str(tiny2d), ckpt_dir=str(out),
                     output_dir=str(out / "eval"), teacher_ckpt=str(teacher_2d), **TINY_2D, **STAGES[stage])
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(WRITE_AUDIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(audit), os.environ.get("PYTHONPATH")])),
           "MEDKD_AUDIT_WATCH": str(out.resolve()), "MEDKD_AUDIT_LOG": str(audit)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    wf = workflow(bundle, ["inference.json"], workflow_type="infer")
    student = wf.parser.get_parsed_content("network_def")
    student.load_state_dict(torch.load(out / "model.pt", weights_only=True))  # strict: the bare student, no "module."
    # optimiser steps per epoch: the DistributedSampler (even_divisible) gives each rank ceil(n / world) items
    parser = ConfigParser()
    parser.read_config(cfg(bundle, "train.json"))
    parser.update({"dataset_dir": str(tiny2d), "bundle_root": str(BUNDLES / bundle)})
    n_train = len(parser.get_parsed_content("train#dataset#data"))
    expected_steps = math.ceil(math.ceil(n_train / world) / batch)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["trainer"]["epoch_length"] == expected_steps, (n_train, state["trainer"])
    assert state["trainer"]["iteration"] == epochs * expected_steps
    # only rank 0 wrote under the output folders (model, training state, TensorBoard, logs)
    written = {r: json.loads((audit / f"rank{r}.json").read_text()) for r in range(world)}
    assert any(p.endswith("model.pt") for p in written[0]) and any(p.endswith("train_state.pt") for p in written[0])
    assert written[1] == [], written[1]


RECIPES = sorted(
    (b, p.name) for b in BUNDLE_NAMES for p in (BUNDLES / b / "configs" / "recipes").glob("*.json") if p.name != "demo_3d.json"
)


@pytest.mark.parametrize("bundle, recipe", RECIPES)
def test_every_2d_recipe_trains_an_epoch(bundle, recipe, tiny2d, teacher_2d, tmp_path):
    out = tmp_path / "run"
    recipe_keys = json.loads((BUNDLES / bundle / "configs" / "recipes" / recipe).read_text())
    overrides = {**TINY_2D, **kd_overrides(bundle, teacher_2d)}
    if "roi_size" in recipe_keys:  # recipes of stride-32 networks: the smallest size they take
        overrides["roi_size"] = [64, 64]
    if "dataset_dir" in recipe_keys:  # a recipe for a real dataset: its wiring, on the tiny data and its teacher
        overrides.update(in_channels=1, num_classes=3)
    if "labelled_group_key" in recipe_keys:  # the tiny data has one training subject: split its slices instead
        overrides["labelled_group_key"] = "image"
    if "teacher_def" in recipe_keys:  # another teacher architecture: an untrained one checks the wiring
        parser = ConfigParser()
        parser.read_config([cfg(bundle, "train.json"), str(BUNDLES / bundle / "configs" / "recipes" / recipe)])
        torch.save(parser.get_parsed_content("teacher_def").state_dict(), tmp_path / "teacher.pt")
        overrides["teacher_ckpt"] = str(tmp_path / "teacher.pt")
        overrides["batch_size"] = 2  # a few iterations (the paper networks' batch norms need 2 samples)
    wf = run_workflow(bundle, ["train.json", f"recipes/{recipe}"], dataset_dir=str(tiny2d), ckpt_dir=str(out),
                      output_dir=str(out / "eval"), **overrides)
    assert (out / "model.pt").is_file()
    saved = set(torch.load(out / "model.pt", weights_only=True))
    assert saved == set(wf.parser.get_parsed_content("network_def").state_dict())  # no adapter, head or teacher
    for key, value in recipe_keys.items():
        if key.startswith("_") or key in overrides or key == "dataset_dir":
            continue
        same = json.dumps(wf.parser[key]) == json.dumps(value).replace("#", "::")  # MONAI writes ids with '::'
        assert same or wf.parser[key] == value, f"{recipe}: '{key}' did not reach the config"
    expected_terms = RECIPE_TERMS.get((bundle, recipe))
    if expected_terms is not None:
        assert [t.name for t in wf.parser.get_parsed_content("distiller").terms] == expected_terms


# recipes that select terms: the terms the Distiller must end up with
RECIPE_TERMS = {
    ("emkd_segmentation", "pmd_only.json"): ["pmd"],
    ("gkd_segmentation", "intra_only.json"): ["intra"],
    ("gkd_segmentation", "inter_only.json"): ["inter"],
    ("gkd_segmentation", "cross_only.json"): ["cross_teacher", "cross_student"],
    ("gkd_segmentation", "intra_inter.json"): ["intra", "inter"],
    ("gkd_segmentation", "vanilla_kd.json"): ["kd"],
    ("gkd_segmentation", "gkd_plus_kd.json"): ["intra", "inter", "cross_teacher", "cross_student", "kd"],
    **{(f"{b}_segmentation", recipe): terms for b in ("emkd", "graph_flow", "gkd", "acw_skd", "mtms_ckd")
       for recipe, terms in (("kd_dist.json", ["dist"]), ("kd_soft_dice.json", ["soft_dice"]), ("kd_logits_t1.json", ["kd"]))},
}


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_multi_gpu_overrides_disable_only_the_logging_handlers(bundle):
    """multi_gpu_train.json switches logging handlers off on ranks > 0 by list index: the indices must stay right."""
    train = json.loads(Path(cfg(bundle, "train.json")).read_text())
    multi = json.loads(Path(cfg(bundle, "multi_gpu_train.json")).read_text())
    disabled = [k for k in multi if k.endswith("#_disabled_")]
    assert disabled
    for key in disabled:
        section, _, index, _ = key.split("#")
        handler = train[section]["handlers"][int(index)]
        assert handler["_target_"] in ("StatsHandler", "TensorBoardStatsHandler"), (key, handler)
    assert train["train"]["handlers"][-2]["_target_"] == "StatsHandler"  # zoo / MONAI Label convention: last two
    assert train["train"]["handlers"][-1]["_target_"] == "TensorBoardStatsHandler"


def test_graph_flow_refuses_to_distil_without_paraphrasers(tiny2d, teacher_2d, tmp_path):
    """train.json alone (the paraphraser stage never ran) stops with a message naming the missing stage."""
    wf = workflow("graph_flow_segmentation", ["train.json"], dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path / "run"),
                  output_dir=str(tmp_path / "run" / "eval"), teacher_ckpt=str(teacher_2d), **TINY_2D)
    with pytest.raises(Exception) as err:
        wf.run()
    assert "pretrain_paraphraser.json" in error_chain(err.value) and "paraphraser_enc.pt" in error_chain(err.value)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_acw_skd_exports_the_plain_student(trained, tiny2d):
    """The auxiliary head, FRMs and temperature live in the training state only: model.pt is the student that the
    supervised bundle trains without self-distillation (same keys, parameter count and output shape)."""
    acw = workflow("acw_skd_segmentation", ["train.json"], dataset_dir="unused")
    plain = workflow("supervised_segmentation", ["train.json"], dataset_dir="unused",
                     network_def=json.loads(Path(cfg("acw_skd_segmentation", "inference.json")).read_text())["network_def"])
    student, baseline = acw.parser.get_parsed_content("network_def"), plain.parser.get_parsed_content("network_def")
    state = torch.load(trained["acw_skd_segmentation"] / "model.pt", weights_only=True)
    baseline.load_state_dict(state, strict=True)
    student.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in baseline.parameters())
    x = torch.randn(2, 1, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(x), baseline.eval()(x))
    train_state = torch.load(trained["acw_skd_segmentation"] / "train_state.pt", weights_only=True)
    heads = train_state["heads"]
    assert any(k.startswith("aux.") for k in heads) and any(k.startswith("frm_pen.") for k in heads)
    assert not any(k.startswith(("aux.", "frm_")) for k in state)
    assert any("theta" in k for k in train_state["kd_terms"])  # the learnable temperature is trained and saved


def test_mtms_stages_teacher_recon_and_projections(trained):
    """Stage 1 wrote a multi-task teacher (with its reconstruction decoder) that stage 2 loaded; the learned
    projections are in the training state, never in model.pt; inference runs the student alone."""
    ckpt = trained["mtms_ckd_segmentation"]
    wf = workflow("mtms_ckd_segmentation", ["train.json"], dataset_dir="unused")
    teacher = wf.parser.get_parsed_content("teacher_def")
    teacher_state = torch.load(ckpt / "teacher.pt", weights_only=True)
    teacher.load_state_dict(teacher_state, strict=True)
    assert any(k.startswith("decoders.1.") for k in teacher_state)  # the reconstruction decoder was trained
    x = torch.randn(2, 1, 48, 64)
    seg, recon = teacher.eval().forward_tasks(x)
    assert recon.shape == x.shape and seg.shape == (2, 3, 48, 64)
    state = torch.load(ckpt / "model.pt", weights_only=True)
    student = wf.parser.get_parsed_content("network_def")
    student.load_state_dict(state, strict=True)
    assert not any("projection" in k or k.startswith("decoders.1.") for k in state)
    terms = torch.load(ckpt / "train_state.pt", weights_only=True)["kd_terms"]
    projections = [k for k in terms if "projection" in k]
    assert projections and all(terms[k].abs().sum() > 0 for k in projections)
    infer = workflow("mtms_ckd_segmentation", ["inference.json"], workflow_type="infer")
    net = infer.parser.get_parsed_content("network_def")
    assert type(net).__name__ == "SmallUNet" and len(net.decoders) == 1  # no reconstruction decoder at inference


@pytest.mark.parametrize("bundle", [b for b in BUNDLE_NAMES if b != "supervised_segmentation"])
def test_every_kd_bundle_shares_the_baseline_schedule(bundle):
    """The no-KD baseline of every bundle is the supervised bundle (or, for MTMS-CKD, the bundle's own no_kd recipe)
    with the same schedule: optimiser, learning rate, epochs, batch size, augmentation, validation and seed."""
    sup = json.loads(Path(cfg("supervised_segmentation", "train.json")).read_text())
    kd = json.loads(Path(cfg(bundle, "train.json")).read_text())
    for key in ("epochs", "learning_rate", "batch_size", "val_interval", "roi_size", "seed", "lr_scheduler", "loss"):
        assert kd[key] == sup[key], f"'{key}' differs between the supervised bundle and {bundle}"
    assert kd["optimizer"]["_target_"] == sup["optimizer"]["_target_"]
    for key in ("deterministic_transforms", "random_transforms", "postprocessing"):
        assert kd["train"][key] == sup["train"][key], f"train#{key} differs in {bundle}"
    assert kd["validate"]["inferer"] == sup["validate"]["inferer"]
