"""Graph Flow's parts besides the losses: paraphrasers (pretraining and use), the piecewise poly schedule, and
semi-supervised batches (labelled subset, placeholders, half/half pairing, masking of the task loss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.transforms import Compose

from medkd.data import MarkLabelledd, SemiSupervisedDataset, split_labelled
from medkd.distill import Distiller, LiveTeacher, LossTerm, ParaphrasedTeacher
from medkd.engines import ParaphraserSaver, ParaphraserTrainer, PiecewisePolyLR
from medkd.losses import GraphFlowVertices, PredictionMapDistillation
from medkd.networks import Paraphraser


class _Net(nn.Module):
    """A tiny segmentation net with a named 8-channel tap."""

    def __init__(self, seed=0, width=8):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x):
        return self.head(self.enc(x))


def test_paraphraser_layout():
    p = Paraphraser(16, 4)
    x = torch.randn(2, 16, 5, 6)
    assert p.encode(x).shape == (2, 4, 5, 6) and p(x).shape == x.shape
    convs = [m for m in p.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(16, 16), (16, 4), (4, 4), (4, 4), (4, 16), (16, 16)]
    assert all(m.kernel_size == (3, 3) and m.bias is not None for m in convs)
    acts = [m for m in p.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 6 and all(a.negative_slope == 0.1 for a in acts)
    assert Paraphraser(4, 2, spatial_dims=3)(torch.randn(1, 4, 3, 3, 3)).shape == (1, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="in_channels"):
        p.encode(torch.randn(1, 8, 4, 4))


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(2, 1, 8, 8, generator=g)} for _ in range(n)]


def test_paraphraser_pretraining_then_frozen_use(tmp_path):
    teacher = _Net(1)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    live = LiveTeacher(_Net(5), tmp_path / "teacher.pt", {"enc": "enc"})
    paraphrasers = {"enc": Paraphraser(8, 4)}
    optimizer = torch.optim.Adam(paraphrasers["enc"].parameters(), lr=1e-2)
    teacher_before = [p.clone() for p in live.network.parameters()]
    trainer = ParaphraserTrainer(live, paraphrasers, optimizer, device=torch.device("cpu"), max_epochs=40,
                                 train_data_loader=_batches())
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    ParaphraserSaver(paraphrasers, tmp_path / "models").attach(trainer)
    trainer.run()
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])  # epoch means: the reconstruction is learnt
    assert set(trainer.state.output) == {"loss", "loss_enc"}
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, live.network.parameters()))

    with pytest.raises(FileNotFoundError, match="pretrain_paraphraser"):
        ParaphrasedTeacher(_Net(5), tmp_path / "teacher.pt", {"enc": "enc"}, {"enc": Paraphraser(8, 4)}, tmp_path)
    with pytest.raises(RuntimeError, match="does not match"):
        ParaphrasedTeacher(_Net(5), tmp_path / "teacher.pt", {"enc": "enc"}, {"enc": Paraphraser(8, 2)},
                           tmp_path / "models")
    used = ParaphrasedTeacher(_Net(5), tmp_path / "teacher.pt", {"enc": "enc"}, {"enc": Paraphraser(8, 4)},
                              tmp_path / "models")
    used.train()
    assert not used.paraphrasers.training and not any(p.requires_grad for p in used.parameters())
    x = torch.randn(1, 1, 8, 8)
    out = used(x)
    with torch.no_grad():
        expected = paraphrasers["enc"].encode(teacher.enc(x))
    torch.testing.assert_close(out["t.enc"], expected)
    torch.testing.assert_close(out["t.logits"], teacher(x).detach())


def test_piecewise_poly_schedule_hand_values():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=123.0)
    sched = PiecewisePolyLR(opt, bases=[3e-3, 3e-4, 3e-5, 3e-6], boundaries=[50, 100, 150], total_iterations=2000,
                            iterations_per_epoch=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3)  # iteration 0, epoch 1
    for it, expected in ((499, 3e-3 * (1 - 499 / 2000) ** 0.9), (500, 3e-4 * (1 - 500 / 2000) ** 0.9),
                         (1500, 3e-6 * (1 - 1500 / 2000) ** 0.9), (2000, 0.0), (2600, 0.0)):
        assert sched.value_at(it) == pytest.approx(expected, abs=1e-15)
    for _ in range(500):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-4 * 0.75 ** 0.9)
    with pytest.raises(ValueError, match="bases"):
        PiecewisePolyLR(opt, [1e-3], [10], 100, 10)


def test_split_labelled_by_patient():
    items = [{"image": f"p{p}_z{z}.nii.gz", "label": "l", "case": f"p{p}"} for p in range(10) for z in range(3)]
    split = split_labelled(items, 0.2, seed=4, extra_unlabelled=[{"image": "u.nii.gz"}])
    labelled_cases = {i["case"] for i in split["labelled"]}
    assert len(labelled_cases) == 2 and len(split["labelled"]) == 6
    assert not labelled_cases & {i.get("case") for i in split["unlabelled"]}
    assert len(split["unlabelled"]) == 25 and all("label" not in i for i in split["unlabelled"])
    assert {i["case"] for i in split_labelled(items[::-1], 0.2, seed=4)["labelled"]} == labelled_cases  # order-free
    assert {i["case"] for i in split_labelled(items, 0.2, seed=5)["labelled"]} != labelled_cases
    assert split_labelled(items, 1.0)["unlabelled"] == []
    with pytest.raises(ValueError, match="fraction"):
        split_labelled(items, 0.0)


def test_semi_supervised_batches_mix_half_and_half():
    labelled = [{"image": torch.full((1, 4, 4), float(i)), "label": torch.ones(1, 4, 4)} for i in range(2)]
    unlabelled = [{"image": torch.full((1, 4, 4), 10.0 + i)} for i in range(5)]
    mark = Compose([MarkLabelledd()])
    ds = SemiSupervisedDataset(Dataset(labelled, mark), Dataset(unlabelled, mark))
    assert len(ds) == 5
    batches = list(DataLoader(ds, batch_size=2, shuffle=False))
    batch = batches[0]
    assert batch["image"].shape == (4, 1, 4, 4) and batch["labelled"].tolist() == [True, False, True, False]
    assert batch["label"][1].abs().sum() == 0 and batch["label"][0].min() == 1
    seen = sorted(float(b["image"][i, 0, 0, 0]) for b in batches for i in range(len(b["image"])) if not b["labelled"][i])
    assert seen == [10.0, 11.0, 12.0, 13.0, 14.0]  # every unlabelled sample once per epoch


def test_unlabelled_samples_reach_the_student_only_through_label_free_terms(tmp_path):
    torch.save(_Net(1).state_dict(), tmp_path / "teacher.pt")
    terms = [LossTerm("kd", PredictionMapDistillation(1.0), 1.0), LossTerm("vert", GraphFlowVertices(), 1e-3,
                                                                           ["s.enc", "t.enc"])]
    distiller = Distiller(_Net(2), nn.CrossEntropyLoss(), terms, teacher=_Net(3), teacher_ckpt=tmp_path / "teacher.pt",
                          student_taps={"enc": "enc"}, teacher_taps={"enc": "enc"})
    image = torch.randn(4, 1, 8, 8)
    label = torch.randint(0, 3, (4, 8, 8))
    none = torch.zeros(4, dtype=torch.bool)
    out = distiller(image, label, none)
    assert float(out["loss_task"]) == 0.0
    distiller.zero_grad()
    out["loss"].backward()
    got = [p.grad.clone() for p in distiller.student.parameters()]
    # the same gradient from the label-free terms alone
    distiller.zero_grad()
    features = distiller(image)["features"]
    (sum(t.weight * t(features) for t in distiller.terms)).backward()
    for a, p in zip(got, distiller.student.parameters()):
        torch.testing.assert_close(a, p.grad)
    # a mixed batch: the task loss equals cross-entropy over the labelled samples only
    mixed = torch.tensor([True, False, True, False])
    out = distiller(image, label, mixed)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(distiller.student(image[mixed]), label[mixed])
    np.testing.assert_allclose(float(out["loss_task"]), float(expected), rtol=1e-5)
