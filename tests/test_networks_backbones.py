"""MobileNetV2- and ResNet-based networks: parameter counts, logits and tap shapes, ImageNet key layout, weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from medkd.distill import FeatureTaps
from medkd.networks import resolve_tap, tap_points_of
from medkd.networks.mobilenetv2 import InvertedResidual, MobileNetV2Backbone, MobileNetV2Seg, MobileNetV2UNet
from medkd.networks.resnet import PSPNet, RAUNet, ResNet18Seg, ResNetBackbone


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Torchvision's published ImageNet parameter totals minus the 512/2048 -> 1000 classifier.
RESNET18_NO_FC = 11_689_512 - (512 * 1000 + 1000)
RESNET34_NO_FC = 21_797_672 - (512 * 1000 + 1000)
RESNET50_NO_FC = 25_557_032 - (2048 * 1000 + 1000)
STEM_7X7_PER_INPUT_CHANNEL = 64 * 7 * 7


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {cls.__name__: cls(in_channels=1, out_channels=2).eval()
            for cls in (MobileNetV2UNet, MobileNetV2Seg, ResNet18Seg, RAUNet, PSPNet)}


# ---------------------------------------------------------------------------------------------- parameter counts


def test_mobile_unet_matches_published_4_640_m(nets):
    net = nets["MobileNetV2UNet"]
    total = n_params(net)
    assert abs(total - 4.640e6) / 4.640e6 < 0.01, total
    # Graph Flow's README figure (4.640 M) counts the conv and transposed-conv weights, not BatchNorm.
    convs = sum(n_params(m) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    assert round(convs / 1e6, 3) == 4.640, convs


@pytest.mark.parametrize("cin, cout, stride, t", [(48, 24, 1, 6), (32, 16, 1, 1), (24, 32, 2, 6)])
def test_inverted_residual_param_count(cin, cout, stride, t):
    hidden = cin * t
    expand = 0 if t == 1 else cin * hidden + 2 * hidden  # 1x1 conv (no bias) + BN
    depthwise = 9 * hidden + 2 * hidden
    project = hidden * cout + 2 * cout
    block = InvertedResidual(cin, cout, stride, t)
    assert n_params(block) == expand + depthwise + project
    assert block.residual == (stride == 1 and cin == cout)


def test_resnet_param_counts_match_imagenet_figures(nets):
    # one input channel instead of three in the 7x7 stem; 1x1 heads to 2 classes
    assert n_params(nets["ResNet18Seg"].encoder) == RESNET18_NO_FC - 2 * STEM_7X7_PER_INPUT_CHANNEL
    assert n_params(nets["ResNet18Seg"]) == RESNET18_NO_FC - 2 * STEM_7X7_PER_INPUT_CHANNEL + 512 * 2 + 2
    assert n_params(nets["RAUNet"].encoder) == RESNET34_NO_FC - 2 * STEM_7X7_PER_INPUT_CHANNEL
    # deep stem: 3x3 convs 1->64, 64->64, 64->128 (+BN) instead of the 7x7; layer1 takes 128 channels, not 64
    deep = (64 * 9 + 128) + (64 * 64 * 9 + 128) + (128 * 64 * 9 + 256) - 3 * STEM_7X7_PER_INPUT_CHANNEL - 128
    layer1_wider = (128 - 64) * 64 + (128 - 64) * 256
    assert n_params(nets["PSPNet"].encoder) == RESNET50_NO_FC + deep + layer1_wider
    psp_head = 4 * (2048 * 512 + 2 * 512) + (4096 * 512 * 9 + 2 * 512) + (512 * 2 + 2)
    assert n_params(nets["PSPNet"]) == n_params(nets["PSPNet"].encoder) + psp_head


# ------------------------------------------------------------------------------------------- shapes and taps

# alias -> (channels, stride) per network
EXPECTED_TAPS = {
    "MobileNetV2UNet": {"enc1": (16, 2), "enc2": (24, 4), "enc3": (32, 8), "enc4": (96, 16), "bottleneck": (1280, 32),
                        "dec2": (24, 4), "low": (16, 2), "high": (32, 8)},
    "MobileNetV2Seg": {"low": (32, 2), "high": (1280, 8), "bottleneck": (1280, 8)},
    "ResNet18Seg": {"low": (64, 2), "high": (128, 8), "enc2": (64, 4), "enc3": (128, 8), "enc4": (256, 16),
                    "enc5": (512, 32), "bottleneck": (512, 32)},
    "RAUNet": {"low": (64, 2), "high": (128, 8), "enc2": (64, 4), "enc3": (128, 8), "enc4": (256, 16),
               "enc5": (512, 32), "bottleneck": (512, 32)},
    "PSPNet": {"low": (64, 2), "enc2": (256, 4), "high": (2048, 8), "bottleneck": (2048, 8)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TAPS))
def test_logits_and_every_tap_at_256_and_224(nets, name):
    net = nets[name]
    assert set(tap_points_of(net)) == set(EXPECTED_TAPS[name])
    taps = FeatureTaps(net, {a: a for a in EXPECTED_TAPS[name]})
    calls = {a: 0 for a in EXPECTED_TAPS[name]}
    counters = [resolve_tap(net, a).register_forward_hook(lambda *_, a=a: calls.__setitem__(a, calls[a] + 1))
                for a in calls]
    for size in (256, 224):
        with torch.no_grad(), taps.capture() as feats:
            logits = net(torch.randn(1, 1, size, size))
            shapes = {a: tuple(f.shape) for a, f in feats.items()}
        assert logits.shape == (1, 2, size, size)
        assert shapes == {a: (1, c, size // s, size // s) for a, (c, s) in EXPECTED_TAPS[name].items()}
    taps.remove()
    for handle in counters:
        handle.remove()
    assert all(n == 2 for n in calls.values()), calls  # each tapped module runs once per forward


def test_graph_flow_and_gkd_taps_are_the_papers(nets):
    taps = nets["MobileNetV2UNet"].tap_points
    assert taps["enc2"] == "backbone.features.3"  # x2 = features[2:4]
    assert taps["bottleneck"] == "backbone.features.18"  # x5 = features[14:19]
    assert taps["dec2"] == "up3"  # dconv3 -> cat x2 -> IR(48 -> 24)
    assert isinstance(resolve_tap(nets["MobileNetV2UNet"], "dec2").fuse, InvertedResidual)


def test_no_inplace_activations(nets):
    for name, net in nets.items():
        inplace = [n for n, m in net.named_modules() if getattr(m, "inplace", False)]
        assert not inplace, (name, inplace)


def test_mobilenet_backbone_layout_and_strides():
    imagenet, emkd = MobileNetV2Backbone(1), MobileNetV2Backbone(1, stage_strides=(1, 1, 2, 1, 1, 2, 1))
    assert len(imagenet.features) == len(emkd.features) == 19
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert imagenet(x).shape == (1, 1280, 2, 2)
        assert emkd(x).shape == (1, 1280, 8, 8)
    with pytest.raises(ValueError, match="7 values"):
        MobileNetV2Backbone(1, stage_strides=(1, 2))


def test_mobile_unet_decodes_a_replaced_bottleneck_with_its_own_skips(nets):
    net = nets["MobileNetV2UNet"]
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        skips = net.encode(x)
        torch.testing.assert_close(net.decode(skips), net(x))
    assert [tuple(s.shape[1:]) for s in skips] == [(16, 32, 32), (24, 16, 16), (32, 8, 8), (96, 4, 4), (1280, 2, 2)]
    replaced = [s.clone().requires_grad_() for s in skips[:-1]] + [torch.rand(1, 1280, 2, 2, requires_grad=True)]
    logits = net.decode(replaced)
    assert logits.shape == (1, 2, 64, 64)
    logits.square().sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in replaced)  # bottleneck and every skip used


def test_pspnet_is_dilated_like_the_official_code(nets):
    enc = nets["PSPNet"].encoder
    for layer, first, rest in ((enc.layer3, 1, 2), (enc.layer4, 2, 4)):
        assert layer[0].conv2.dilation == (first, first) and layer[0].conv2.padding == (first, first)
        assert all(block.conv2.dilation == (rest, rest) for block in layer[1:])
        assert all(m.stride == (1, 1) for m in layer.modules() if isinstance(m, nn.Conv2d))


# ------------------------------------------------------------------------------------- ImageNet layout, weights


def imagenet_resnet_keys(layers: list[int], bottleneck: bool, deep_stem: bool = False) -> set[str]:
    """The state-dict keys of a torchvision-style ResNet without ``fc``, written out independently."""

    def bn(prefix):
        return {f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}

    stem_convs = ("1", "2", "3") if deep_stem else ("1",)
    keys = set().union(*({f"conv{i}.weight"} | bn(f"bn{i}") for i in stem_convs))
    convs_per_block = 3 if bottleneck else 2
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            for c in range(1, convs_per_block + 1):
                keys |= {f"{p}.conv{c}.weight"} | bn(f"{p}.bn{c}")
            if b == 0 and (stage > 1 or bottleneck):
                keys |= {f"{p}.downsample.0.weight"} | bn(f"{p}.downsample.1")
    return keys


def test_encoders_have_the_imagenet_key_layout(nets):
    assert set(nets["ResNet18Seg"].encoder.state_dict()) == imagenet_resnet_keys([2, 2, 2, 2], bottleneck=False)
    assert set(nets["RAUNet"].encoder.state_dict()) == imagenet_resnet_keys([3, 4, 6, 3], bottleneck=False)
    assert set(nets["PSPNet"].encoder.state_dict()) == imagenet_resnet_keys([3, 4, 6, 3], bottleneck=True,
                                                                            deep_stem=True)


def imagenet_file(encoder: nn.Module, path, classes: int = 10) -> dict:
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    width = 512 * type(encoder.layer4[-1]).expansion
    state["fc.weight"], state["fc.bias"] = torch.randn(classes, width), torch.randn(classes)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("cls", [ResNet18Seg, RAUNet])
def test_pretrained_weights_round_trip(cls, tmp_path):
    torch.manual_seed(1)
    source = ResNetBackbone(18 if cls is ResNet18Seg else 34, in_channels=1)
    for m in source.modules():  # non-default statistics, so that loading them is observable
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    state = imagenet_file(source, tmp_path / "imagenet.pt")
    loaded = cls(in_channels=1, out_channels=2, pretrained_weights=str(tmp_path / "imagenet.pt")).encoder.state_dict()
    fresh = cls(in_channels=1, out_channels=2).encoder.state_dict()
    assert set(loaded) == set(state) - {"fc.weight", "fc.bias"}
    for k, v in loaded.items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert not torch.equal(fresh["layer1.0.bn1.running_mean"], loaded["layer1.0.bn1.running_mean"])


def test_pspnet_loads_a_deep_stem_file(tmp_path):
    source = ResNetBackbone(50, in_channels=3, deep_stem=True)
    state = imagenet_file(source, tmp_path / "resnet50_deep.pt")
    net = PSPNet(in_channels=1, out_channels=2, pretrained_weights=str(tmp_path / "resnet50_deep.pt"))
    torch.testing.assert_close(net.encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(net.encoder.conv3.weight, state["conv3.weight"])


def test_resnet18_file_into_resnet34_network_is_refused(tmp_path):
    path = tmp_path / "resnet18.pt"
    imagenet_file(ResNetBackbone(18, in_channels=3), path)
    with pytest.raises(ValueError, match="resnet18.pt") as err:
        RAUNet(pretrained_weights=str(path))
    assert "missing" in str(err.value)


def test_stem_mismatch_other_than_grey_is_refused(tmp_path):
    path = tmp_path / "rgb.pt"
    imagenet_file(ResNetBackbone(18, in_channels=3), path)
    with pytest.raises(ValueError, match="rgb.pt.*3 input channels.*takes 2"):
        ResNet18Seg(in_channels=2, pretrained_weights=str(path))


def test_grey_network_with_summed_stem_equals_rgb_network_on_replicated_grey(tmp_path):
    torch.manual_seed(2)
    rgb = ResNet18Seg(in_channels=3).eval()
    path = tmp_path / "rgb.pt"
    imagenet_file(rgb.encoder, path)
    grey = ResNet18Seg(in_channels=1, pretrained_weights=str(path)).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected, actual = rgb.encoder(x.repeat(1, 3, 1, 1)), grey.encoder(x)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
