"""Batch mixing in the KD trainer: mixed before both networks, mixup's task loss, off by default, every KD bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES, TINY_2D, error_chain, run_workflow, workflow
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch.utils.data import DataLoader

from medkd.data import BatchMixing
from medkd.distill import Distiller, LossTerm
from medkd.engines import KDTrainer
from medkd.losses import PredictionMapDistillation

KD_BUNDLES = ["acw_skd_segmentation", "emkd_segmentation", "gkd_segmentation", "graph_flow_segmentation",
              "mtms_ckd_segmentation"]


def unet(channels) -> UNet:
    return UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=channels, strides=(2,) * (len(channels) - 1),
                num_res_units=0)


def samples(n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    return [{"image": torch.randn(1, 16, 16, generator=gen), "label": torch.randint(0, 3, (1, 16, 16), generator=gen).float()}
            for _ in range(n)]


def make_trainer(tmp_path: Path, mixing, terms=True, **kwargs) -> tuple[KDTrainer, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student, teacher = unet((4, 8)), unet((8, 16))
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    recipe = [LossTerm("kd", PredictionMapDistillation(temperature=2.0), 0.5, ["s.logits", "t.logits"])] if terms else []
    distiller = Distiller(student, DiceCELoss(to_onehot_y=True, softmax=True), recipe, teacher=teacher,
                          teacher_ckpt=tmp_path / "teacher.pt")
    loader = DataLoader(samples(), batch_size=4, shuffle=False)
    trainer = KDTrainer(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.1), device=torch.device("cpu"),
                        max_epochs=1, train_data_loader=loader, batch_mixing=mixing, **kwargs)
    return trainer, student, teacher


def scalars(trainer: KDTrainer) -> dict:
    """The step's loss scalars (the trainer's output is decollated per sample after the iteration)."""
    output = trainer.state.output
    return output[0] if isinstance(output, list) else output


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = samples()
    return torch.stack([d["image"] for d in data]), torch.stack([d["label"] for d in data])


@pytest.mark.parametrize("mode", ["cutmix", "mixup"])
def test_teacher_and_student_receive_the_mixed_image(mode, tmp_path):
    trainer, student, teacher = make_trainer(tmp_path, {"mode": mode, "alpha": 1.0, "prob": 1.0, "seed": 7})
    seen = {}
    teacher.register_forward_hook(lambda m, args, out: seen.__setitem__("teacher", args[0].detach().clone()))
    student.register_forward_hook(lambda m, args, out: seen.__setitem__("student", args[0].detach().clone()))
    trainer.distiller.register_forward_hook(lambda m, args, out: seen.__setitem__("label", args[1].detach().clone()))
    trainer.run()
    image, label = batch()
    expected = BatchMixing(mode, alpha=1.0, prob=1.0, seed=7)(image, label)  # the same draws, made independently
    assert expected.mixed and not torch.equal(expected.image, image)
    assert torch.equal(seen["teacher"], expected.image) and torch.equal(seen["student"], expected.image)
    if mode == "cutmix":  # exact label: the box pasted into the label maps too
        assert torch.equal(seen["label"], expected.label) and not torch.equal(expected.label, label)
    else:  # mixup: label-reading terms see the labels of the images weighted lam
        assert torch.equal(seen["label"], label)


def test_mixup_task_loss_is_the_lam_weighted_pair(tmp_path):
    trainer, student, _ = make_trainer(tmp_path, {"mode": "mixup", "alpha": 0.4, "prob": 1.0, "seed": 11})
    preds = []
    student.register_forward_hook(lambda m, args, out: preds.append(out.detach().clone()))
    trainer.run()
    image, label = batch()
    mixed = BatchMixing("mixup", alpha=0.4, prob=1.0, seed=11)(image, label)
    assert 0.0 < mixed.lam < 1.0 and mixed.label_b is not None
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    pred = preds[0]
    expected = mixed.lam * loss(pred, label) + (1 - mixed.lam) * loss(pred, label[mixed.index])
    out = scalars(trainer)
    assert float(out["loss_task"]) == pytest.approx(float(expected), abs=1e-6)
    assert float(out["loss_task"]) != pytest.approx(float(loss(pred, label)), abs=1e-4)  # not the unmixed task loss
    assert float(out["loss"]) == pytest.approx(float(out["loss_task"]) + float(out["loss_kd"]), abs=1e-5)


def test_mixup_gradient_is_that_of_the_mixed_objective(tmp_path):
    """The student's update equals one made by hand from lam·L(a) + (1-lam)·L(b) on the mixed image (no KD terms)."""
    trainer, student, _ = make_trainer(tmp_path, {"mode": "mixup", "alpha": 1.0, "prob": 1.0, "seed": 2}, terms=False)
    reference = unet((4, 8))
    reference.load_state_dict(student.state_dict())
    trainer.run()
    image, label = batch()
    mixed = BatchMixing("mixup", alpha=1.0, prob=1.0, seed=2)(image, label)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    pred = reference(mixed.image)
    objective = mixed.lam * loss(pred, label) + (1 - mixed.lam) * loss(pred, label[mixed.index])
    objective.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(student.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_no_mixing_is_the_default_and_changes_nothing(tmp_path):
    """``batch_mixing=None`` and a trainer built without the argument train to the same weights, bit for bit."""
    a_trainer, a_student, _ = make_trainer(tmp_path, None)
    a_trainer.run()
    torch.manual_seed(0)
    student, teacher = unet((4, 8)), unet((8, 16))
    distiller = Distiller(student, DiceCELoss(to_onehot_y=True, softmax=True),
                          [LossTerm("kd", PredictionMapDistillation(temperature=2.0), 0.5, ["s.logits", "t.logits"])],
                          teacher=teacher, teacher_ckpt=tmp_path / "teacher.pt")
    b_trainer = KDTrainer(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.1), device=torch.device("cpu"),
                          max_epochs=1, train_data_loader=DataLoader(samples(), batch_size=4, shuffle=False))
    b_trainer.run()
    assert b_trainer.batch_mixing is None and a_trainer.batch_mixing is None
    for p, q in zip(a_student.parameters(), student.parameters()):
        assert torch.equal(p, q)


def test_batch_mixing_with_a_teacher_cache_is_refused(tmp_path):
    with pytest.raises(ValueError, match="batch_mixing.*teacher_cache"):
        make_trainer(tmp_path, {"mode": "cutmix"}, teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(TypeError, match="batch_mixing"):
        make_trainer(tmp_path, "cutmix")


def _without_mixing_keys(tmp_path: Path) -> Path:
    """The EMKD train.json as it was before the switch existed: no batch_mixing / batch_mixer key anywhere."""
    config = json.loads((BUNDLES / "emkd_segmentation" / "configs" / "train.json").read_text())
    del config["batch_mixing"], config["batch_mixer"]
    del config["train"]["trainer"]["batch_mixing"]
    for handler in config["train"]["handlers"]:
        handler.get("objects", {}).pop("batch_mixing", None)
    path = tmp_path / "train_without_mixing.json"
    path.write_text(json.dumps(config))
    return path


def test_bundle_default_is_bit_identical_to_a_config_without_the_key(tiny2d, teacher_2d, tmp_path):
    weights = []
    for name, config in (("with", "train.json"), ("without", str(_without_mixing_keys(tmp_path)))):
        out = tmp_path / name
        wf = run_workflow("emkd_segmentation", [config], dataset_dir=str(tiny2d), ckpt_dir=str(out),
                          output_dir=str(out / "eval"), teacher_ckpt=str(teacher_2d), check=False, **TINY_2D)
        weights.append({k: v.clone() for k, v in wf.parser.get_parsed_content("network").state_dict().items()})
        state = torch.load(out / "train_state.pt", weights_only=True)
        assert "batch_mixing" not in state
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("bundle", KD_BUNDLES)
def test_every_kd_bundle_trains_with_batch_mixing(bundle, tiny2d, teacher_2d, tmp_path):
    """The switch turns mixing on in every KD bundle: a few iterations run and the mixing's generator state is part of
    the resumable training state (saved after the last step)."""
    out = tmp_path / "run"
    overrides = dict(dataset_dir=str(tiny2d), ckpt_dir=str(out), output_dir=str(out / "eval"),
                     batch_mixing={"mode": "cutmix", "alpha": 1.0, "prob": 1.0}, **TINY_2D)
    config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    if "teacher_def" in config and bundle != "mtms_ckd_segmentation":  # MTMS-CKD trains its own teacher stage
        overrides["teacher_ckpt"] = str(teacher_2d)
    wf = run_workflow(bundle, ["train.json"], check=False, **overrides)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.batch_mixing, BatchMixing) and trainer.batch_mixing.mode == "cutmix"
    assert trainer.state.iteration >= 1
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["batch_mixing"]["mode"] == "cutmix"
    assert torch.equal(state["batch_mixing"]["generator"], trainer.batch_mixing.generator.get_state())
    wf.finalize()


def test_resume_with_other_mixing_settings_is_refused(tiny2d, teacher_2d, tmp_path):
    out = tmp_path / "run"
    common = dict(dataset_dir=str(tiny2d), ckpt_dir=str(out), output_dir=str(out / "eval"), teacher_ckpt=str(teacher_2d),
                  **TINY_2D)
    run_workflow("emkd_segmentation", ["train.json"], check=False, batch_mixing={"mode": "cutmix"}, **common)
    wf = workflow("emkd_segmentation", ["train.json"], batch_mixing={"mode": "mixup"}, **{**common, "epochs": 1})
    with pytest.raises(Exception) as info:
        wf.run()
    assert "batch_mixing" in error_chain(info.value) and "mode" in error_chain(info.value)
