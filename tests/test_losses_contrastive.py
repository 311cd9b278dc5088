"""MTMS-CKD losses (InfoNCE feature KD, supervised-contrastive variant, binary logit KD) against naive computations:
numpy projections, explicit log-softmax over the similarity matrix written with python loops, hand-worked values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from medkd.losses.contrastive import BinaryLogitKD, ContrastiveDistillation, SupervisedContrastiveDistillation

SHAPES = {2: (4, 4), 3: (4, 2, 2)}


def positions(spatial):
    return list(itertools.product(*[range(s) for s in spatial]))


def np_project(x: torch.Tensor, conv: nn.Module | None) -> np.ndarray:
    """1x1 convolution written as a channel contraction: out[b, o, ...] = sum_c W[o, c] x[b, c, ...] + bias[o]."""
    a = x.detach().double().numpy()
    if conv is None:
        return a
    w = conv.weight.detach().double().numpy().reshape(conv.weight.shape[:2])
    bias = conv.bias.detach().double().numpy()
    return np.einsum("oc,bc...->bo...", w, a) + bias.reshape((1, -1) + (1,) * (a.ndim - 2))


def block_mean(a: np.ndarray, factor: int = 2) -> np.ndarray:
    """Mean over factor^d blocks (what a bilinear/trilinear resize by exactly 1/2, align_corners=False, computes)."""
    b, c, *sp = a.shape
    shape = [b, c]
    for s in sp:
        shape += [s // factor, factor]
    return a.reshape(shape).mean(axis=tuple(range(3, 2 + 2 * len(sp), 2)))


def cosine(u, v) -> float:
    norms = math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v))
    return float(sum(x * y for x, y in zip(u, v)) / norms)


def naive_info_nce(q: list, k: list, tau: float, symmetric: bool = False) -> list[float]:
    """Row i: -log(exp(S_ii) / sum_j exp(S_ij)) with S_ij = cos(q_i, k_j) / tau, by explicit sums."""
    n = len(q)
    sim = [[cosine(q[i], k[j]) / tau for j in range(n)] for i in range(n)]
    rows = [-(sim[i][i] - math.log(sum(math.exp(v) for v in sim[i]))) for i in range(n)]
    if not symmetric:
        return rows
    cols = [-(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(n)))) for j in range(n)]
    return [(r + c) / 2 for r, c in zip(rows, cols)]


def set_known(conv: nn.Module, offset: float = 0.0) -> None:
    """Deterministic, non-trivial weights: w[o, c] = sin(1 + o * C + c + offset), bias[o] = 0.1 * cos(o)."""
    with torch.no_grad():
        o, c = conv.weight.shape[:2]
        w = torch.sin(torch.arange(o * c, dtype=torch.float32) + 1 + offset).reshape(o, c)
        conv.weight.copy_(w.reshape(conv.weight.shape))
        conv.bias.copy_(0.1 * torch.cos(torch.arange(o, dtype=torch.float32)))


def vectors(a: np.ndarray, pooling: str) -> list:
    if pooling == "flatten":
        return [list(a[b].reshape(-1)) for b in range(a.shape[0])]
    return [[float(a[b, c].mean()) for c in range(a.shape[1])] for b in range(a.shape[0])]


# ---------------------------------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("temperature", [0.4, 0.1])
def test_info_nce_learned_student_projection_matches_naive(dims, temperature):
    torch.manual_seed(dims)
    s, t = torch.randn(3, 4, *SHAPES[dims]), torch.randn(3, 6, *SHAPES[dims])
    loss = ContrastiveDistillation(4, 6, temperature=temperature, spatial_dims=dims, reduction="none")
    set_known(loss.projection.student)
    assert loss.projection.teacher is None
    expected = naive_info_nce(vectors(np_project(s, loss.projection.student), "flatten"),
                              vectors(t.double().numpy(), "flatten"), temperature)
    assert loss(s, t).tolist() == pytest.approx(expected, rel=1e-5)
    mean = ContrastiveDistillation(4, 6, temperature=temperature, spatial_dims=dims)
    mean.load_state_dict(loss.state_dict())
    assert mean(s, t).item() == pytest.approx(sum(expected) / 3, rel=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("side", ["student", "teacher", "both", "none"])
@pytest.mark.parametrize("pooling", ["flatten", "avg"])
def test_info_nce_sides_pooling_and_teacher_resize(dims, side, pooling):
    """Teacher at twice the student's size: "flatten" compares with the 2x block mean of the projected teacher."""
    torch.manual_seed(10 + dims)
    cs, ct = (5, 5) if side == "none" else (3, 5)
    s = torch.randn(4, cs, *SHAPES[dims])
    t = torch.randn(4, ct, *[2 * n for n in SHAPES[dims]])
    kwargs = {"projection": "none"} if side == "none" else {"projection_side": side}
    if side == "both":
        kwargs["embed_channels"] = 2
    loss = ContrastiveDistillation(cs, ct, temperature=0.3, pooling=pooling, spatial_dims=dims, reduction="none",
                                   **kwargs)
    for i, conv in enumerate((loss.projection.student, loss.projection.teacher)):
        if conv is not None:
            set_known(conv, offset=3.0 * i)
    ps, pt = np_project(s, loss.projection.student), np_project(t, loss.projection.teacher)
    if pooling == "flatten":
        pt = block_mean(pt)
    expected = naive_info_nce(vectors(ps, pooling), vectors(pt, pooling), 0.3)
    assert loss(s, t).tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_symmetric_info_nce_matches_naive(dims):
    torch.manual_seed(20 + dims)
    s, t = torch.randn(3, 2, *SHAPES[dims]), torch.randn(3, 2, *SHAPES[dims])
    loss = ContrastiveDistillation(2, 2, projection="none", symmetric=True, spatial_dims=dims, reduction="sum")
    expected = naive_info_nce(vectors(s.double().numpy(), "flatten"), vectors(t.double().numpy(), "flatten"), 0.4, True)
    assert loss(s, t).item() == pytest.approx(sum(expected), rel=1e-5)


def test_temperature_effect_on_orthonormal_pairs():
    """Identical, mutually orthogonal student/teacher vectors: loss = log(1 + (B - 1) exp(-1 / tau)) by hand."""
    b = 4
    f = torch.zeros(b, 1, 2, 2)
    for i in range(b):
        f[i, 0, i // 2, i % 2] = 2.0 + i  # sample i lives at its own pixel; the norm does not matter
    values = []
    for tau in (1.0, 0.4, 0.1):
        got = ContrastiveDistillation(1, 1, temperature=tau, projection="none")(f, f.clone()).item()
        assert got == pytest.approx(math.log(1 + (b - 1) * math.exp(-1 / tau)), rel=1e-5, abs=2e-6)  # float32 logits
        values.append(got)
    assert values[0] > values[1] > values[2] > 0
    # a shuffled teacher (positives are now the least similar) makes the loss large, more so at low temperature
    shuffled = f.roll(1, dims=0)
    hot = ContrastiveDistillation(1, 1, temperature=1.0, projection="none")(f, shuffled).item()
    cold = ContrastiveDistillation(1, 1, temperature=0.1, projection="none")(f, shuffled).item()
    assert cold > hot > math.log(b)


@pytest.mark.parametrize("dims", [2, 3])
def test_learned_projections_receive_gradients_and_live_in_the_state(dims):
    s = torch.randn(3, 4, *SHAPES[dims], requires_grad=True)
    t = torch.randn(3, 6, *SHAPES[dims], requires_grad=True)
    loss = ContrastiveDistillation(4, 6, embed_channels=3, spatial_dims=dims)
    assert set(loss.state_dict()) == {f"projection.{n}.{p}" for n in ("student", "teacher") for p in ("weight", "bias")}
    loss(s, t).backward()
    for conv in (loss.projection.student, loss.projection.teacher):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert conv.bias.grad is not None
    assert s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher is detached
    one_side = ContrastiveDistillation(4, 6, spatial_dims=dims)
    one_side(s, t).backward()
    assert one_side.projection.student.weight.grad.abs().sum() > 0


def test_random_each_step_draws_new_untrained_projections():
    torch.manual_seed(0)
    loss = ContrastiveDistillation(4, 6, projection="random_each_step", projection_side="teacher")
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    drawn = []
    draw = loss.projection.draw

    def recording(*args, **kwargs):
        layer = draw(*args, **kwargs)
        drawn.append(layer)
        return layer

    loss.projection.draw = recording
    s = torch.randn(3, 4, 4, 4, requires_grad=True)
    t = torch.randn(3, 6, 4, 4)
    first, second = loss(s, t), loss(s, t)
    assert len(drawn) == 2
    assert drawn[0].weight.shape == (4, 6, 1, 1)
    assert not torch.equal(drawn[0].weight, drawn[1].weight)
    assert first.item() != pytest.approx(second.item())
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    # each value is InfoNCE with the layer drawn at that step
    expected = naive_info_nce(vectors(s.detach().double().numpy(), "flatten"),
                              vectors(np_project(t, drawn[1]), "flatten"), 0.4)
    assert second.item() == pytest.approx(sum(expected) / 3, rel=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_random_each_step_is_a_default_initialised_conv_and_passes_gradients_to_the_student(dims):
    """As released for D-D: a fresh nn.ConvNd(Cs -> Ct, 1) on the student path, from the global RNG."""
    s = torch.randn(3, 2, *SHAPES[dims], requires_grad=True)
    t = torch.randn(3, 5, *SHAPES[dims])
    loss = ContrastiveDistillation(2, 5, projection="random_each_step", spatial_dims=dims)
    torch.manual_seed(123)
    got = loss(s, t)
    torch.manual_seed(123)
    reference = (nn.Conv2d if dims == 2 else nn.Conv3d)(2, 5, 1)
    expected = naive_info_nce(vectors(np_project(s, reference), "flatten"), vectors(t.double().numpy(), "flatten"), 0.4)
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    got.backward()
    assert s.grad.abs().sum() > 0


def test_frozen_projections_are_seeded_and_not_trained():
    a = ContrastiveDistillation(4, 6, projection="frozen", projection_side="teacher", seed=3)
    b = ContrastiveDistillation(4, 6, projection="frozen", projection_side="teacher", seed=3)
    c = ContrastiveDistillation(4, 6, projection="frozen", projection_side="teacher", seed=4)
    assert torch.equal(a.projection.teacher.weight, b.projection.teacher.weight)
    assert not torch.equal(a.projection.teacher.weight, c.projection.teacher.weight)
    assert all(not p.requires_grad for p in a.parameters())
    assert a.projection.teacher.weight.abs().max() <= 1 / math.sqrt(6)
    s, t = torch.randn(3, 4, 4, 4, requires_grad=True), torch.randn(3, 6, 4, 4)
    first = a(s, t)
    assert first.item() == a(s, t).item()
    first.backward()
    assert s.grad.abs().sum() > 0 and a.projection.teacher.weight.grad is None


# ------------------------------------------------------------------------------------- supervised contrastive


def naive_supcon(anchors, keys, anchor_cls, key_cls, anchor_sample, tau, batch) -> list[float]:
    """Cross-network SupCon: -mean over positives p of log(exp(s_ap) / sum_j exp(s_aj)); mean of anchors per sample."""
    per_sample = [[] for _ in range(batch)]
    for a, (vec, cls, b) in enumerate(zip(anchors, anchor_cls, anchor_sample)):
        sims = [cosine(vec, k) / tau for k in keys]
        log_z = math.log(sum(math.exp(v) for v in sims))
        pos = [j for j in range(len(keys)) if key_cls[j] == cls]
        per_sample[b].append(-sum(sims[j] - log_z for j in pos) / len(pos))
    return [sum(v) / len(v) for v in per_sample]


def small_labels(label: torch.Tensor, factor: int = 2) -> np.ndarray:
    """Nearest downsampling by an exact factor keeps every factor-th pixel starting at 0."""
    a = label[:, 0].numpy()
    return a[(slice(None),) + (slice(None, None, factor),) * (a.ndim - 1)]


def region_prototypes(f: np.ndarray, lab: np.ndarray, num_classes: int):
    protos, classes, samples = [], [], []
    for b in range(f.shape[0]):
        for k in range(num_classes):
            where = [pos for pos in positions(lab.shape[1:]) if lab[(b, *pos)] == k]
            if where:
                protos.append([sum(f[(b, c, *pos)] for pos in where) / len(where) for c in range(f.shape[1])])
                classes.append(k)
                samples.append(b)
    return protos, classes, samples


def make_label(dims, batch, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, num_classes, (batch, 1, *[2 * n for n in SHAPES[dims]]), generator=g)
    label[0] = 0  # sample 0 holds one class only
    return label


@pytest.mark.parametrize("dims", [2, 3])
def test_supcon_regions_match_explicit_loop(dims):
    torch.manual_seed(30 + dims)
    s, t = torch.randn(3, 3, *SHAPES[dims]), torch.randn(3, 4, *SHAPES[dims])
    label = make_label(dims, 3, 3, seed=dims)
    loss = SupervisedContrastiveDistillation(3, 4, num_classes=3, temperature=0.2, spatial_dims=dims, reduction="none")
    set_known(loss.projection.student)
    lab = small_labels(label)
    pa, ca, ba = region_prototypes(np_project(s, loss.projection.student), lab, 3)
    pk, ck, _ = region_prototypes(t.double().numpy(), lab, 3)
    expected = naive_supcon(pa, pk, ca, ck, ba, 0.2, 3)
    assert loss(s, t, label).tolist() == pytest.approx(expected, rel=1e-5)
    onehot = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1)
    assert loss(s, t, onehot).tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_supcon_pixels_match_explicit_loop(dims):
    torch.manual_seed(40 + dims)
    s, t = torch.randn(2, 2, *SHAPES[dims]), torch.randn(2, 2, *SHAPES[dims])
    label = make_label(dims, 2, 2, seed=5 + dims)
    loss = SupervisedContrastiveDistillation(2, 2, projection="none", granularity="pixel", max_pixels=10_000,
                                             temperature=0.5, spatial_dims=dims, reduction="none")
    lab = small_labels(label)
    anchors, keys, classes, samples = [], [], [], []
    for b in range(2):
        for pos in positions(SHAPES[dims]):
            anchors.append([float(s[(b, c, *pos)]) for c in range(2)])
            keys.append([float(t[(b, c, *pos)]) for c in range(2)])
            classes.append(int(lab[(b, *pos)]))
            samples.append(b)
    expected = naive_supcon(anchors, keys, classes, classes, samples, 0.5, 2)
    assert loss(s, t, label).tolist() == pytest.approx(expected, rel=1e-5)


def test_supcon_pixel_sampling_bounds_the_anchors():
    """max_pixels=8 over a batch of 2: 4 random positions per image (the same for student, teacher and label)."""
    torch.manual_seed(50)
    s, t = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    label = make_label(2, 2, 2, seed=9)
    loss = SupervisedContrastiveDistillation(2, 2, projection="none", granularity="pixel", max_pixels=8,
                                             reduction="none")
    torch.manual_seed(1)
    got = loss(s, t, label).tolist()
    torch.manual_seed(1)
    picked = torch.rand(2, 16).argsort(dim=1)[:, :4]
    lab = small_labels(label)
    anchors, keys, classes, samples = [], [], [], []
    for b in range(2):
        for p in picked[b].tolist():
            pos = (p // 4, p % 4)
            anchors.append([float(s[(b, c, *pos)]) for c in range(2)])
            keys.append([float(t[(b, c, *pos)]) for c in range(2)])
            classes.append(int(lab[(b, *pos)]))
            samples.append(b)
    assert got == pytest.approx(naive_supcon(anchors, keys, classes, classes, samples, 0.4, 2), rel=1e-5)


@pytest.mark.parametrize("granularity", ["region", "pixel"])
def test_supcon_learned_projections_receive_gradients(granularity):
    s = torch.randn(2, 3, 2, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 2, 4, 4)
    label = torch.randint(0, 2, (2, 1, 2, 4, 4))
    loss = SupervisedContrastiveDistillation(3, 5, embed_channels=4, granularity=granularity, spatial_dims=3)
    loss(s, t, label).backward()
    for conv in (loss.projection.student, loss.projection.teacher):
        assert conv.weight.grad.abs().sum() > 0
    assert s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- binary logit KD


def naive_two_class_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> list[float]:
    """Per sample: mean over pixels of T^2 KL(softmax([0, z_t]/T) || softmax([0, z_s]/T)), one pixel at a time."""
    out = []
    for b in range(s.shape[0]):
        vals = []
        for pos in positions(s.shape[2:]):
            zs, zt = float(s[(b, 0, *pos)]) / temperature, float(t[(b, 0, *pos)]) / temperature
            p = [1 / (1 + math.exp(zs)), math.exp(zs) / (1 + math.exp(zs))]
            q = [1 / (1 + math.exp(zt)), math.exp(zt) / (1 + math.exp(zt))]
            vals.append(temperature**2 * sum(qi * math.log(qi / pi) for qi, pi in zip(q, p)))
        out.append(sum(vals) / len(vals))
    return out


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_binary_kd_equals_two_class_kl(dims, temperature):
    torch.manual_seed(60 + dims)
    s = (torch.randn(2, 1, *SHAPES[dims]) * 3).requires_grad_(True)
    t = torch.randn(2, 1, *SHAPES[dims]) * 3
    got = BinaryLogitKD(temperature, reduction="none")(s, t)
    expected = naive_two_class_kl(s.detach(), t, temperature)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert min(expected) > 1e-3  # the released PMD on one channel was identically zero
    mean = BinaryLogitKD(temperature)(s, t)
    assert mean.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    mean.backward()
    assert s.grad.abs().sum() > 0
    assert BinaryLogitKD(temperature)(t, t.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_binary_kd_is_bce_minus_teacher_entropy():
    """Known identity: T^2 [BCE(sigmoid(z_s/T), target q) - H(q)], averaged over pixels and batch."""
    torch.manual_seed(70)
    s, t, temp = torch.randn(3, 1, 5, 4) * 4, torch.randn(3, 1, 5, 4) * 4, 2.0
    q = torch.sigmoid(t.double() / temp)
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(s.double() / temp), q)
    entropy = -(q * q.log() + (1 - q) * (1 - q).log()).mean()
    assert BinaryLogitKD(temp)(s, t).item() == pytest.approx((temp**2 * (bce - entropy)).item(), rel=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_binary_kd_multichannel_is_per_pixel_softmax_kd(dims):
    torch.manual_seed(80 + dims)
    s, t, temp = torch.randn(2, 3, *SHAPES[dims]) * 2, torch.randn(2, 3, *SHAPES[dims]) * 2, 4.0
    total, count = 0.0, 0
    for b in range(2):
        for pos in positions(SHAPES[dims]):
            zs = [float(s[(b, k, *pos)]) / temp for k in range(3)]
            zt = [float(t[(b, k, *pos)]) / temp for k in range(3)]
            p = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
            q = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
            total += temp**2 * sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
            count += 1
    assert BinaryLogitKD(temp)(s, t).item() == pytest.approx(total / count, rel=1e-5)


# ------------------------------------------------------------------------------------------------- bad input

F2 = torch.randn(2, 4, 4, 4)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ContrastiveDistillation(4, 4, temperature=0), "temperature"),
        (lambda: ContrastiveDistillation(4, 4, projection="random"), "projection must be one of"),
        (lambda: ContrastiveDistillation(4, 6, projection="none"), "equal channel counts"),
        (lambda: ContrastiveDistillation(4, 6, projection_side="both"), "embed_channels is required"),
        (lambda: ContrastiveDistillation(4, 6, embed_channels=8, projection_side="student"), "embed_channels"),
        (lambda: ContrastiveDistillation(4, 6, pooling="max"), "pooling"),
        (lambda: ContrastiveDistillation(4, 6, spatial_dims=1), "spatial_dims"),
        (lambda: ContrastiveDistillation(0, 6), "student_channels"),
        (lambda: ContrastiveDistillation(4, 6, reduction="batchmean"), "reduction"),
        (lambda: SupervisedContrastiveDistillation(4, 4, num_classes=1), "num_classes"),
        (lambda: SupervisedContrastiveDistillation(4, 4, granularity="patch"), "granularity"),
        (lambda: SupervisedContrastiveDistillation(4, 4, max_pixels=0), "max_pixels"),
        (lambda: BinaryLogitKD(-1.0), "temperature"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ContrastiveDistillation(4, 4)(F2, torch.randn(2, 5, 4, 4)), "4 teacher channels"),
        (lambda: ContrastiveDistillation(3, 4)(F2, F2), "3 student channels"),
        (lambda: ContrastiveDistillation(4, 4)(torch.randn(2, 4, 2, 2, 2), torch.randn(2, 4, 2, 2, 2)),
         "spatial_dims=2"),
        (lambda: ContrastiveDistillation(4, 4)(F2[:1], F2[:1]), "at least 2 samples"),
        (lambda: ContrastiveDistillation(4, 4)(F2, F2[:1]), "batch sizes differ"),
        (lambda: ContrastiveDistillation(4, 4)(F2[0], F2[0]), r"\(B, C, H, W"),
        (lambda: SupervisedContrastiveDistillation(4, 4)(F2, F2, torch.full((2, 1, 8, 8), 2)), r"\[0, 2\)"),
        (lambda: SupervisedContrastiveDistillation(4, 4)(F2, F2, torch.zeros(3, 1, 8, 8)), "label batch"),
        (lambda: SupervisedContrastiveDistillation(4, 4)(F2, F2, torch.zeros(2, 8, 8)), "label must be"),
        (lambda: BinaryLogitKD()(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 5)), "differ"),
        (lambda: BinaryLogitKD()(torch.randn(2, 4), torch.randn(2, 4)), r"\(B, C, H, W"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
