"""Graph Flow losses against naive loop computations, the WGAN-GP penalty against closed forms, and the split of
updates between the student step and the discriminator step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from medkd.distill import Distiller, LossTerm
from medkd.engines import WGANGPStep
from medkd.losses import (AdversarialGeneratorLoss, CrossLayerSimilarity, GraphFlowEdges, GraphFlowVertices,
                          LogitsDiscriminator, SelfAttention, flow_matrix, gradient_penalty)


def _rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _naive_flow(a, b, cosine=False, normalize=True):
    return _naive_flow_pair(a, b, cosine, normalize)


def _naive_flow_pair(a, b, cosine=False, normalize=True):
    a, b = a.double().numpy(), b.double().numpy()
    bsz, c1, c2 = a.shape[0], a.shape[1], b.shape[1]
    a, b = a.reshape(bsz, c1, -1), b.reshape(bsz, c2, -1)
    n = a.shape[2]
    out = np.zeros((bsz, c1, c2))
    for k, i, j in itertools.product(range(bsz), range(c1), range(c2)):
        x, y = a[k, i], b[k, j]
        if cosine:
            x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
        out[k, i, j] = sum(x[p] * y[p] for p in range(n)) / (n if normalize else 1)
    return out


@pytest.mark.parametrize("cosine,normalize", [(False, True), (True, True), (False, False)])
def test_flow_matrix_and_edges_match_loops(cosine, normalize):
    s1, s2, t1, t2 = (_rand(2, 3, 4, 5, seed=i) for i in range(4))
    np.testing.assert_allclose(flow_matrix(s1, s2, cosine, normalize).numpy(), _naive_flow(s1, s2, cosine, normalize),
                               rtol=1e-5, atol=1e-6)
    expected = ((_naive_flow(s1, s2, cosine, normalize) - _naive_flow(t1, t2, cosine, normalize)) ** 2)
    loss = GraphFlowEdges(cosine, normalize, reduction="sum")
    np.testing.assert_allclose(float(loss(s1, s2, t1, t2)), expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(GraphFlowEdges(cosine, normalize, "mean")(s1, s2, t1, t2)), expected.mean(), rtol=1e-5)
    # channel counts may differ between the two layers
    wide = _rand(2, 5, 4, 5, seed=9)
    np.testing.assert_allclose(flow_matrix(s1, wide, cosine, normalize).numpy(), _naive_flow_pair(s1, wide, cosine, normalize),
                               rtol=1e-5, atol=1e-6)
    # 3D maps: the flow only sees flattened positions
    f3 = [x.reshape(2, 3, 4, 5, 1) for x in (s1, s2, t1, t2)]
    np.testing.assert_allclose(float(loss(*f3)), expected.sum(), rtol=1e-5)


def test_edges_gradient_reaches_student_only():
    s1, s2 = _rand(1, 2, 3, 3, seed=1).requires_grad_(), _rand(1, 2, 3, 3, seed=2).requires_grad_()
    t1, t2 = _rand(1, 2, 3, 3, seed=3).requires_grad_(), _rand(1, 2, 3, 3, seed=4).requires_grad_()
    GraphFlowEdges()(s1, s2, t1, t2).backward()
    assert s1.grad is not None and s2.grad is not None and t1.grad is None and t2.grad is None
    assert float(GraphFlowEdges()(s1, s2, s1, s2).detach()) == 0.0


def _naive_patch_max(x, p):
    x = x.double().numpy()
    b, c, h, w = x.shape
    oh, ow = -(-h // p), -(-w // p)
    out = np.zeros((b, c, oh, ow))
    for i, j in itertools.product(range(oh), range(ow)):
        out[:, :, i, j] = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("patch", [1, 3])
def test_vertices_match_loops(patch):
    s = [_rand(2, 4, 7, 6, seed=i) for i in range(2)]
    t = [_rand(2, 4, 7, 6, seed=10 + i) for i in range(2)]
    expected = sum(((_naive_patch_max(a, patch) - _naive_patch_max(b, patch)) ** 2).sum() for a, b in zip(s, t))
    np.testing.assert_allclose(float(GraphFlowVertices(patch)(*s, *t)), expected, rtol=1e-5)
    means = sum(((_naive_patch_max(a, patch) - _naive_patch_max(b, patch)) ** 2).mean() for a, b in zip(s, t))
    np.testing.assert_allclose(float(GraphFlowVertices(patch, "mean")(*s, *t)), means, rtol=1e-5)
    with pytest.raises(ValueError, match="paraphraser width"):
        GraphFlowVertices()(s[0], t[0][:, :2])
    with pytest.raises(ValueError, match="even number"):
        GraphFlowVertices()(*s, t[0])


def test_cross_layer_similarity_matches_loops():
    s1, s2 = _rand(1, 3, 2, 3, seed=5), _rand(1, 3, 2, 3, seed=6)
    t1, t2 = _rand(1, 5, 2, 3, seed=7), _rand(1, 5, 2, 3, seed=8)  # other channel count: similarity is over positions

    def sim(a, b):
        a, b = a[0].reshape(a.shape[1], -1).double().numpy(), b[0].reshape(b.shape[1], -1).double().numpy()
        return np.array([[np.dot(a[:, i], b[:, j]) for j in range(a.shape[1])] for i in range(a.shape[1])])

    expected = ((sim(s1, s2) - sim(t1, t2)) ** 2).sum()
    np.testing.assert_allclose(float(CrossLayerSimilarity()(s1, s2, t1, t2)), expected, rtol=1e-5)


def test_self_attention_matches_loops():
    att = SelfAttention(8)
    x = _rand(1, 8, 2, 3, seed=9)
    torch.testing.assert_close(att(x), x)  # gamma starts at 0: identity
    with torch.no_grad():
        att.gamma.fill_(0.7)
    with torch.no_grad():
        q, k, v = (m(x).flatten(2)[0].double().numpy() for m in (att.query, att.key, att.value))
    n = q.shape[1]
    expected = x.flatten(2)[0].double().numpy().copy()
    for i in range(n):
        scores = np.array([np.dot(q[:, i], k[:, j]) for j in range(n)])
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        expected[:, i] += 0.7 * sum(weights[j] * v[:, j] for j in range(n))
    np.testing.assert_allclose(att(x).flatten(2)[0].detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_discriminator_shapes_and_spectral_norm():
    d = LogitsDiscriminator(3)
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 13, 13)  # as released
    assert d(torch.randn(1, 3, 224, 224)).shape == (1, 1, 11, 11)
    assert LogitsDiscriminator(3, extra_layer=False)(torch.randn(1, 3, 64, 64)).shape == (1, 1, 5, 5)
    assert LogitsDiscriminator(2, spatial_dims=3, conv_dim=4)(torch.randn(1, 2, 64, 64, 64)).shape == (1, 1, 1, 1, 1)
    # small crops are zero-padded to the smallest size the stages take (64 with the extra layer)
    d.eval()  # no power iteration between the two calls
    small = torch.randn(1, 3, 48, 64)
    padded = torch.nn.functional.pad(torch.tanh(small), (0, 0, 8, 8))
    torch.testing.assert_close(d(small), d.last(d.features(padded)))
    sn_convs = [m for m in d.features if isinstance(m, nn.Conv2d)]
    assert len(sn_convs) == 4 and all(hasattr(m, "parametrizations") for m in sn_convs)
    d.train()
    for _ in range(30):  # power iterations converge: the normalised weight has spectral norm 1
        d(torch.randn(1, 3, 64, 64))
    w = sn_convs[1].weight.detach().flatten(1)
    assert abs(float(torch.linalg.matrix_norm(w, 2)) - 1.0) < 0.05


class _Linear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return (x * self.weight).flatten(1).sum(1, keepdim=True)


class _Square(nn.Module):
    def forward(self, x):
        return x.pow(2).flatten(1).sum(1, keepdim=True)


def test_gradient_penalty_closed_forms():
    real, fake = _rand(3, 2, 4, 4, seed=11), _rand(3, 2, 4, 4, seed=12)
    w = _rand(1, 2, 4, 4, seed=13)
    # linear critic: the gradient is w at every point, whatever the interpolation
    gp = gradient_penalty(_Linear(w), real, fake)
    np.testing.assert_allclose(float(gp), (float(w.norm()) - 1.0) ** 2, rtol=1e-5)
    # quadratic critic: grad = 2 x_hat; reproduce the interpolation weights with the same generator seed
    eps = torch.rand((3, 1, 1, 1), generator=torch.Generator().manual_seed(5))
    x_hat = eps * real + (1 - eps) * fake
    expected = ((2 * x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    got = gradient_penalty(_Square(), real, fake, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    # the penalty trains the critic: its gradient wrt w is 2 (|w| - 1) w / |w| (autograd through create_graph)
    critic = _Linear(w.clone())
    gradient_penalty(critic, real, fake).backward()
    expected_grad = 2 * (w.norm() - 1) * w / w.norm()
    torch.testing.assert_close(critic.weight.grad, expected_grad, rtol=1e-4, atol=1e-6)


class _TinySeg(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_student_and_discriminator_steps_update_only_their_own_parameters(tmp_path):
    teacher = _TinySeg(1)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    student = _TinySeg(2)
    disc = LogitsDiscriminator(3, conv_dim=4, extra_layer=False)
    term = LossTerm("adv", AdversarialGeneratorLoss(disc), 0.1, ["s.logits"])
    distiller = Distiller(student, nn.CrossEntropyLoss(), [term, LossTerm("kd", nn.MSELoss(), 1.0)],
                          teacher=_TinySeg(3), teacher_ckpt=tmp_path / "teacher.pt")
    assert {id(p) for p in distiller.trainable_parameters()} == {id(p) for p in student.parameters()}
    student_opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    step = WGANGPStep(disc, torch.optim.Adam(disc.parameters(), lr=1e-2, betas=(0.9, 0.99)))

    def snapshot(module):
        return [p.detach().clone() for p in module.parameters()]

    image, label = torch.randn(2, 1, 64, 64), torch.randint(0, 3, (2, 64, 64))
    d0, s0 = snapshot(disc), snapshot(student)
    out = distiller(image, label)
    student_opt.zero_grad()
    out["loss"].backward()
    assert all(p.grad is None for p in disc.parameters())  # the generator term leaves the critic untouched
    student_opt.step()
    d1, s1 = snapshot(disc), snapshot(student)
    assert all(torch.equal(a, b) for a, b in zip(d0, d1))
    assert any(not torch.equal(a, b) for a, b in zip(s0, s1))

    logs = step.step(None, out["features"])
    assert set(logs) == {"loss_d", "raw_d_wasserstein", "raw_d_gp"} and all(torch.isfinite(v) for v in logs.values())
    assert all(torch.equal(a, b) for a, b in zip(s1, snapshot(student)))
    assert any(not torch.equal(a, b) for a, b in zip(d1, snapshot(disc)))
    with pytest.raises(ValueError, match="discriminator's parameters only"):
        WGANGPStep(disc, torch.optim.SGD(student.parameters(), lr=0.1))
