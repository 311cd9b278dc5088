"""GKD building blocks: MSAN (AlignmentNetwork), P-SAE (SemanticAutoEncoder), DCGD graphs, FSD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medkd.losses import ContrastiveGraphDistillation
from medkd.metrics import FrechetSemanticDistance, frechet_semantic_distance
from medkd.networks import AlignmentNetwork, SemanticAutoEncoder

# ---------------------------------------------------------------------------------------------------------------
# AlignmentNetwork (MSAN)


@pytest.mark.parametrize("size", [(16, 16), (12, 20), (7, 9), (1, 1)])
@pytest.mark.parametrize("batch", [1, 3])
def test_msan_shapes_2d(size, batch):
    torch.manual_seed(0)
    net = AlignmentNetwork(24, vector_dim=32, grid=8, hidden=16)
    if batch == 1 and size == (1, 1):
        net.eval()  # batch norm in training mode needs more than one value per channel
    f = torch.randn(batch, 24, *size)
    v, rec = net(f)
    assert v.shape == (batch, 32)
    assert rec.shape == f.shape
    assert net.header(net.encode(f), f.shape[2:]).shape == f.shape


def test_msan_shapes_3d_and_anisotropic_grid():
    torch.manual_seed(0)
    net = AlignmentNetwork(6, vector_dim=10, spatial_dims=3, grid=(2, 3, 4), hidden=8)
    f = torch.randn(2, 6, 5, 6, 7)
    v, rec = net(f)
    assert v.shape == (2, 10) and rec.shape == f.shape
    assert net.header(v, (3, 9, 4)).shape == (2, 6, 3, 9, 4)


def test_msan_header_exchange_between_teacher_and_student():
    """GKD's header exchange: FANet c4 (512 @ 16x16) and MobileNetV2-UNet x5 (1280 @ 4x4) share d = 512."""
    torch.manual_seed(0)
    tan = AlignmentNetwork(512, vector_dim=512).eval()
    san = AlignmentNetwork(1280, vector_dim=512).eval()
    f_t, f_s = torch.randn(2, 512, 16, 16), torch.randn(2, 1280, 4, 4)
    v_t, v_s = tan.encode(f_t), san.encode(f_s)
    assert v_t.shape == v_s.shape == (2, 512)
    assert tan.header(v_s, f_t.shape[2:]).shape == f_t.shape  # student vector in the teacher's feature space
    assert san.header(v_t, f_s.shape[2:]).shape == f_s.shape
    with pytest.raises(ValueError, match="1280"):
        san.encode(f_t)


def _naive_adaptive_pool_2d(x, out_h, out_w):
    """PyTorch's adaptive average pooling windows: [floor(i*In/Out), ceil((i+1)*In/Out))."""
    h, w = len(x), len(x[0])
    out = []
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            vals = [x[r][c] for r in range(r0, r1) for c in range(c0, c1)]
            out.append(sum(vals) / len(vals))
    return out


def _gelu(x):
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_msan_encode_equals_naive_loops():
    torch.manual_seed(3)
    c, d, grid, hidden = 3, 4, (2, 3), 5
    net = AlignmentNetwork(c, vector_dim=d, grid=grid, hidden=hidden).double().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters
        net.norm_in.running_mean.uniform_(-0.5, 0.5)
        net.norm_in.running_var.uniform_(0.5, 2.0)
        net.norm_in.weight.uniform_(0.5, 1.5)
        net.norm_in.bias.uniform_(-0.5, 0.5)
    f = torch.randn(2, c, 7, 9, dtype=torch.float64)
    got = net.encode(f)

    bn = net.norm_in
    w_in, b_in = net.project_in.weight[:, :, 0, 0].tolist(), net.project_in.bias.tolist()
    w1, b1 = net.down[0].weight.tolist(), net.down[0].bias.tolist()
    w2, b2 = net.down[3].weight[0].tolist(), net.down[3].bias.item()
    x = f.tolist()
    for b in range(2):
        for o in range(d):
            proj = [[sum(w_in[o][k] * x[b][k][r][s] for k in range(c)) + b_in[o] for s in range(9)] for r in range(7)]
            scale = bn.weight[o].item() / math.sqrt(bn.running_var[o].item() + bn.eps)
            normed = [[(p - bn.running_mean[o].item()) * scale + bn.bias[o].item() for p in row] for row in proj]
            cells = _naive_adaptive_pool_2d(normed, *grid)
            hid = [_gelu(sum(w1[h][g] * cells[g] for g in range(len(cells))) + b1[h]) for h in range(hidden)]
            expected = sum(w2[h] * hid[h] for h in range(hidden)) + b2
            assert got[b, o].item() == pytest.approx(expected, abs=1e-10)


def test_msan_gradients_reach_input():
    torch.manual_seed(0)
    net = AlignmentNetwork(8, vector_dim=6, grid=4, hidden=8)
    f = torch.randn(2, 8, 10, 12, requires_grad=True)
    v, rec = net(f)
    (v.pow(2).sum() + rec.pow(2).mean()).backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_msan_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        AlignmentNetwork(8, spatial_dims=1)
    with pytest.raises(ValueError, match="grid"):
        AlignmentNetwork(8, grid=(4, 0))
    net = AlignmentNetwork(8, vector_dim=6)
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        net.header(torch.randn(2, 5), (4, 4))
    with pytest.raises(ValueError, match="spatial_size"):
        net.header(torch.randn(2, 6), (4, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# SemanticAutoEncoder (P-SAE)


def _onehot(label: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(label[:, 0].long(), k).movedim(-1, 1).float()


@pytest.mark.parametrize("size", [(32, 32), (30, 21), (17, 17)])
def test_psae_reconstruction_shape_2d(size):
    torch.manual_seed(0)
    sae = SemanticAutoEncoder(3, vector_dim=16, channels=(8, 16, 32, 32), grid=4, hidden=8)
    label = torch.randint(0, 3, (2, 1, *size))
    x = _onehot(label, 3)
    assert sae(x).shape == x.shape  # 30x21 and 17x17 are not divisible by the total stride 8
    assert sae.encode(x).shape == (2, 16)
    assert torch.allclose(sae.eval().code(label), sae.encode(x))


def test_psae_reconstruction_shape_3d():
    torch.manual_seed(0)
    sae = SemanticAutoEncoder(2, vector_dim=8, spatial_dims=3, channels=(4, 8), grid=2, hidden=4)
    x = _onehot(torch.randint(0, 2, (2, 1, 9, 8, 7)), 2)
    assert sae(x).shape == x.shape
    assert sae.encode(x).shape == (2, 8)


def test_psae_training_lowers_cross_entropy():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    r2 = (yy - 15.5) ** 2 + (xx - 15.5) ** 2
    label = ((r2 < 12**2).long() + (r2 < 6**2).long())[None, None]  # background / ring / disc
    x = _onehot(label, 3)
    sae = SemanticAutoEncoder(3, vector_dim=16, channels=(8, 16), grid=4, hidden=16)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(sae(x), label[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_psae_code_rejects_bad_labels():
    sae = SemanticAutoEncoder(3, vector_dim=8, channels=(4, 8), grid=2, hidden=4).eval()
    with pytest.raises(ValueError, match=r"\[3\].*0\.\.2"):
        sae.code(torch.tensor([[[[0, 1], [2, 3]]]]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        sae.code(torch.tensor([[[[0, -1], [2, 1]]]]))
    with pytest.raises(ValueError, match="non-integer"):
        sae.code(torch.tensor([[[[0.0, 0.5], [1.0, 1.0]]]]))
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        sae.code(torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 3, \*spatial\)"):
        sae(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        SemanticAutoEncoder(3, channels=(8,))


# ---------------------------------------------------------------------------------------------------------------
# ContrastiveGraphDistillation (DCGD)


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _softmax(z):
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    return [x / s for x in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def _naive_rows(student, teacher, graph, mode, tau):
    """Per-row values written with explicit loops over anchors / nodes / edges."""
    s = [[_unit(v) for v in views] for views in student.tolist()]
    t = [[_unit(v) for v in views] for views in teacher.tolist()]
    batch, n = len(s), len(s[0]) - 1
    rows = []
    if mode == "batch":
        aug_s = [s[b][a] for b in range(batch) for a in range(1, n + 1)]
        aug_t = [t[b][a] for b in range(batch) for a in range(1, n + 1)]
        if graph == "intra":
            for b in range(batch):
                p_t = _softmax([_dot(t[b][0], u) / tau for u in aug_t])
                p_s = _softmax([_dot(s[b][0], u) / tau for u in aug_s])
                rows.append(_kl(p_t, p_s))
        else:
            for i in range(len(aug_s)):
                others = [j for j in range(len(aug_s)) if j != i]
                q_t = _softmax([_dot(aug_t[i], aug_t[j]) / tau for j in others])
                q_s = _softmax([_dot(aug_s[i], aug_s[j]) / tau for j in others])
                rows.append(_kl(q_t, q_s))
    else:
        for b in range(batch):
            if graph == "intra":
                pairs = [(0, a) for a in range(1, n + 1)]
            else:
                pairs = [(a, c) for a in range(1, n + 1) for c in range(a + 1, n + 1)]
            diffs = [(_dot(s[b][i], s[b][j]) - _dot(t[b][i], t[b][j])) ** 2 for i, j in pairs]
            rows.append(sum(diffs) / len(diffs))
    return rows


# (graph, mode, B, N); inter needs N >= 2 in sample mode (sizes without a graph: test_dcgd_bad_shapes_and_arguments)
DCGD_CASES = [(g, m, b, n) for g in ("intra", "inter") for m in ("batch", "sample")
              for b, n in ((1, 2), (2, 1), (3, 4), (4, 2)) if not (g == "inter" and m == "sample" and n < 2)]


@pytest.mark.parametrize("graph,mode,batch,n", DCGD_CASES)
def test_dcgd_equals_naive_loops(graph, mode, batch, n):
    gen = torch.Generator().manual_seed(batch * 10 + n)
    student = torch.randn(batch, n + 1, 5, generator=gen, dtype=torch.float64)
    teacher = torch.randn(batch, n + 1, 5, generator=gen, dtype=torch.float64)
    tau = 0.3
    rows = _naive_rows(student, teacher, graph, mode, tau)
    got_none = ContrastiveGraphDistillation(graph, tau, mode, reduction="none")(student, teacher)
    assert got_none.shape == (len(rows),)
    assert got_none.tolist() == pytest.approx(rows, abs=1e-10)
    mean = ContrastiveGraphDistillation(graph, tau, mode)(student, teacher)
    total = ContrastiveGraphDistillation(graph, tau, mode, reduction="sum")(student, teacher)
    assert mean.item() == pytest.approx(sum(rows) / len(rows), abs=1e-10)
    assert total.item() == pytest.approx(sum(rows), abs=1e-10)
    candidates = batch * n - (graph == "inter") if mode == "batch" else 2
    assert mean.item() > 0 if candidates > 1 else mean.item() == 0  # one candidate: both softmaxes are [1]
    # float32 inputs give the same value to float32 precision
    assert ContrastiveGraphDistillation(graph, tau, mode)(student.float(), teacher.float()).item() == pytest.approx(
        mean.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("graph", ["intra", "inter"])
@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_dcgd_zero_when_equal_and_teacher_gets_no_gradient(graph, mode):
    torch.manual_seed(0)
    teacher = torch.randn(3, 4, 8)
    loss = ContrastiveGraphDistillation(graph, 0.1, mode)
    assert loss(teacher.clone(), teacher).abs().item() < 1e-6
    assert loss(3.0 * teacher, teacher).abs().item() < 1e-6  # vectors are normalised
    student = torch.randn(3, 4, 8, requires_grad=True)
    teacher.requires_grad_(True)
    loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("graph", ["intra", "inter"])
def test_dcgd_temperature(graph):
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(3, 3, 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 3, 6, generator=gen, dtype=torch.float64)
    for tau in (0.05, 0.5, 2.0):
        rows = _naive_rows(student, teacher, graph, "batch", tau)
        got = ContrastiveGraphDistillation(graph, tau)(student, teacher).item()
        assert got == pytest.approx(sum(rows) / len(rows), rel=1e-9)
    # KL(softmax(z_T / tau) || softmax(z_S / tau)) = Var_uniform(z_T - z_S) / (2 tau^2) + O(tau^-3):
    # doubling a large temperature divides the loss by 4
    big, bigger = (ContrastiveGraphDistillation(graph, tau)(student, teacher).item() for tau in (1000.0, 2000.0))
    assert big / bigger == pytest.approx(4.0, rel=1e-2)
    # the sample mode does not use the temperature
    sample = [ContrastiveGraphDistillation(graph, tau, "sample")(student, teacher).item() for tau in (0.1, 5.0)]
    assert sample[0] == pytest.approx(sample[1], rel=1e-12)


def test_dcgd_bad_shapes_and_arguments():
    v = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"\(B, N\+1, d\)"):
        ContrastiveGraphDistillation()(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        ContrastiveGraphDistillation()(v, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="N >= 1"):
        ContrastiveGraphDistillation()(torch.randn(2, 1, 4), torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        ContrastiveGraphDistillation("inter", mode="sample")(torch.randn(4, 2, 4), torch.randn(4, 2, 4))
    with pytest.raises(ValueError, match="B\\*N >= 2"):
        ContrastiveGraphDistillation("inter")(torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="graph"):
        ContrastiveGraphDistillation("star")
    with pytest.raises(ValueError, match="mode"):
        ContrastiveGraphDistillation(mode="pixel")
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveGraphDistillation(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        ContrastiveGraphDistillation(reduction="batchmean")


# ---------------------------------------------------------------------------------------------------------------
# FSD


def _psd_sqrt(m):
    w, u = np.linalg.eigh((m + m.T) / 2)
    return (u * np.sqrt(np.clip(w, 0, None))) @ u.T


def _frechet_direct(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2),
    the latter a symmetric PSD matrix, so its root comes from an eigendecomposition (no sqrtm)."""
    r1 = _psd_sqrt(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def _fsd_direct(a, b):
    stats = []
    for x in (a, b):
        mu = x.sum(axis=0) / len(x)
        xc = x - mu
        stats += [mu, xc.T @ xc / (len(x) - 1)]
    return _frechet_direct(*stats)


def test_fsd_identical_sets_is_zero():
    a = np.random.default_rng(0).normal(size=(50, 4))
    value = frechet_semantic_distance(a, a)
    assert abs(value) < 1e-6 and value.dim == 4 and (value.n_a, value.n_b) == (50, 50)


def test_fsd_equals_direct_formula_numpy_and_torch():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(loc=0.7, size=(60, 5)) @ rng.normal(size=(5, 5))
    expected = _fsd_direct(a, b)
    assert frechet_semantic_distance(a, b) == pytest.approx(expected, rel=1e-7)
    assert frechet_semantic_distance(a, b, max_dim=None) == pytest.approx(expected, rel=1e-7)
    assert frechet_semantic_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(
        expected, rel=1e-4)
    assert frechet_semantic_distance(a, b).dim == 5


def test_fsd_large_gaussian_samples_match_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.5])
    l1 = np.array([[1.0, 0, 0], [0.5, 1.2, 0], [-0.3, 0.2, 0.8]])
    l2 = np.array([[0.7, 0, 0], [0.1, 0.9, 0], [0.4, -0.5, 1.5]])
    s1, s2 = l1 @ l1.T, l2 @ l2.T
    a = rng.multivariate_normal(mu1, s1, size=20000)
    b = rng.multivariate_normal(mu2, s2, size=20000)
    closed = _frechet_direct(mu1, s1, mu2, s2)
    assert closed > 1.0
    assert frechet_semantic_distance(a, b) == pytest.approx(closed, rel=0.05, abs=0.05)


def test_fsd_diagonal_covariances_hand_worked():
    """Exact sample means and diagonal sample covariances: FSD = sum (mu1 - mu2)^2 + sum (sigma1 - sigma2)^2."""
    rng = np.random.default_rng(3)

    def exact(mu, sigma, n):
        z = rng.normal(size=(n, 3))
        z -= z.mean(axis=0)
        z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1))).T  # sample covariance exactly I
        return mu + z * sigma

    a = exact(np.array([1.0, 0.0, 2.0]), np.array([1.0, 2.0, 0.5]), 300)
    b = exact(np.array([0.0, 0.5, 2.0]), np.array([2.0, 2.0, 1.5]), 500)
    # (1 + 0.25 + 0) + (1 + 0 + 1) = 3.25
    assert frechet_semantic_distance(a, b) == pytest.approx(3.25, abs=1e-8)


def test_fsd_small_sample_projection():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(6, 32)), rng.normal(loc=0.3, size=(9, 32))
    value = frechet_semantic_distance(a, b)
    assert value.dim == 5 and math.isfinite(value)
    # independent projection: SVD of the pooled, centred vectors, top 5 right singular vectors
    pooled = np.concatenate([a, b])
    _, _, vt = np.linalg.svd(pooled - pooled.mean(axis=0), full_matrices=False)
    assert value == pytest.approx(_fsd_direct(a @ vt[:5].T, b @ vt[:5].T), rel=1e-7)
    forced = frechet_semantic_distance(a, b, max_dim=3)
    assert forced.dim == 3 and forced == pytest.approx(_fsd_direct(a @ vt[:3].T, b @ vt[:3].T), rel=1e-7)
    assert frechet_semantic_distance(a, b, max_dim=None).dim == 32
    two = frechet_semantic_distance(a[:2], b[:2])
    assert two.dim == 1 and math.isfinite(two)


def test_fsd_accumulator_matches_function():
    rng = np.random.default_rng(5)
    a_parts = [rng.normal(size=(n, 6)) for n in (3, 7, 5)]
    b_parts = [rng.normal(loc=0.2, size=(n, 6)) for n in (4, 9)]
    metric = FrechetSemanticDistance()
    metric.update(a_parts[0], b_parts[0])
    metric.update(torch.from_numpy(a_parts[1]), None)
    metric.update(None, b_parts[1])
    metric.update(a_parts[2])
    got = metric.compute()
    expected = frechet_semantic_distance(np.concatenate(a_parts), np.concatenate(b_parts))
    assert got == {"fsd": pytest.approx(float(expected), rel=1e-10), "dim": 6, "n_a": 15, "n_b": 13}
    small = FrechetSemanticDistance(max_dim="auto")
    small.update(a_parts[0], b_parts[0])
    assert small.compute()["dim"] == 2
    metric.reset()
    with pytest.raises(ValueError, match="both sets"):
        metric.compute()
    metric.update(a_parts[0])
    with pytest.raises(ValueError, match="length 5"):
        metric.update(rng.normal(size=(3, 5)))


def test_fsd_bad_inputs():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_semantic_distance(rng.normal(size=(1, 3)), rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="same vector length"):
        frechet_semantic_distance(rng.normal(size=(4, 3)), rng.normal(size=(5, 2)))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        frechet_semantic_distance(rng.normal(size=(4, 3, 2)), rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="max_dim"):
        frechet_semantic_distance(rng.normal(size=(4, 3)), rng.normal(size=(5, 3)), max_dim=0)
    with pytest.raises(ValueError, match="NaN"):
        frechet_semantic_distance(np.full((4, 3), np.nan), rng.normal(size=(5, 3)))
