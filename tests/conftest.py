"""Shared fixtures: tiny demo datasets (2D and 3D) and helpers that run bundle configs in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
SCHEMA = ROOT / "tools" / "schemas" / "meta_schema_20240725.json"
BUNDLE_NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())

# Overrides that shrink any bundle to the tiny datasets below.
TINY_2D = {"roi_size": [48, 64], "epochs": 1, "batch_size": 4, "val_batch_size": 4, "num_workers": 0, "val_interval": 1}
TINY_3D = {"roi_size": [32, 32, 32], "epochs": 1, "batch_size": 1, "val_batch_size": 1, "num_workers": 0, "val_interval": 1}


@pytest.fixture(scope="session")
def tiny2d(tmp_path_factory) -> Path:
    """3 pseudo-subjects at 4 mm, 4 axial slices each (48x64): training 1 subject, validation 1, test 1; plus 1
    unlabelled subject (the datalist's 'unlabeled' list, 4 slices) for the semi-supervised and label-free recipes."""
    from medkd.data.demo import prepare_demo

    out = tmp_path_factory.mktemp("tiny2d")
    prepare_demo(out, subjects=3, seed=1, dims=2, spacing=4.0, slices_per_subject=4, unlabelled=1)
    return out


@pytest.fixture(scope="session")
def tiny3d(tmp_path_factory) -> Path:
    """3 pseudo-subjects as 32^3 volumes at 8 mm."""
    from medkd.data.demo import prepare_demo

    out = tmp_path_factory.mktemp("tiny3d")
    prepare_demo(out, subjects=3, seed=2, dims=3, spacing=8.0)
    return out


def workflow(bundle: str, configs: list[str], workflow_type: str = "train", **overrides):
    """An initialised ``ConfigWorkflow`` of ``bundles/<bundle>/configs/<configs...>`` with ``overrides``."""
    from monai.bundle import ConfigWorkflow

    cdir = BUNDLES / bundle / "configs"
    wf = ConfigWorkflow(
        config_file=[str(cdir / c) for c in configs],
        meta_file=str(cdir / "metadata.json"),
        logging_file=str(cdir / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLES / bundle),
        **overrides,
    )
    wf.initialize()
    return wf


# Stages a bundle runs before train.json (each writes files under ckpt_dir that train.json loads), with the
# overrides that make them a few iterations long.
STAGES = {"train_teacher.json": {}, "pretrain_paraphraser.json": {"paraphraser_epochs": 1}, "train_baseline.json": {},
          "pretrain_psae.json": {"psae_epochs": 1}, "train_msan.json": {"msan_epochs": 1}}


def stages_of(bundle: str) -> list[str]:
    return [name for name in STAGES if (BUNDLES / bundle / "configs" / name).is_file()]


def run_workflow(bundle: str, configs: list[str], workflow_type: str = "train", check: bool = True, **overrides):
    """Run ``configs`` of ``bundle``; a training run of a multi-stage bundle first runs its earlier stages."""
    if workflow_type == "train" and "evaluate.json" not in configs and not set(configs) & set(STAGES):
        for stage in stages_of(bundle):
            run_workflow(bundle, [*configs, stage], check=False, **{**overrides, **STAGES[stage]})
    wf = workflow(bundle, configs, workflow_type, **overrides)
    if check:
        assert wf.check_properties() in ([], None), wf.check_properties()
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="session")
def teacher_2d(tiny2d, tmp_path_factory) -> Path:
    """A teacher trained for one epoch on the tiny 2D data with the supervised bundle; returns its model.pt."""
    out = tmp_path_factory.mktemp("teacher2d")
    run_workflow("supervised_segmentation", ["train.json"], dataset_dir=str(tiny2d), ckpt_dir=str(out),
                 output_dir=str(out / "eval"), **TINY_2D)
    assert (out / "model.pt").is_file()
    return out / "model.pt"


def step_trainer(net, opt):
    """An Ignite engine whose every iteration is one optimiser step of ``net`` on a fixed (1, 3) input."""
    import torch
    from ignite.engine import Engine

    def step(engine, batch):
        opt.zero_grad()
        net(torch.ones(1, 3)).sum().backward()
        opt.step()

    return Engine(step)


def error_chain(exc: BaseException) -> str:
    """Every message of an exception and its causes (MONAI wraps errors raised while instantiating configs)."""
    messages = []
    while exc is not None:
        messages.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(messages)


def copy_datalist(src: Path, dst: Path, edit=None) -> Path:
    """Copy a dataset folder and optionally edit its datalist with ``edit(dict)``; returns the copy."""
    shutil.copytree(src, dst)
    if edit is not None:
        path = dst / "datalist.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return dst
