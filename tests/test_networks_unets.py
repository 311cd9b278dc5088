"""FANet (Graph Flow / GKD teacher) and the MTMS-CKD U-Nets: parameter counts, logits and tap shapes, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from medkd.networks.fanet import FANet, GatedStripPooling, SKBlock, SKConv, SKDoubleConv, StripPooling
from medkd.networks.taps import resolve_tap
from medkd.networks.unet import MultiTaskUNet, SharedEncoderUNet, SmallUNet


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- hand-written parameter formulas (conv weights + biases, BN gamma + beta) ----------------------------------


def conv_bn(cin: int, cout: int, k: int | tuple[int, int], bias: bool = False) -> int:
    kh, kw = (k, k) if isinstance(k, int) else k
    return cin * cout * kh * kw + (cout if bias else 0) + 2 * cout


def skconv_formula(c: int, r: int = 2) -> int:
    s = c // r
    branches = conv_bn(c, c, 5, bias=True) + conv_bn(c, c, 3, bias=True)
    squeeze = conv_bn(c, s, 1, bias=True)
    excite = 2 * (s * c + c)
    return branches + squeeze + excite


def skblock_formula(cin: int, cout: int, r: int = 2) -> int:
    shortcut = conv_bn(cin, cout, 1) if cin != cout else 0
    return conv_bn(cin, cout, 1) + skconv_formula(cout, r) + 2 * cout + conv_bn(cout, cout, 1) + shortcut


def double_formula(cin: int, cout: int) -> int:
    return skblock_formula(cin, cout) + skblock_formula(cout, cout)


def strip_formula(c: int, gated: bool = False) -> int:
    h = c // 2 if gated else c  # width of the two pooled 3x3 convs
    mix_in = c + 2 * h if gated else c
    return (2 * conv_bn(c, c, 1) + conv_bn(c, c, 3) + 2 * conv_bn(c, h, 3) + conv_bn(c, c, (1, 3))
            + conv_bn(c, c, (3, 1)) + conv_bn(mix_in, c, 3) + conv_bn(c, c, 3) + conv_bn(2 * c, c, 1))


def fanet_formula(cin: int, k: int) -> int:
    encoder = double_formula(cin, 64) + double_formula(64, 128) + double_formula(128, 256) + double_formula(256, 512)
    ups = sum(a * b * 4 + b for a, b in [(512, 256), (256, 128), (128, 64)])
    decoder = double_formula(512, 256) + double_formula(256, 128) + double_formula(128, 64)
    attention = strip_formula(256) + strip_formula(128) + strip_formula(64, gated=True)
    return encoder + ups + decoder + attention + 64 * k + k


@pytest.mark.parametrize("c, r", [(64, 2), (256, 2), (48, 4)])
def test_skconv_param_count_matches_formula(c, r):
    assert n_params(SKConv(c, r)) == skconv_formula(c, r)


@pytest.mark.parametrize("cin, cout", [(1, 64), (128, 64), (64, 64)])
def test_skblock_param_count_matches_formula(cin, cout):
    assert n_params(SKBlock(cin, cout)) == skblock_formula(cin, cout)
    assert n_params(SKDoubleConv(cin, cout)) == double_formula(cin, cout)


@pytest.mark.parametrize("c", [64, 128])
def test_strip_pooling_param_counts_match_formula(c):
    assert n_params(StripPooling(c, (3, 6))) == strip_formula(c)
    assert n_params(GatedStripPooling(c, (3, 6))) == strip_formula(c, gated=True)


def test_fanet_param_count(built):
    net = built["FANet"]  # FANet(in_channels=1, out_channels=2)
    total = n_params(net)
    assert total == fanet_formula(1, 2)
    assert abs(total - 38.250e6) / 38.250e6 < 0.01
    # The published 38.250 M is a thop count that skips the SynchronizedBatchNorm layers: convolutions only.
    bn = sum(n_params(m) for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert f"{(total - bn) / 1e6:.3f}" == "38.250"


@pytest.mark.parametrize("name, expected", [("S1", 57_297), ("S2", 227_233), ("T1", 43_236_036)])
def test_mtms_param_counts_exact(built, name, expected):
    assert n_params(built[name]) == expected


# ---- logits and tap shapes -------------------------------------------------------------------------------------


def fanet_shapes(s: int) -> dict[str, tuple[int, ...]]:
    return {
        "logits": (1, 2, s, s),
        "enc0": (1, 64, s, s),
        "enc1": (1, 128, s // 2, s // 2),
        "low": (1, 128, s // 2, s // 2),
        "enc2": (1, 256, s // 4, s // 4),
        "dec2": (1, 256, s // 4, s // 4),
        "enc3": (1, 512, s // 8, s // 8),
        "high": (1, 512, s // 8, s // 8),
        "bottleneck": (1, 512, s // 8, s // 8),
    }


def small_unet_shapes(c: tuple[int, int, int], s: int) -> dict[str, tuple[int, ...]]:
    return {
        "logits": (1, 1, s, s),
        "enc1": (1, c[0], s // 2, s // 2),
        "low": (1, c[0], s // 2, s // 2),
        "enc2": (1, c[1], s // 4, s // 4),
        "bottleneck": (1, c[2], s // 4, s // 4),
        "dec1": (1, c[1], s // 2, s // 2),
        "dec0": (1, c[0], s, s),
    }


def multitask_shapes(s: int) -> dict[str, tuple[int, ...]]:
    return {
        "logits": (1, 1, s, s),
        "recon": (1, 3, s, s),
        "enc1": (1, 64, s // 2, s // 2),
        "low": (1, 64, s // 2, s // 2),
        "enc2": (1, 128, s // 4, s // 4),
        "enc3": (1, 256, s // 8, s // 8),
        "high": (1, 256, s // 8, s // 8),
        "enc4": (1, 512, s // 16, s // 16),
        "bottleneck": (1, 1024, s // 16, s // 16),
        "dec3": (1, 512, s // 8, s // 8),
        "dec2": (1, 256, s // 4, s // 4),
        "dec1": (1, 128, s // 2, s // 2),
        "dec0": (1, 64, s, s),
    }


NETWORKS = {
    "FANet": (lambda: FANet(1, 2), 1, fanet_shapes),
    "S1": (lambda: SmallUNet(), 3, lambda s: small_unet_shapes((16, 32, 64), s)),
    "S2": (lambda: SmallUNet(channels=(32, 64, 128)), 3, lambda s: small_unet_shapes((32, 64, 128), s)),
    "T1": (lambda: MultiTaskUNet(), 3, multitask_shapes),
}


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {name: make().eval() for name, (make, _, _) in NETWORKS.items()}


@pytest.fixture(scope="module")
def built_on_meta():
    """The same networks on the meta device: shapes propagate through every module without computing anything."""
    with torch.device("meta"):
        return {name: make().eval() for name, (make, _, _) in NETWORKS.items()}


def run_with_taps(net: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Logits and every tap's outputs (one list entry per hook call) of one forward pass."""
    calls: dict[str, list[torch.Tensor]] = {alias: [] for alias in net.tap_points}
    handles = [
        resolve_tap(net, alias).register_forward_hook(lambda m, i, o, alias=alias: calls[alias].append(o))
        for alias in net.tap_points
    ]
    try:
        with torch.no_grad():
            calls["logits"] = [net(x)]
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("size, device", [(256, "cpu"), (224, "meta")])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_logits_and_tap_shapes(built, built_on_meta, name, size, device):
    """A real forward at 256; at 224 the same code runs on the meta device (shapes only, keeps the file fast)."""
    net = built[name] if device == "cpu" else built_on_meta[name]
    _, cin, shapes = NETWORKS[name]
    expected = shapes(size)
    assert set(net.tap_points) | {"logits"} == set(expected)
    calls = run_with_taps(net, torch.randn(1, cin, size, size, device=device))
    got = {alias: [tuple(t.shape) for t in outs] for alias, outs in calls.items()}
    assert got == {alias: [shape] for alias, shape in expected.items()}  # each tapped module runs exactly once


def test_fanet_taps_are_the_graph_flow_and_gkd_features(built):
    """enc2 = c3, dec2 = up_7 (before the concat), bottleneck = c4: the official (c3, up_7) builds."""
    net = built["FANet"]
    assert resolve_tap(net, "enc2") is net.conv3
    assert resolve_tap(net, "dec2") is net.up7
    assert resolve_tap(net, "bottleneck") is net.conv4


def test_multitask_forward_tasks_matches_forward_and_recon_tap():
    torch.manual_seed(0)
    net = MultiTaskUNet(channels=(4, 8, 16, 32, 64)).eval()
    x = torch.randn(2, 3, 32, 32)
    calls = run_with_taps(net, x)
    with torch.no_grad():
        seg, recon = net.forward_tasks(x)
    assert seg.shape == (2, 1, 32, 32) and recon.shape == (2, 3, 32, 32)
    torch.testing.assert_close(seg, calls["logits"][0], rtol=0, atol=0)
    torch.testing.assert_close(recon, calls["recon"][0], rtol=0, atol=0)
    assert not torch.equal(recon[:, :1], seg)  # two different decoders


def test_shared_encoder_unet_generalises_to_more_levels():
    net = SharedEncoderUNet(2, 4, channels=(4, 8, 16, 32), convs_per_block=2, aux_out_channels=(1, 2)).eval()
    calls = run_with_taps(net, torch.randn(1, 2, 32, 32))
    got = {alias: tuple(outs[0].shape) for alias, outs in calls.items()}
    assert got == {
        "logits": (1, 4, 32, 32),
        "enc1": (1, 4, 16, 16), "low": (1, 4, 16, 16), "enc2": (1, 8, 8, 8), "enc3": (1, 16, 4, 4),
        "high": (1, 16, 4, 4), "bottleneck": (1, 32, 4, 4),
        "dec2": (1, 16, 8, 8), "dec1": (1, 8, 16, 16), "dec0": (1, 4, 32, 32),
    }
    with torch.no_grad():
        assert [tuple(o.shape) for o in net.forward_all(torch.randn(1, 2, 32, 32))] == [
            (1, 4, 32, 32), (1, 1, 32, 32), (1, 2, 32, 32)]


# ---- FANet building blocks -------------------------------------------------------------------------------------


def test_fanet_init_is_xavier_uniform_and_unit_bn(built):
    net = built["FANet"]
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = net.conv4.conv[0].conv2[0].conv1[0].weight  # 512x512 5x5: std of U(-b, b) is b / sqrt(3)
    bound = math.sqrt(6.0 / (2 * 512 * 25))
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01 * bound


def test_skconv_output_is_a_convex_mix_of_its_branches():
    torch.manual_seed(1)
    sk = SKConv(8).eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        a, b, y = sk.conv1(x), sk.conv2(x), sk(x)
    assert torch.all(y >= torch.minimum(a, b) - 1e-6) and torch.all(y <= torch.maximum(a, b) + 1e-6)
    assert not torch.allclose(y, (a + b) / 2)  # attention weights are not uniform


@pytest.mark.parametrize("module", [StripPooling(8, (3, 6)), GatedStripPooling(8, (3, 6))], ids=["sp", "gated"])
def test_strip_pooling_keeps_shape_and_is_residual(module):
    module.eval()
    x = torch.randn(1, 8, 20, 28)
    with torch.no_grad():
        y = module(x)
        for p in module.conv3[1].parameters():  # zero the fusion BN: the branch adds nothing, out = relu(x)
            p.zero_()
        y0 = module(x)
    assert y.shape == x.shape and not torch.allclose(y, torch.relu(x))
    torch.testing.assert_close(y0, torch.relu(x))
