"""DISTLoss and SoftDiceDistillation against naive references (explicit loops over pixels and classes, hand values,
identities), in 2D and 3D."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from monai.losses import DiceLoss

from medkd.losses import DISTLoss, SoftDiceDistillation, pearson_distance

SHAPES = {2: (5, 4), 3: (3, 4, 2)}


def positions(spatial):
    return list(itertools.product(*[range(s) for s in spatial]))


def softmax(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def pearson(u: list[float], v: list[float]) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    su, sv = math.sqrt(sum((a - mu) ** 2 for a in u)), math.sqrt(sum((b - mv) ** 2 for b in v))
    return cov / (su * sv)


def probabilities(x: torch.Tensor, temperature: float) -> dict:
    """(b, pixel) -> class-probability list, one pixel at a time."""
    return {(b, pos): softmax([float(x[(b, k, *pos)]) for k in range(x.shape[1])], temperature)
            for b in range(x.shape[0]) for pos in positions(x.shape[2:])}


def naive_dist(s: torch.Tensor, t: torch.Tensor, temperature: float, beta: float, gamma: float) -> float:
    ps, pt = probabilities(s, temperature), probabilities(t, temperature)
    inter = sum(1 - pearson(ps[key], pt[key]) for key in ps) / len(ps)
    classes = s.shape[1]
    intra = sum(1 - pearson([ps[key][c] for key in ps], [pt[key][c] for key in ps]) for c in range(classes)) / classes
    return temperature**2 * (beta * inter + gamma * intra)


def naive_soft_dice(s: torch.Tensor, t: torch.Tensor, temperature: float, batch: bool, smooth: float) -> list[float]:
    """Soft Dice with the L1 overlap: 1 - (2 sum min(p, q) + smooth) / (sum p + sum q + smooth), per class; the mean
    over classes, per sample (``batch=False``) or over the whole batch (one value)."""
    ps, pt = probabilities(s, temperature), probabilities(t, temperature)
    groups = [list(ps)] if batch else [[key for key in ps if key[0] == b] for b in range(s.shape[0])]
    out = []
    for keys in groups:
        losses = []
        for c in range(s.shape[1]):
            overlap = sum(min(ps[k][c], pt[k][c]) for k in keys)
            total = sum(ps[k][c] + pt[k][c] for k in keys)
            losses.append(1 - (2 * overlap + smooth) / (total + smooth))
        out.append(sum(losses) / len(losses))
    return out


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("temperature, beta, gamma", [(1.0, 1.0, 1.0), (4.0, 0.5, 2.0)])
def test_dist_matches_naive_loops(dims, temperature, beta, gamma):
    g = torch.Generator().manual_seed(dims)
    s, t = torch.randn(2, 3, *SHAPES[dims], generator=g) * 2, torch.randn(2, 3, *SHAPES[dims], generator=g) * 2
    value = DISTLoss(beta=beta, gamma=gamma, temperature=temperature)(s, t)
    assert value.ndim == 0
    assert float(value) == pytest.approx(naive_dist(s.double(), t.double(), temperature, beta, gamma), rel=1e-4)


def test_dist_hand_value_two_classes():
    """With 2 classes the centred probability vector at a pixel is (p - 1/2, 1/2 - p): the per-pixel correlation is
    +1 where student and teacher pick the same class and -1 where they do not, so inter = 2 x the disagreement share."""
    s = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0]).view(1, 1, 2, 3)
    t = torch.tensor([1.0, -3.0, -0.5, 1.0, 2.0, 4.0]).view(1, 1, 2, 3)  # disagree at 2 of 6 pixels
    s2, t2 = torch.cat([torch.zeros_like(s), s], 1), torch.cat([torch.zeros_like(t), t], 1)
    inter, intra = DISTLoss().relations(s2, t2)
    assert float(inter) == pytest.approx(2 * 2 / 6, abs=1e-6)
    # both classes' maps are p and 1 - p: equal correlations, so intra is 1 - r of the class-1 probabilities
    p_s, p_t = torch.sigmoid(s).flatten().tolist(), torch.sigmoid(t).flatten().tolist()
    assert float(intra) == pytest.approx(1 - pearson(p_s, p_t), abs=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_dist_identities(dims):
    g = torch.Generator().manual_seed(10 + dims)
    s = torch.randn(2, 4, *SHAPES[dims], generator=g)
    assert float(DISTLoss()(s, s.clone())) == pytest.approx(0.0, abs=1e-6)
    # softmax ignores a per-pixel shift of the logits
    assert float(DISTLoss()(s + torch.randn(2, 1, *SHAPES[dims], generator=g), s)) == pytest.approx(0.0, abs=1e-6)
    # the opposite prediction is as far as it gets for the inter-class term at every pixel with 2 classes
    two = torch.randn(2, 2, *SHAPES[dims], generator=g)
    inter, intra = DISTLoss().relations(two, -two)
    assert float(inter) == pytest.approx(2.0, abs=1e-4) and float(intra) == pytest.approx(2.0, abs=1e-4)


def test_pearson_distance_is_affine_invariant_where_it_should_be():
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g)
    base = pearson_distance(x, y, dim=1)
    # per-pixel positive scale and offset along the class axis (inter-class relation)
    a, b = torch.rand(2, 1, 4, 5, generator=g) + 0.1, torch.randn(2, 1, 4, 5, generator=g)
    torch.testing.assert_close(pearson_distance(a * x + b, y, dim=1), base, atol=1e-5, rtol=1e-5)
    # per-class scale and offset over the pixels (intra-class relation on (C, N) maps)
    xc, yc = x.transpose(0, 1).reshape(3, -1), y.transpose(0, 1).reshape(3, -1)
    a_c, b_c = torch.rand(3, 1, generator=g) + 0.1, torch.randn(3, 1, generator=g)
    torch.testing.assert_close(pearson_distance(a_c * xc + b_c, yc), pearson_distance(xc, yc), atol=1e-5, rtol=1e-5)
    # a negative scale flips the correlation: not invariant
    assert not torch.allclose(pearson_distance(-x, y, dim=1), base)
    torch.testing.assert_close(pearson_distance(-x, y, dim=1), 2 - base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_dice_matches_naive_loops(dims, temperature):
    g = torch.Generator().manual_seed(20 + dims)
    s, t = torch.randn(3, 3, *SHAPES[dims], generator=g), torch.randn(3, 3, *SHAPES[dims], generator=g) * 3
    smooth = 1e-5
    batch = SoftDiceDistillation(temperature=temperature)(s, t)
    assert float(batch) == pytest.approx(naive_soft_dice(s.double(), t.double(), temperature, True, smooth)[0], rel=1e-4)
    per_sample = SoftDiceDistillation(temperature=temperature, batch=False, reduction="none")(s, t)
    expected = naive_soft_dice(s.double(), t.double(), temperature, False, smooth)
    assert per_sample.shape == (3,)
    assert per_sample.tolist() == pytest.approx(expected, rel=1e-4)
    mean = SoftDiceDistillation(temperature=temperature, batch=False)(s, t)
    assert float(mean) == pytest.approx(sum(expected) / 3, rel=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_soft_dice_identities(dims):
    g = torch.Generator().manual_seed(30 + dims)
    s = torch.randn(2, 3, *SHAPES[dims], generator=g)
    assert float(SoftDiceDistillation()(s, s.clone())) == pytest.approx(0.0, abs=1e-6)
    # a confident teacher is a hard label: the soft-label Dice equals MONAI's Dice against the one-hot label
    label = torch.randint(0, 3, (2, 1, *SHAPES[dims]), generator=g)
    teacher = 60.0 * torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float()
    hard = DiceLoss(softmax=True, to_onehot_y=True, batch=True)(s, label)
    assert float(SoftDiceDistillation()(s, teacher)) == pytest.approx(float(hard), abs=1e-5)


@pytest.mark.parametrize("loss", [DISTLoss(), DISTLoss(temperature=4.0), SoftDiceDistillation(),
                                  SoftDiceDistillation(temperature=2.0, batch=False)])
@pytest.mark.parametrize("dims", [2, 3])
def test_gradients_reach_the_student_only(loss, dims):
    g = torch.Generator().manual_seed(40 + dims)
    s = torch.randn(2, 3, *SHAPES[dims], generator=g, requires_grad=True)
    t = torch.randn(2, 3, *SHAPES[dims], generator=g, requires_grad=True)
    loss(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="temperature must be positive"):
        DISTLoss(temperature=0)
    with pytest.raises(ValueError, match="beta and gamma"):
        DISTLoss(beta=0, gamma=0)
    with pytest.raises(ValueError, match="differ"):
        DISTLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="at least 2 classes"):
        SoftDiceDistillation()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="needs batch=False"):
        SoftDiceDistillation(reduction="none")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\[, D\]\)"):
        SoftDiceDistillation()(torch.zeros(3, 4), torch.zeros(3, 4))
