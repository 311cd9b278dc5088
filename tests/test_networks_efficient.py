"""The lightweight students ENet, ERFNet and ESPNet: sizes, logits and tap shapes, every layer runs once."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.distill.taps import FeatureTaps
from medkd.networks.enet import ENet, max_unpool2x2
from medkd.networks.erfnet import ERFNet
from medkd.networks.espnet import ESPBlock, ESPNet
from medkd.networks.taps import resolve_tap, tap_points_of

NETWORKS = [ENet, ERFNet, ESPNet]

# alias -> (channels, stride) for in_channels=1
TAPS = {
    ENet: {"low": (16, 2), "enc2": (64, 4), "enc3": (128, 8), "high": (128, 8), "dec2": (64, 4)},
    ERFNet: {"low": (16, 2), "enc2": (64, 4), "enc3": (128, 8), "high": (128, 8), "dec2": (64, 4)},
    ESPNet: {"low": (16, 2), "enc2": (129, 4), "enc3": (256, 8), "high": (256, 8)},
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cls, published", [(ENet, 0.349e6), (ERFNet, 2.063e6)])
def test_parameters_within_1_percent_of_published(cls, published):
    """Graph Flow README: ENet 0.349 M, ERFNet 2.063 M for 1 input channel and 2 classes."""
    assert abs(n_params(cls(in_channels=1, out_channels=2)) - published) <= 0.01 * published


def esp_block_params(cin: int, cout: int, reduce_kernel: int) -> int:
    """Hand count of an ESP block: reduction conv, 5 dilated 3x3 branches, BatchNorm (2/ch) and PReLU (1/ch)."""
    n = cout // 5
    return cin * n * reduce_kernel**2 + 9 * n * (cout - 4 * n) + 4 * 9 * n * n + 3 * cout


def test_esp_block_parameters_by_hand():
    # ESP(64 -> 64): n = 12, first branch 16 maps: 64*12 + 9*12*16 + 4*9*12*12 + 3*64
    assert n_params(ESPBlock(64, 64)) == 768 + 1728 + 5184 + 192 == esp_block_params(64, 64, 1)
    assert n_params(ESPBlock(129, 128, downsample=True, residual=False)) == esp_block_params(129, 128, 3)


def espnet_params(cin: int, c: int, p: int, q: int, fusion: int) -> int:
    """Hand sum over ESPNet's layers (conv weights; 2 BatchNorm + 1 PReLU parameters per BR channel)."""
    encoder = (
        cin * 16 * 9 + 3 * 16  # level1 CBR
        + 3 * (16 + cin)  # b1
        + esp_block_params(16 + cin, 64, 3) + p * esp_block_params(64, 64, 1)
        + 3 * (128 + cin)  # b2
        + esp_block_params(128 + cin, 128, 3) + q * esp_block_params(128, 128, 1)
        + 3 * 256  # b3
    )
    decoder = (
        256 * c + 2 * c  # level-3 classifier + BatchNorm
        + 4 * c * c  # up_l3
        + (128 + cin) * c  # level-2 classifier
        + 3 * 2 * c + esp_block_params(2 * c, fusion, 1)  # combine_l2_l3
        + 4 * fusion * c + 3 * c  # up_l2
        + 9 * (16 + cin + c) * c + 3 * c  # merge_l1 CBR
        + 4 * c * c  # classifier
    )
    return encoder + decoder


@pytest.mark.parametrize("cin, c, p, q, fusion", [(1, 2, 2, 3, 5), (3, 2, 2, 3, 5), (3, 20, 2, 8, 20), (1, 2, 4, 5, 5)])
def test_espnet_parameters_by_hand(cin, c, p, q, fusion):
    assert n_params(ESPNet(in_channels=cin, out_channels=c, p=p, q=q)) == espnet_params(cin, c, p, q, fusion)


def test_espnet_depth_adds_one_esp_block_per_step():
    base = n_params(ESPNet(p=2, q=3))
    assert n_params(ESPNet(p=3, q=3)) - base == esp_block_params(64, 64, 1) == 7872
    assert n_params(ESPNet(p=2, q=4)) - base == esp_block_params(128, 128, 1)


def test_espnet_fusion_block_never_degenerate():
    """The original's fusion ESP block would have 0-map branches for < 5 classes; ours keeps >= 5 maps."""
    assert ESPNet(out_channels=2).combine_l2_l3[1].reduce.out_channels == 1
    assert ESPNet(out_channels=20).combine_l2_l3[1].norm_act.N.num_features == 20
    with pytest.raises(ValueError):
        ESPNet(out_channels=2, fusion_channels=4)


def test_max_unpool2x2_matches_torch():
    x = torch.randn(2, 3, 8, 12)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    assert torch.equal(max_unpool2x2(pooled, indices), F.max_unpool2d(pooled, indices, 2, 2))


@pytest.mark.parametrize("cls", NETWORKS)
def test_tap_points_resolve(cls):
    net = cls()
    assert set(tap_points_of(net)) == set(TAPS[cls])
    modules = dict(net.named_modules())
    for alias, path in net.tap_points.items():
        assert resolve_tap(net, alias) is modules[path]


@pytest.mark.parametrize("cls", NETWORKS)
@pytest.mark.parametrize("size", [256, 224])
def test_logits_and_tap_shapes(cls, size):
    torch.manual_seed(0)
    net = cls(in_channels=1, out_channels=2).eval()
    taps = FeatureTaps(net, {alias: alias for alias in TAPS[cls]})
    with torch.no_grad(), taps.capture() as features:
        logits = net(torch.randn(1, 1, size, size))
        taps.check_captured(features)
        shapes = {alias: tuple(f.shape) for alias, f in features.items()}
    assert logits.shape == (1, 2, size, size)
    assert shapes == {alias: (1, c, size // s, size // s) for alias, (c, s) in TAPS[cls].items()}


@pytest.mark.parametrize("cls", NETWORKS)
def test_every_parameterised_module_runs_exactly_once(cls):
    """Catches layers defined but skipped in forward (EMKD's ENet never calls bottleneck3_5)."""
    net = cls().eval()
    calls: dict[str, int] = {}
    owners = {name: m for name, m in net.named_modules() if any(True for _ in m.parameters(recurse=False))}
    for name, m in owners.items():
        m.register_forward_hook(lambda mod, args, out, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    with torch.no_grad():
        net(torch.randn(1, 1, 64, 64))
    assert calls == {name: 1 for name in owners}


def test_enet_runs_all_eight_stage3_bottlenecks():
    net = ENet().eval()
    assert len(net.stage3) == 8 and len(net.stage2) == 8
    ran = []
    for i, block in enumerate(net.stage3):
        block.register_forward_hook(lambda mod, args, out, i=i: ran.append(i))
    with torch.no_grad():
        net(torch.randn(1, 1, 64, 64))
    assert ran == list(range(8))


@pytest.mark.parametrize("cls", NETWORKS)
def test_no_inplace_layers(cls):
    """Tap outputs must never be overwritten in place."""
    assert not [n for n, m in cls().named_modules() if getattr(m, "inplace", False)]
