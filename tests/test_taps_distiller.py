"""Tap resolution and hooks, the Distiller's guarantees, and the KD trainer loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.networks.nets import BasicUNet, SegResNet, SwinUNETR, UNet

from medkd.distill import Distiller, FeatureTaps, LiveTeacher, LossTerm
from medkd.engines import AdversaryStep, KDTrainer
from medkd.losses import ImportanceMapsDistillation, PredictionMapDistillation, RegionAffinityDistillation
from medkd.networks import resolve_tap, tap_points_of


class CE(nn.Module):
    """Cross-entropy on MONAI-style (B, 1, *spatial) integer labels."""

    def forward(self, logits, label):
        return nn.functional.cross_entropy(logits, label[:, 0].long())


def small_unet(dims=2, channels=(4, 8, 16, 32), norm="instance"):
    return UNet(dims, 1, 3, channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=0, norm=norm)


def tap_shapes(net, taps, x):
    hooks = FeatureTaps(net, taps)
    with hooks.capture() as feats:
        net(x)
    return {k: tuple(v.shape) for k, v in feats.items()}


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_unet_aliases_are_at_their_strides(dims):
    net = small_unet(dims, channels=(4, 8, 16, 32, 64))
    x = torch.randn(1, 1, *([32] * dims))
    shapes = tap_shapes(net, {"low": "low", "high": "high", "enc2": "enc2", "bottleneck": "bottleneck"}, x)
    assert shapes["low"] == (1, 4, *([16] * dims))
    assert shapes["enc2"] == (1, 8, *([8] * dims))
    assert shapes["high"] == (1, 16, *([4] * dims))
    assert shapes["bottleneck"] == (1, 64, *([2] * dims))


def test_basic_unet_aliases():
    net = BasicUNet(2, 1, 3, features=(4, 4, 8, 16, 32, 4))
    shapes = tap_shapes(net, {"low": "low", "high": "high"}, torch.randn(1, 1, 32, 32))
    assert shapes == {"low": (1, 4, 16, 16), "high": (1, 16, 4, 4)}


MONAI_NETS = {
    "UNet": lambda d: small_unet(d, channels=(4, 8, 16, 32, 64)),
    "UNet-res": lambda d: UNet(d, 1, 3, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=2),
    "BasicUNet": lambda d: BasicUNet(d, 1, 3, features=(4, 4, 8, 16, 32, 4)),
    "SegResNet": lambda d: SegResNet(d, init_filters=8, in_channels=1, out_channels=3),
    "SwinUNETR": lambda d: SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=d),
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", sorted(MONAI_NETS))
def test_every_monai_alias_sits_at_its_stride(name, dims):
    """enc<k>/dec<k> at stride 2**k, low at 2, high at 8, bottleneck the coarsest encoder feature: checked on shapes."""
    net = MONAI_NETS[name](dims).eval()
    aliases = tap_points_of(net)
    assert {"low", "high", "bottleneck", "enc2", "dec2"} <= set(aliases), sorted(aliases)
    size = 64
    with torch.no_grad():
        shapes = tap_shapes(net, {a: a for a in aliases}, torch.randn(1, 1, *([size] * dims)))
    expected_stride = {"low": 2, "high": 8}
    expected_stride.update({a: 2 ** int(a[3:]) for a in aliases if a[:3] in ("enc", "dec")})
    for alias, stride in expected_stride.items():
        assert shapes[alias][2:] == (size // stride,) * dims, (alias, shapes[alias])
    coarsest = min(shapes[a][2] for a in aliases if a.startswith("enc"))
    assert shapes["bottleneck"][2] == coarsest


def test_raw_dotted_path_and_own_tap_points():
    class Net(nn.Module):
        tap_points = {"mid": "body.1"}

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(5, 3, 1))

        def forward(self, x):
            return self.body(x)

    net = Net()
    assert tap_points_of(net) == {"mid": "body.1"}
    shapes = tap_shapes(net, {"a": "mid", "b": "body.2"}, torch.randn(1, 1, 4, 4))
    assert shapes == {"a": (1, 5, 4, 4), "b": (1, 3, 4, 4)}


def test_unknown_tap_lists_available_names():
    net = small_unet()
    with pytest.raises(KeyError) as err:
        resolve_tap(net, "nonexistent.layer", role="student")
    msg = str(err.value)
    assert "student UNet has no tap 'nonexistent.layer'" in msg
    for name in ("low", "high", "model.0", "model.1.submodule.0"):
        assert repr(name) in msg


def test_hooks_store_nothing_outside_a_capture():
    net = small_unet()
    hooks = FeatureTaps(net, {"low": "low"})
    net(torch.randn(1, 1, 16, 16))
    assert hooks.features == {}
    with hooks.capture() as feats:
        net(torch.randn(1, 1, 16, 16))
    assert set(feats) == {"low"}  # the caller keeps what it captured ...
    assert hooks.features == {}  # ... the taps hold nothing between steps
    net(torch.randn(1, 1, 16, 16))
    assert hooks.features == {} and set(feats) == {"low"}


def save_teacher(tmp_path, net) -> str:
    path = tmp_path / "teacher.pt"
    torch.save(net.state_dict(), path)
    return str(path)


def emkd_terms(num_classes=3):
    return [
        LossTerm("pmd", PredictionMapDistillation(4.0), 0.1, ["s.logits", "t.logits"]),
        LossTerm("imd_low", ImportanceMapsDistillation(4), 0.9, ["s.low", "t.low"]),
        LossTerm("rad_high", RegionAffinityDistillation(num_classes), 0.9, ["student:high", "teacher:high", "label"]),
    ]


def test_missing_or_mismatching_teacher_checkpoint_is_an_error(tmp_path):
    task = CE()
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found: .*nope.pt"):
        Distiller(small_unet(), task, emkd_terms(), small_unet(channels=(8, 16, 32, 64)), tmp_path / "nope.pt")
    wrong = save_teacher(tmp_path, small_unet(channels=(4, 8, 16, 32)))
    with pytest.raises(RuntimeError, match="does not match teacher_def UNet"):
        Distiller(small_unet(), task, emkd_terms(), small_unet(channels=(8, 16, 32, 64)), wrong)
    with pytest.raises(ValueError, match="teacher_ckpt is required"):
        Distiller(small_unet(), task, emkd_terms(), small_unet(), None)
    with pytest.raises(ValueError, match="no teacher was given"):
        Distiller(small_unet(), task, emkd_terms())


def test_unknown_student_tap_fails_at_construction(tmp_path):
    teacher = small_unet(channels=(8, 16, 32, 64))
    terms = [LossTerm("imd", ImportanceMapsDistillation(), 1.0, ["s.no_such_tap", "t.low"])]
    with pytest.raises(KeyError, match="student UNet has no tap 'no_such_tap'"):
        Distiller(small_unet(), CE(), terms, teacher, save_teacher(tmp_path, teacher))


def test_trainable_parameters_are_student_and_adapters_only(tmp_path):
    class WithAdapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapter = nn.Conv2d(4, 8, 1)

        def forward(self, s, t):
            return (self.adapter(s) - t).pow(2).mean()

    student, teacher = small_unet(), small_unet(channels=(8, 16, 32, 64))
    terms = [LossTerm("fit", WithAdapter(), 1.0, ["s.low", "t.low"])]
    d = Distiller(student, CE(), terms, teacher, save_teacher(tmp_path, teacher))
    ids = {id(p) for p in d.trainable_parameters()}
    assert ids == {id(p) for p in student.parameters()} | {id(p) for p in terms[0].parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    d.train()
    assert student.training and not teacher.training


def make_batches(n, dims=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(2, 1, *([size] * dims), generator=g), "label": torch.randint(0, 3, (2, 1, *([size] * dims)), generator=g)}
        for _ in range(n)
    ]


def kd_trainer(distiller, batches, **kwargs):
    opt = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    return KDTrainer(distiller, opt, device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, **kwargs)


@pytest.mark.parametrize("dims", [2, 3])
def test_teacher_stays_frozen_through_kd_iterations(tmp_path, dims):
    torch.manual_seed(0)
    teacher = UNet(dims, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, norm="batch", dropout=0.2)
    teacher.train()
    teacher(torch.randn(2, 1, *([16] * dims)))  # make the BatchNorm statistics non-trivial
    ckpt = save_teacher(tmp_path, teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = small_unet(dims)
    student_before = [p.clone() for p in student.parameters()]
    d = Distiller(student, CE(), emkd_terms(), teacher, ckpt)
    trainer = kd_trainer(d, make_batches(4, dims), decollate=False)
    trainer.run()
    assert trainer.state.iteration == 4
    after = teacher.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"teacher {k} changed"
    assert not teacher.training
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))


def test_trainer_output_holds_every_term(tmp_path):
    teacher = small_unet(channels=(8, 16, 32, 64))
    d = Distiller(small_unet(), CE(), emkd_terms(), teacher, save_teacher(tmp_path, teacher))
    outputs = []
    trainer = kd_trainer(d, make_batches(2), decollate=False)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    out = outputs[-1]
    for name in ("pmd", "imd_low", "rad_high"):
        assert out[f"loss_{name}"].item() == pytest.approx(out[f"raw_{name}"].item() * {"pmd": 0.1}.get(name, 0.9), rel=1e-6)
    total = out["loss_task"] + sum(out[f"loss_{n}"] for n in ("pmd", "imd_low", "rad_high"))
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert "features" not in out


class _Nan(nn.Module):
    def forward(self, s, t):
        return (s.sum() - t.sum()) * float("nan")


def test_non_finite_term_stops_training_naming_it(tmp_path):
    teacher = small_unet(channels=(8, 16, 32, 64))
    terms = [LossTerm("pmd", PredictionMapDistillation(), 0.1, ["s.logits", "t.logits"]), LossTerm("broken", _Nan(), 1.0, ["s.logits", "t.logits"])]
    student = small_unet()
    d = Distiller(student, CE(), terms, teacher, save_teacher(tmp_path, teacher))
    before = [p.clone() for p in student.parameters()]
    with pytest.raises(FloatingPointError, match=r"term\(s\) \['broken'\]"):
        kd_trainer(d, make_batches(1), decollate=False).run()
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters())), "no optimiser step on a NaN loss"


def test_adversary_runs_after_the_student_step(tmp_path):
    class Critic(AdversaryStep):
        def __init__(self):
            self.net = nn.Conv2d(3, 1, 1)
            self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
            self.calls = 0

        def step(self, engine, features):
            self.calls += 1
            assert features["s.logits"].grad_fn is not None  # the student's graph is still there
            self.opt.zero_grad()
            loss = self.net(features["s.logits"].detach()).mean() - self.net(features["t.logits"]).mean()
            loss.backward()
            self.opt.step()
            return {"loss_critic": loss.detach()}

    teacher = small_unet(channels=(8, 16, 32, 64))
    d = Distiller(small_unet(), CE(), emkd_terms()[:1], teacher, save_teacher(tmp_path, teacher))
    critic = Critic()
    w0 = critic.net.weight.clone()
    seen = []
    trainer = kd_trainer(d, make_batches(3), adversaries=[critic], decollate=False)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append("loss_critic" in e.state.output))
    trainer.run()
    assert critic.calls == 3 and all(seen)
    assert not torch.equal(w0, critic.net.weight)


def test_semi_supervised_batches_mask_label_terms(tmp_path):
    """Task loss and label-reading terms see the labelled samples only; other terms see the whole batch."""
    torch.manual_seed(0)
    teacher = small_unet(channels=(8, 16, 32, 64))
    ckpt = save_teacher(tmp_path, teacher)
    d = Distiller(small_unet(), CE(), emkd_terms(), teacher, ckpt).train()
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 3, (4, 1, 16, 16))
    mask = torch.tensor([True, False, True, False])
    out = d(x, y, mask)
    with torch.no_grad():
        zs = d.student(x)
        t_feats = d.teacher(x)
    assert out["loss_task"].item() == pytest.approx(CE()(zs[mask], y[mask]).item(), rel=1e-5)
    assert out["raw_pmd"].item() == pytest.approx(PredictionMapDistillation(4.0)(zs, t_feats["t.logits"]).item(), rel=1e-5)
    none = d(x, y, torch.zeros(4, dtype=torch.bool))
    assert none["loss_task"].item() == 0.0 and none["raw_rad_high"].item() == 0.0 and none["raw_pmd"].item() > 0


def test_live_teacher_ignores_train_mode(tmp_path):
    teacher = small_unet(norm="batch")
    lt = LiveTeacher(teacher, save_teacher(tmp_path, teacher), {"low": "low"})
    lt.train()
    assert not teacher.training
    out = lt(torch.randn(2, 1, 16, 16))
    assert set(out) == {"t.logits", "t.low"} and not out["t.low"].requires_grad
