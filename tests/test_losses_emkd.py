"""EMKD losses against naive reference computations (explicit loops over samples, pixels and classes)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medkd.losses import ImportanceMapsDistillation, PredictionMapDistillation, RegionAffinityDistillation

SHAPES = {2: (6, 5), 3: (4, 5, 3)}


def positions(spatial):
    return list(itertools.product(*[range(s) for s in spatial]))


def naive_pmd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    """Mean over samples and pixels of T^2 * sum_k q_k (log q_k - log p_k), one pixel at a time."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for pos in positions(s.shape[2:]):
            zs = [float(s[(b, k, *pos)]) / temperature for k in range(s.shape[1])]
            zt = [float(t[(b, k, *pos)]) / temperature for k in range(s.shape[1])]
            ls = [z - math.log(sum(math.exp(v) for v in zs)) for z in zs]
            lt = [z - math.log(sum(math.exp(v) for v in zt)) for z in zt]
            total += sum(math.exp(a) * (a - c) for a, c in zip(lt, ls)) * temperature**2
            count += 1
    return total / count


def naive_attention(f: torch.Tensor, b: int, p: float) -> list[float]:
    vec = [sum(abs(float(f[(b, c, *pos)])) ** p for c in range(f.shape[1])) / f.shape[1] for pos in positions(f.shape[2:])]
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec]


def naive_imd(s: torch.Tensor, t: torch.Tensor, p: float) -> float:
    return sum(
        sum((a - c) ** 2 for a, c in zip(naive_attention(s, b, p), naive_attention(t, b, p))) for b in range(s.shape[0])
    ) / s.shape[0]


def naive_affinities(f: torch.Tensor, labels: torch.Tensor, b: int, num_classes: int) -> list[float]:
    """Centroids by explicit sums over the positions of each class (label already at the feature size)."""
    cents, counts = [], []
    for k in range(num_classes):
        pos_k = [pos for pos in positions(f.shape[2:]) if int(labels[(b, *pos)]) == k]
        counts.append(len(pos_k))
        sums = [sum(float(f[(b, c, *pos)]) for pos in pos_k) for c in range(f.shape[1])]
        denom = max(len(pos_k), 1) if k == 0 else len(pos_k) + 1
        cents.append([v / denom for v in sums])

    def cos(u, v):
        nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
        return sum(x * y for x, y in zip(u, v)) / max(nu * nv, 1e-8)

    return [cos(cents[0], cents[k]) for k in range(1, num_classes)]


def naive_rad(s, t, label_small, num_classes) -> float:
    total = 0.0
    for b in range(s.shape[0]):
        a_s = naive_affinities(s, label_small, b, num_classes)
        a_t = naive_affinities(t, label_small, b, num_classes)
        total += sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / len(a_s)
    return total / s.shape[0]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_pmd_matches_naive(dims, temperature):
    torch.manual_seed(dims)
    s, t = torch.randn(2, 3, *SHAPES[dims]) * 3, torch.randn(2, 3, *SHAPES[dims]) * 3
    got = PredictionMapDistillation(temperature)(s, t)
    assert got.item() == pytest.approx(naive_pmd(s, t, temperature), rel=1e-5)
    assert PredictionMapDistillation(temperature)(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_pmd_is_per_pixel_mean_not_batchmean():
    """The value must not grow with the image size: tiling the same logits 4x leaves it unchanged."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    loss = PredictionMapDistillation(4.0)
    assert loss(s.repeat(1, 1, 2, 2), t.repeat(1, 1, 2, 2)).item() == pytest.approx(loss(s, t).item(), rel=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("p", [2.0, 4.0, 3.0])
def test_imd_matches_naive(dims, p):
    torch.manual_seed(dims)
    s, t = torch.randn(2, 4, *SHAPES[dims]), torch.randn(2, 7, *SHAPES[dims])
    got = ImportanceMapsDistillation(p)(s, t)
    assert got.item() == pytest.approx(naive_imd(s, t, p), rel=1e-4)
    assert ImportanceMapsDistillation(p)(t, t.clone()).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("dims", [2, 3])
def test_imd_resizes_the_student_map_to_the_teacher_size(dims):
    torch.manual_seed(0)
    small = (3, 2) if dims == 2 else (2, 3, 2)
    big = tuple(2 * d for d in small)
    s, t = torch.randn(2, 4, *small), torch.randn(2, 6, *big)
    mode = "bilinear" if dims == 2 else "trilinear"
    a_s = F.interpolate(s.abs().pow(4).mean(1, keepdim=True), size=big, mode=mode, align_corners=False)
    a_t = t.abs().pow(4).mean(1, keepdim=True)
    q_s, q_t = a_s.flatten(1), a_t.flatten(1)
    expected = ((q_s / q_s.norm(dim=1, keepdim=True) - q_t / q_t.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    assert ImportanceMapsDistillation(4)(s, t).item() == pytest.approx(expected.item(), rel=1e-5)
    # as-released option: the feature is resized before the map
    s_big = F.interpolate(s, size=big, mode=mode, align_corners=False)
    assert ImportanceMapsDistillation(4, resize_feature=True)(s, t).item() == pytest.approx(
        ImportanceMapsDistillation(4)(s_big, t).item(), rel=1e-5
    )


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_rad_matches_naive(dims, num_classes):
    torch.manual_seed(10 * dims + num_classes)
    spatial = SHAPES[dims]
    full = tuple(2 * d for d in spatial)
    s, t = torch.randn(2, 4, *spatial), torch.randn(2, 9, *spatial)
    label = torch.randint(0, num_classes, (2, 1, *full))
    label_small = F.interpolate(label.float(), size=spatial, mode="nearest")[:, 0].long()
    got = RegionAffinityDistillation(num_classes)(s, t, label)
    assert got.item() == pytest.approx(naive_rad(s, t, label_small, num_classes), rel=1e-4, abs=1e-7)
    assert RegionAffinityDistillation(num_classes)(s, s.clone(), label).item() == pytest.approx(0.0, abs=1e-7)


def test_rad_nearest_mask_equals_resized_one_hot():
    """Resizing the index map then one-hot encoding (what the loss does) equals resizing the one-hot map."""
    torch.manual_seed(3)
    label = torch.randint(0, 3, (2, 1, 12, 10))
    onehot = F.one_hot(label[:, 0], 3).permute(0, 3, 1, 2).float()
    s, t = torch.randn(2, 4, 5, 4), torch.randn(2, 5, 5, 4)
    loss = RegionAffinityDistillation(3)
    assert loss(s, t, label).item() == pytest.approx(loss(s, t, onehot).item(), rel=1e-6)


def naive_rad_all_pairs(s, t, label_small, num_classes) -> float:
    """Every pair i < j of classes present in the sample; centroids as in the official code."""

    def cents(f, b):
        out, counts = [], []
        for k in range(num_classes):
            pos_k = [pos for pos in positions(f.shape[2:]) if int(label_small[(b, *pos)]) == k]
            counts.append(len(pos_k))
            denom = max(len(pos_k), 1) if k == 0 else len(pos_k) + 1
            out.append([sum(float(f[(b, c, *pos)]) for pos in pos_k) / denom for c in range(f.shape[1])])
        return out, counts

    def cos(u, v):
        nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
        return sum(x * y for x, y in zip(u, v)) / max(nu * nv, 1e-8)

    total = 0.0
    for b in range(s.shape[0]):
        (cs, counts), (ct, _) = cents(s, b), cents(t, b)
        pairs = [(i, j) for i in range(num_classes) for j in range(i + 1, num_classes) if counts[i] and counts[j]]
        total += sum((cos(cs[i], cs[j]) - cos(ct[i], ct[j])) ** 2 for i, j in pairs) / max(len(pairs), 1)
    return total / s.shape[0]


@pytest.mark.parametrize("dims", [2, 3])
def test_rad_all_pairs_matches_naive(dims):
    torch.manual_seed(7 + dims)
    spatial = SHAPES[dims]
    s, t = torch.randn(3, 4, *spatial), torch.randn(3, 6, *spatial)
    label = torch.randint(0, 4, (3, 1, *spatial))
    label[1][label[1] == 2] = 1  # class 2 absent from sample 1: its pairs are masked
    got = RegionAffinityDistillation(4, pairs="all")(s, t, label)
    assert got.item() == pytest.approx(naive_rad_all_pairs(s, t, label[:, 0], 4), rel=1e-4, abs=1e-7)
    binary = torch.randint(0, 2, (3, 1, *spatial))
    assert RegionAffinityDistillation(2, pairs="all")(s, t, binary).item() == pytest.approx(
        RegionAffinityDistillation(2)(s, t, binary).item(), rel=1e-6
    )


def test_rad_sums_stay_float32_under_autocast():
    torch.manual_seed(0)
    s, t = torch.randn(2, 8, 16, 16) * 50, torch.randn(2, 8, 16, 16) * 50
    label = torch.randint(0, 3, (2, 1, 32, 32))
    loss = RegionAffinityDistillation(3)
    expected = loss(s, t, label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(s, t, label)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_rad_binary_absent_foreground_contributes_zero():
    """An all-background sample: zero foreground centroid, zero affinity for both networks, no NaN."""
    s, t = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    value = RegionAffinityDistillation(2)(s, t, torch.zeros(1, 1, 8, 8))
    assert value.item() == 0.0
    all_fg = RegionAffinityDistillation(2)(s, t, torch.ones(1, 1, 8, 8))
    assert torch.isfinite(all_fg)


def test_rad_needs_equal_spatial_sizes():
    with pytest.raises(ValueError, match="same stride"):
        RegionAffinityDistillation(2)(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 8, 8), torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "loss, with_label",
    [(PredictionMapDistillation(4.0), False), (ImportanceMapsDistillation(4), False), (RegionAffinityDistillation(3), True)],
)
def test_gradients_reach_the_student_only(dims, loss, with_label):
    torch.manual_seed(0)
    spatial = SHAPES[dims]
    s = torch.randn(2, 3, *spatial, requires_grad=True)
    t = torch.randn(2, 3, *spatial, requires_grad=True)
    args = (s, t, torch.randint(0, 3, (2, 1, *spatial))) if with_label else (s, t)
    loss(*args).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("cls", [PredictionMapDistillation, ImportanceMapsDistillation])
def test_reduction_modes(cls):
    torch.manual_seed(1)
    s, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    per = cls(reduction="none")(s, t)
    assert per.shape == (3,)
    assert cls(reduction="mean")(s, t).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert cls(reduction="sum")(s, t).item() == pytest.approx(per.sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="batchmean")


def test_pmd_rejects_mismatched_logits():
    with pytest.raises(ValueError, match="differ"):
        PredictionMapDistillation()(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, H, W"):
        PredictionMapDistillation()(torch.randn(3, 4), torch.randn(3, 4))
