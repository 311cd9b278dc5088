"""Baseline KD losses (AT, FitNet, CWD, SKD pair-wise, IFVD, FSP) against naive reference computations: explicit
python loops over samples, positions, channels and classes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medkd.losses.baselines import (
    AttentionTransfer,
    ChannelWiseDistillation,
    FitNetHint,
    FSPLoss,
    IntraClassFeatureVariation,
    PairwiseSimilarity,
)

SHAPES = {2: (6, 5), 3: (4, 5, 3)}


def positions(spatial):
    return list(itertools.product(*[range(s) for s in spatial]))


def vec(f: torch.Tensor, b: int, pos) -> list[float]:
    """The channel vector of sample ``b`` at position ``pos``."""
    return [float(f[(b, c, *pos)]) for c in range(f.shape[1])]


def conv1x1(weight: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1 convolution position by position: out[b, o, pos] = sum_i W[o, i] f[b, i, pos]."""
    w = weight.detach().reshape(weight.shape[0], weight.shape[1])
    out = torch.zeros(f.shape[0], w.shape[0], *f.shape[2:])
    for b in range(f.shape[0]):
        for pos in positions(f.shape[2:]):
            x = vec(f, b, pos)
            for o in range(w.shape[0]):
                out[(b, o, *pos)] = sum(float(w[o, i]) * x[i] for i in range(len(x)))
    return out


def cosine(u, v, eps=1e-8) -> float:
    return sum(a * b for a, b in zip(u, v)) / max(math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)), eps)


# ----------------------------------------------------------------------------------------------------- attention


def naive_at(s: torch.Tensor, t: torch.Tensor, p: float) -> float:
    total = 0.0
    for b in range(s.shape[0]):
        maps = []
        for f in (s, t):
            a = [sum(abs(x) ** p for x in vec(f, b, pos)) for pos in positions(f.shape[2:])]
            norm = math.sqrt(sum(v * v for v in a))
            maps.append([v / norm for v in a])
        total += sum((x - y) ** 2 for x, y in zip(*maps)) / len(maps[0])
    return total / s.shape[0]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_attention_transfer_matches_naive(dims, p):
    torch.manual_seed(dims)
    s, t = torch.randn(2, 3, *SHAPES[dims]), torch.randn(2, 5, *SHAPES[dims])  # channel counts differ
    assert AttentionTransfer(p)(s, t).item() == pytest.approx(naive_at(s, t, p), rel=1e-5)
    assert AttentionTransfer(p)(t, t.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_transfer_resizes_the_student_map():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 3, 4), torch.randn(2, 4, 6, 8)
    a_s = (s**2).sum(dim=1, keepdim=True)
    up = F.interpolate(a_s, size=(6, 8), mode="bilinear", align_corners=False)  # resizing itself is torch's
    total = 0.0
    for b in range(2):
        ms = [float(v) for v in up[b].flatten()]
        mt = [sum(x * x for x in vec(t, b, pos)) for pos in positions((6, 8))]
        ns, nt = math.sqrt(sum(v * v for v in ms)), math.sqrt(sum(v * v for v in mt))
        total += sum((x / ns - y / nt) ** 2 for x, y in zip(ms, mt)) / 48
    assert AttentionTransfer()(s, t).item() == pytest.approx(total / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- FitNet


def naive_mse(a: torch.Tensor, t: torch.Tensor) -> float:
    per_sample = []
    for b in range(t.shape[0]):
        diffs = [(float(a[(b, c, *pos)]) - float(t[(b, c, *pos)])) ** 2
                 for c in range(t.shape[1]) for pos in positions(t.shape[2:])]
        per_sample.append(sum(diffs) / len(diffs))
    return sum(per_sample) / len(per_sample)


@pytest.mark.parametrize("dims", [2, 3])
def test_fitnet_matches_naive_and_trains_its_regressor(dims):
    torch.manual_seed(10 + dims)
    s = torch.randn(2, 3, *SHAPES[dims], requires_grad=True)
    t = torch.randn(2, 4, *SHAPES[dims], requires_grad=True)
    loss_fn = FitNetHint(3, 4, spatial_dims=dims)
    loss = loss_fn(s, t)
    assert loss.item() == pytest.approx(naive_mse(conv1x1(loss_fn.regressor.weight, s.detach()), t.detach()), rel=1e-5)
    loss.backward()
    grad = loss_fn.regressor.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert s.grad is not None and t.grad is None  # teacher detached


def test_fitnet_identity_regressor_gives_zero_and_resizes():
    torch.manual_seed(1)
    loss_fn = FitNetHint(3, 3)
    with torch.no_grad():
        loss_fn.regressor.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
    t = torch.randn(2, 3, 6, 5)
    assert loss_fn(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    # a constant student map stays constant under bilinear resizing: each channel value is compared everywhere
    s = torch.randn(2, 3, 1, 1).expand(2, 3, 3, 2).contiguous()
    expected = naive_mse(s[:, :, :1, :1].expand(2, 3, 6, 5), t)
    assert loss_fn(s, t).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- CWD


def naive_cwd(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    total = 0.0
    for b in range(s.shape[0]):
        kls = []
        for c in range(s.shape[1]):
            zs = [float(s[(b, c, *pos)]) / tau for pos in positions(s.shape[2:])]
            zt = [float(t[(b, c, *pos)]) / tau for pos in positions(t.shape[2:])]
            ls = [z - math.log(sum(math.exp(v) for v in zs)) for z in zs]
            lt = [z - math.log(sum(math.exp(v) for v in zt)) for z in zt]
            kls.append(sum(math.exp(a) * (a - c_) for a, c_ in zip(lt, ls)))
        total += tau**2 * sum(kls) / len(kls)
    return total / s.shape[0]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_naive(dims, tau):
    torch.manual_seed(20 + dims)
    s, t = torch.randn(2, 3, *SHAPES[dims]) * 3, torch.randn(2, 3, *SHAPES[dims]) * 3
    loss_fn = ChannelWiseDistillation(tau, spatial_dims=dims)
    assert loss_fn.adapter is None
    assert loss_fn(s, t).item() == pytest.approx(naive_cwd(s, t, tau), rel=1e-5)
    assert loss_fn(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_cwd_adapter_matches_naive_and_gets_gradients(dims):
    torch.manual_seed(30 + dims)
    s = torch.randn(2, 3, *SHAPES[dims], requires_grad=True)
    t = torch.randn(2, 5, *SHAPES[dims], requires_grad=True)
    loss_fn = ChannelWiseDistillation(2.0, student_channels=3, teacher_channels=5, spatial_dims=dims)
    loss = loss_fn(s, t)
    expected = naive_cwd(conv1x1(loss_fn.adapter.weight, s.detach()), t.detach(), 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert loss_fn.adapter.weight.grad is not None and loss_fn.adapter.weight.grad.abs().sum() > 0
    assert t.grad is None


def test_cwd_equal_channels_need_no_adapter_and_spatial_sizes_are_aligned():
    assert ChannelWiseDistillation(student_channels=4, teacher_channels=4).adapter is None
    s, t = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 6, 8)
    got = ChannelWiseDistillation(1.0)(s, t)
    expected = naive_cwd(F.interpolate(s, size=(6, 8), mode="bilinear", align_corners=False), t, 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- SKD pair-wise


def naive_pool(f: torch.Tensor, b: int, scale: float, mode: str) -> list[list[float]]:
    """Pooled channel vectors of sample ``b``, one per window (row-major), windows clipped at the border."""
    spatial = f.shape[2:]
    kernels = [max(1, int(s * scale)) for s in spatial]
    starts = [range(0, s, k) for s, k in zip(spatial, kernels)]
    out = []
    for start in itertools.product(*starts):
        window = list(itertools.product(*[range(a, min(a + k, s)) for a, k, s in zip(start, kernels, spatial)]))
        vals = [[float(f[(b, c, *pos)]) for pos in window] for c in range(f.shape[1])]
        out.append([max(v) if mode == "max" else sum(v) / len(v) for v in vals])
    return out


def naive_pairwise(s: torch.Tensor, t: torch.Tensor, scale: float, mode: str) -> float:
    total = 0.0
    for b in range(s.shape[0]):
        ps, pt = naive_pool(s, b, scale, mode), naive_pool(t, b, scale, mode)
        n = len(ps)
        total += sum((cosine(ps[i], ps[j]) - cosine(pt[i], pt[j])) ** 2 for i in range(n) for j in range(n)) / n**2
    return total / s.shape[0]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode,scale", [("max", 0.5), ("avg", 0.4), ("max", 0.25)])
def test_pairwise_matches_naive(dims, mode, scale):
    torch.manual_seed(40 + dims)
    s, t = torch.randn(2, 3, *SHAPES[dims]), torch.randn(2, 6, *SHAPES[dims])  # channel counts differ
    loss_fn = PairwiseSimilarity(scale=scale, pool=mode)
    assert loss_fn(s, t).item() == pytest.approx(naive_pairwise(s, t, scale, mode), rel=1e-5, abs=1e-7)
    assert loss_fn(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)


def test_pairwise_without_pooling_uses_every_position():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 3, 4), torch.randn(2, 2, 3, 4)
    expected = naive_pairwise(s, t, 1e-6, "max")  # kernel 1: every position is a window
    assert PairwiseSimilarity(scale=None)(s, t).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- IFVD


def naive_nearest(label: torch.Tensor, b: int, pos, size) -> int:
    src = tuple(int(math.floor(i * label.shape[2 + d] / size[d])) for d, i in enumerate(pos))
    return int(label[(b, 0, *src)])


def naive_ifv_map(f: torch.Tensor, label: torch.Tensor, b: int, num_classes: int) -> list[float]:
    spatial = f.shape[2:]
    lab = {pos: naive_nearest(label, b, pos, spatial) for pos in positions(spatial)}
    protos = {}
    for k in range(num_classes):
        members = [pos for pos in positions(spatial) if lab[pos] == k]
        protos[k] = [sum(float(f[(b, c, *pos)]) for pos in members) / (len(members) + 1e-6) for c in range(f.shape[1])]
    return [cosine(vec(f, b, pos), protos[lab[pos]] if lab[pos] in protos else vec(f, b, pos))
            for pos in positions(spatial)]


def naive_ifvd(s, t, label, num_classes) -> float:
    total = 0.0
    for b in range(s.shape[0]):
        ms, mt = naive_ifv_map(s, label, b, num_classes), naive_ifv_map(t, label, b, num_classes)
        total += sum((x - y) ** 2 for x, y in zip(ms, mt)) / len(ms)
    return total / s.shape[0]


@pytest.mark.parametrize("dims", [2, 3])
def test_ifvd_matches_naive(dims):
    torch.manual_seed(50 + dims)
    spatial = SHAPES[dims]
    s, t = torch.randn(2, 3, *spatial), torch.randn(2, 7, *spatial)  # channel counts differ: no adapter needed
    label = torch.randint(0, 3, (2, 1, *[2 * x for x in spatial]))  # label at twice the feature size
    label[0, 0, 0] = 255  # an ignore value: compared with its own feature
    loss_fn = IntraClassFeatureVariation(num_classes=3)
    assert loss_fn(s, t, label).item() == pytest.approx(naive_ifvd(s, t, label, 3), rel=1e-5)
    assert loss_fn(t.clone(), t, label).item() == pytest.approx(0.0, abs=1e-7)
    one_hot = F.one_hot(label.clamp_max(2)[:, 0], 3).movedim(-1, 1)
    label_clamped = label.clamp_max(2)
    assert loss_fn(s, t, one_hot).item() == pytest.approx(naive_ifvd(s, t, label_clamped, 3), rel=1e-5)


def test_ifvd_gradient_reaches_student_only():
    s = torch.randn(2, 3, 6, 5, requires_grad=True)
    t = torch.randn(2, 4, 6, 5, requires_grad=True)
    IntraClassFeatureVariation(2)(s, t, torch.randint(0, 2, (2, 1, 6, 5))).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# ----------------------------------------------------------------------------------------------------- FSP


def naive_fsp_matrix(a: torch.Tensor, c: torch.Tensor, b: int) -> list[list[float]]:
    pos = positions(a.shape[2:])
    return [[sum(float(a[(b, i, *p)]) * float(c[(b, j, *p)]) for p in pos) / len(pos) for j in range(c.shape[1])]
            for i in range(a.shape[1])]


def naive_fsp(s1, s2, t1, t2) -> float:
    total = 0.0
    for b in range(s1.shape[0]):
        gs, gt = naive_fsp_matrix(s1, s2, b), naive_fsp_matrix(t1, t2, b)
        total += sum((x - y) ** 2 for rs, rt in zip(gs, gt) for x, y in zip(rs, rt))
    return total / s1.shape[0]


def block_mean(f: torch.Tensor) -> torch.Tensor:
    """Average non-overlapping 2x2(x2) blocks by explicit loops."""
    out = torch.zeros(*f.shape[:2], *[s // 2 for s in f.shape[2:]])
    for b, c in itertools.product(range(f.shape[0]), range(f.shape[1])):
        for pos in positions(out.shape[2:]):
            block = [tuple(2 * p + o for p, o in zip(pos, off)) for off in itertools.product((0, 1), repeat=len(pos))]
            out[(b, c, *pos)] = sum(float(f[(b, c, *q)]) for q in block) / len(block)
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_fsp_matches_naive(dims):
    torch.manual_seed(60 + dims)
    spatial = SHAPES[dims]
    s1, s2 = torch.randn(2, 3, *spatial), torch.randn(2, 4, *spatial)
    t1, t2 = torch.randn(2, 3, *spatial), torch.randn(2, 4, *spatial)
    assert FSPLoss()(s1, s2, t1, t2).item() == pytest.approx(naive_fsp(s1, s2, t1, t2), rel=1e-5)
    assert FSPLoss()(t1.clone(), t2.clone(), t1, t2).item() == pytest.approx(0.0, abs=1e-7)
    # the larger tap is pooled to the smaller one's size
    big = {2: (4, 6), 3: (4, 2, 2)}[dims]
    s1, t1 = torch.randn(2, 3, *big), torch.randn(2, 3, *big)
    s2, t2 = torch.randn(2, 2, *[x // 2 for x in big]), torch.randn(2, 2, *[x // 2 for x in big])
    expected = naive_fsp(block_mean(s1), s2, block_mean(t1), t2)
    assert FSPLoss()(s1, s2, t1, t2).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- common


def _cases():
    s, t = torch.randn(3, 2, 6, 4), torch.randn(3, 4, 6, 4)
    label = torch.randint(0, 2, (3, 1, 6, 4))
    return [
        (AttentionTransfer, {}, (s, t)),
        (FitNetHint, {"student_channels": 2, "teacher_channels": 4}, (s, t)),
        (ChannelWiseDistillation, {"student_channels": 2, "teacher_channels": 4}, (s, t)),
        (PairwiseSimilarity, {}, (s, t)),
        (IntraClassFeatureVariation, {"num_classes": 2}, (s, t, label)),
        (FSPLoss, {}, (s, t, s.flip(0), t.flip(0))),
    ]


@pytest.mark.parametrize("index", range(6))
def test_reductions(index):
    torch.manual_seed(index)
    cls, kwargs, args = _cases()[index]
    torch.manual_seed(0)
    per_sample = cls(reduction="none", **kwargs)(*args)
    torch.manual_seed(0)  # same adapter initialisation
    mean = cls(reduction="mean", **kwargs)(*args)
    torch.manual_seed(0)
    total = cls(reduction="sum", **kwargs)(*args)
    assert per_sample.shape == (3,)
    assert mean.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert total.item() == pytest.approx(per_sample.sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="batchmean", **kwargs)


@pytest.mark.parametrize(
    "make,args,match",
    [
        (lambda: AttentionTransfer(p=0), None, "p must be positive"),
        (lambda: AttentionTransfer(), (torch.randn(2, 3, 4), torch.randn(2, 3, 4)), r"\(B, C, H, W\[, D\]\)"),
        (lambda: AttentionTransfer(), (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, 4)), "dimensionality"),
        (lambda: FitNetHint(3, 4, spatial_dims=4), None, "spatial_dims"),
        (lambda: FitNetHint(0, 4), None, "student_channels must be a positive"),
        (lambda: FitNetHint(3, 4), (torch.randn(2, 5, 4, 4), torch.randn(2, 4, 4, 4)), "student has 5 channels"),
        (lambda: FitNetHint(3, 4), (torch.randn(2, 3, 4, 4), torch.randn(2, 2, 4, 4)), "teacher has 2 channels"),
        (lambda: FitNetHint(3, 4), (torch.randn(2, 3, 4, 4, 4), torch.randn(2, 4, 4, 4, 4)), "spatial_dims=2"),
        (lambda: FitNetHint(3, 4), (torch.randn(2, 3, 4, 4), torch.randn(3, 4, 4, 4)), "batch sizes differ"),
        (lambda: ChannelWiseDistillation(temperature=0), None, "temperature must be positive"),
        (lambda: ChannelWiseDistillation(student_channels=3), None, "give both"),
        (lambda: ChannelWiseDistillation(), (torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)), "add an adapter"),
        (lambda: PairwiseSimilarity(scale=0), None, r"scale must be in \(0, 1\]"),
        (lambda: PairwiseSimilarity(scale=1.5), None, r"scale must be in \(0, 1\]"),
        (lambda: PairwiseSimilarity(pool="min"), None, "pool must be"),
        (lambda: IntraClassFeatureVariation(1), None, "num_classes must be at least 2"),
        (lambda: IntraClassFeatureVariation(3), (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
                                                 torch.zeros(2, 2, 4, 4)), "label must be"),
        (lambda: IntraClassFeatureVariation(3), (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
                                                 torch.zeros(2, 1, 4, 4, 4)), "label must be"),
        (lambda: FSPLoss(), (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4),
                             torch.randn(2, 3, 4, 4)), "equal widths"),
        (lambda: FSPLoss(), (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
                             torch.randn(2, 3, 4, 4, 4)), "dimensionality"),
    ],
)
def test_bad_input_raises_clear_errors(make, args, match):
    with pytest.raises(ValueError, match=match):
        loss_fn = make()
        loss_fn(*args)
