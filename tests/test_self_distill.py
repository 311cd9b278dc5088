"""ACW-SKD parts: gradient reversal, temperature schedule, class-wise features, the losses, the student wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from ignite.engine import Engine, Events

from medkd.distill import Distiller, LossTerm, SelfDistillationStudent
from medkd.engines import TermSchedule
from medkd.losses import (
    AdversarialTemperatureKD,
    FeatureReconstructionLoss,
    InterClassSeparation,
    LearnableTemperature,
    UpsampledLoss,
    class_wise_features,
    cosine_ramp,
    grad_reverse,
)


def test_grad_reverse_is_identity_forward_and_scales_gradients():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    y = grad_reverse(x, -0.3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    (ref * w * -0.3).sum().backward()  # autograd of the same function with the factor in the forward
    torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("epoch", [0, 1, 3, 5, 9, 10, 25])
def test_cosine_ramp_matches_formula(epoch):
    e = min(epoch, 10)
    expected = (math.cos(e * math.pi / 10) + 1) / 2 * (0 - (-1)) + (-1)
    assert cosine_ramp(epoch) == pytest.approx(expected)
    assert cosine_ramp(5) == pytest.approx(-0.5) and cosine_ramp(10) == -1.0 and cosine_ramp(0) == 0.0


def _naive_pixel_kl(s, t, tau):
    s, t = s.detach().double().numpy(), t.detach().double().numpy()
    b, k = s.shape[:2]
    s, t = s.reshape(b, k, -1), t.reshape(b, k, -1)
    total = 0.0
    for i in range(b):
        per = []
        for j in range(s.shape[2]):
            p = np.exp(s[i, :, j] / tau) / np.exp(s[i, :, j] / tau).sum()
            q = np.exp(t[i, :, j] / tau) / np.exp(t[i, :, j] / tau).sum()
            per.append(float((q * np.log(q / p)).sum()))
        total += np.mean(per) * tau * tau
    return total / b


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 3, 4, 2)])
def test_adversarial_temperature_kd_equals_naive_kl(shape):
    torch.manual_seed(0)
    s, t = torch.randn(shape), torch.randn(shape)
    loss = AdversarialTemperatureKD(LearnableTemperature(init=0.3, learnable=False))
    tau = 1 + 20 / (1 + math.exp(-0.3))
    assert float(loss(s, t)) == pytest.approx(_naive_pixel_kl(s, t, tau), rel=1e-5)
    assert float(loss.extra_scalars["tau"]) == pytest.approx(tau, rel=1e-6)
    assert float(loss(s, s)) == pytest.approx(0.0, abs=1e-6)
    assert not list(loss.parameters())


def test_temperature_starts_at_ctkd_value_and_ascends_the_loss():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6) * 3
    loss = AdversarialTemperatureKD()
    assert float(loss.temperature()) == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # 15.62
    theta = loss.temperature.theta
    # the plain gradient of the loss w.r.t. theta (what descent would follow), written without the module
    th = torch.tensor(1.0, requires_grad=True)
    tau = 1 + 20 * torch.sigmoid(th)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / tau, 1), torch.log_softmax(t / tau, 1), log_target=True,
                                    reduction="none").sum(1).mean((1, 2)).mean() * tau * tau
    descent_grad = torch.autograd.grad(kl, th)[0]
    assert float(descent_grad) != 0.0

    loss.set_epoch(10)  # factor -1: the temperature's gradient is the descent gradient reversed
    assert loss.temperature.factor == -1.0
    loss(s, t).backward()
    torch.testing.assert_close(theta.grad, -descent_grad)
    before = float(loss(s, t))
    with torch.no_grad():
        theta -= 0.5 * theta.grad  # one SGD step of the shared optimiser
    assert float(loss(s, t)) > before  # the temperature moved to raise the loss the student lowers

    loss.zero_grad()
    loss.set_epoch(0)  # factor 0: no update at all in the first epoch's start
    loss(s, t).backward()
    assert float(theta.grad) == 0.0


def _naive_class_wise(f, logits, eps=1e-6):
    f, logits = f.double().numpy(), logits.double().numpy()
    b, c = f.shape[:2]
    k = logits.shape[1]
    fs, ls = f.reshape(b, c, -1), logits.reshape(b, k, -1)
    out = np.zeros_like(fs)
    protos = np.zeros((b, k, c))
    mass = np.zeros((b, k))
    for i in range(b):
        m = np.exp(ls[i]) / np.exp(ls[i]).sum(0, keepdims=True)
        for cls in range(k):
            mass[i, cls] = m[cls].sum()
            for ch in range(c):
                protos[i, cls, ch] = (m[cls] * fs[i, ch]).sum() / (mass[i, cls] + eps)
        for n in range(fs.shape[2]):
            for ch in range(c):
                out[i, ch, n] = sum(m[cls, n] * protos[i, cls, ch] for cls in range(k))
    return out.reshape(f.shape), protos, mass


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 2)])
def test_class_wise_features_equal_explicit_loop(spatial):
    torch.manual_seed(1)
    f, logits = torch.randn(2, 3, *spatial), torch.randn(2, 4, *spatial) * 2
    f_cw, protos, mass = class_wise_features(f, logits)
    e_cw, e_protos, e_mass = _naive_class_wise(f, logits)
    np.testing.assert_allclose(f_cw.numpy(), e_cw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(protos.numpy(), e_protos, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mass.numpy(), e_mass, rtol=1e-5)


def test_class_wise_features_resize_coarse_logits():
    f = torch.randn(1, 2, 8, 8)
    small = torch.randn(1, 3, 4, 4)
    up = torch.nn.functional.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(class_wise_features(f, small)[0], class_wise_features(f, up)[0])


def test_inter_class_separation_equals_explicit_pairs():
    torch.manual_seed(2)
    f, logits = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    logits[1, 2] = -50.0  # class 2 absent from sample 1 (mass << 1)
    _, protos, mass = _naive_class_wise(f, logits)
    per = []
    for i in range(2):
        present = [k for k in range(3) if mass[i, k] >= 1.0]
        vals = []
        for a in present:
            for b in present:
                if a != b:
                    cos = protos[i, a] @ protos[i, b] / np.linalg.norm(protos[i, a]) / np.linalg.norm(protos[i, b])
                    vals.append(max(0.0, cos - 0.1) ** 2)
        per.append(np.mean(vals) if vals else 0.0)
    assert float(InterClassSeparation(margin=0.1)(f, logits)) == pytest.approx(np.mean(per), rel=1e-4, abs=1e-7)


def test_reconstruction_loss_detaches_target_and_upsampled_loss_resizes():
    r, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)
    value = FeatureReconstructionLoss()(r, t)
    assert float(value) == pytest.approx(float(((r - t) ** 2).mean()), rel=1e-6)
    value.backward()
    assert t.grad is None and r.grad is not None
    with pytest.raises(ValueError, match="differ"):
        FeatureReconstructionLoss()(r, t[:, :2])
    seen = {}
    UpsampledLoss(lambda x, y: seen.setdefault("shape", x.shape) and x.sum())(torch.randn(1, 3, 4, 4), torch.zeros(1, 1, 8, 8))
    assert tuple(seen["shape"]) == (1, 3, 8, 8)


def _student():
    return UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


def test_wrapper_outputs_and_plain_student_untouched():
    torch.manual_seed(0)
    student = _student()
    n_params = sum(p.numel() for p in student.parameters())
    keys = set(student.state_dict())
    wrapper = SelfDistillationStudent(student, num_classes=3, channels=8, classifier="model.2", mask_ratio=0.0)
    assert set(student.state_dict()) == keys and sum(p.numel() for p in student.parameters()) == n_params
    x = torch.randn(2, 1, 16, 16)
    grabbed = {}
    h = student.model[2].register_forward_pre_hook(lambda m, a: None if "pen" in grabbed else grabbed.update(pen=a[0]))
    wrapper.train()
    feats = {}
    hooks = [getattr(wrapper, n).register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, o))
             for n in ("pen", "aux", "classwise", "frm_pen", "frm_cw", "cw_logits")]
    out = wrapper(x)
    h.remove()
    torch.testing.assert_close(out, student(x))  # the student's logits, unchanged
    torch.testing.assert_close(feats["pen"], grabbed["pen"])
    assert feats["pen"].shape == (2, 8, 8, 8) and feats["aux"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(feats["classwise"], class_wise_features(feats["pen"], feats["aux"])[0])
    torch.testing.assert_close(feats["cw_logits"], student.model[2](feats["frm_cw"]))
    assert feats["cw_logits"].shape == out.shape
    for hk in hooks:
        hk.remove()
    wrapper.eval()
    torch.testing.assert_close(wrapper(x), student.eval()(x))
    with pytest.raises(ValueError, match="pen_channels"):
        SelfDistillationStudent(_student(), 3, channels=5, classifier="model.2").train()(x)


def test_frm_masks_in_training_only():
    wrapper = SelfDistillationStudent(_student(), 3, 8, "model.2", mask_ratio=0.75)
    frm = wrapper.frm_pen
    x = torch.ones(4, 8, 16, 16)
    frm.train()
    a, b = frm(x), frm(x)
    assert not torch.allclose(a, b)  # a new random mask per call
    frm.eval()
    torch.testing.assert_close(frm(x), frm.generate(x))
    assert isinstance(SelfDistillationStudent(_student(), 3, 8, "model.2", reconstruction=False).frm_cw, torch.nn.Identity)


def _distiller(**kw):
    torch.manual_seed(0)
    student = _student()
    wrapper = SelfDistillationStudent(student, 3, 8, "model.2")
    seg = torch.nn.CrossEntropyLoss()

    def task(logits, label):
        return seg(logits, label[:, 0].long())

    terms = [
        LossTerm("aux", UpsampledLoss(_CE()), 0.4, ["s.aux", "label"]),
        LossTerm("cwfd", FeatureReconstructionLoss(), 1.0, ["s.frm_pen", "s.classwise"]),
        LossTerm("ics", InterClassSeparation(), 1.0, ["s.pen", "s.aux"]),
        LossTerm("frm", FeatureReconstructionLoss(), 1.0, ["s.frm_cw", "s.classwise"]),
        LossTerm("atl", AdversarialTemperatureKD(), 1.0, ["s.logits", "s.cw_logits"]),
    ]
    return student, wrapper, Distiller(wrapper, task, terms, **kw)


class _CE(torch.nn.Module):
    def forward(self, logits, label):
        return torch.nn.functional.cross_entropy(logits, label[:, 0].long())


def test_distiller_without_teacher_trains_every_branch():
    student, wrapper, distiller = _distiller()
    assert distiller.teacher is None
    distiller.train()
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 1, 16, 16))
    for t in distiller.terms:
        t.loss.set_epoch(5) if hasattr(t.loss, "set_epoch") else None
    out = distiller(x, y)
    assert {"raw_aux", "raw_cwfd", "raw_ics", "raw_frm", "raw_atl", "raw_atl_tau"} <= set(out)
    out["loss"].backward()
    assert wrapper.aux.classify.weight.grad.abs().sum() > 0
    assert wrapper.frm_pen.generate[0].weight.grad.abs().sum() > 0
    assert wrapper.frm_cw.generate[0].weight.grad.abs().sum() > 0
    assert distiller.terms[4].loss.temperature.theta.grad is not None
    params = {id(p) for p in distiller.trainable_parameters()}
    assert id(distiller.terms[4].loss.temperature.theta) in params and id(wrapper.aux.classify.weight) in params
    # the exported network is the plain student: same keys as a fresh student, loads strictly
    _student().load_state_dict(student.state_dict(), strict=True)


def test_term_schedule_warmup_and_epochs():
    _, _, distiller = _distiller()
    schedule = TermSchedule(distiller.terms, warmup_epochs=2, warmup_terms=["cwfd", "atl"])
    engine = Engine(lambda e, b: None)
    schedule.attach(engine)
    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(
        (distiller.terms[1].weight, distiller.terms[4].weight, distiller.terms[0].weight,
         distiller.terms[4].loss.temperature.factor)))
    engine.run([0], max_epochs=4)
    assert [s[:3] for s in seen] == [(0.0, 0.0, 0.4), (0.0, 0.0, 0.4), (1.0, 1.0, 0.4), (1.0, 1.0, 0.4)]
    assert [s[3] for s in seen] == pytest.approx([cosine_ramp(e) for e in (1, 2, 3, 4)])
    with pytest.raises(ValueError, match="not among"):
        TermSchedule(distiller.terms, 1, ["nope"])
