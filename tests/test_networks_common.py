"""What every medkd network shares: weight files, tap points, export to TorchScript and ONNX."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from medkd.networks.weights import load_weights


def two_layer(channels=4):
    return nn.Sequential(nn.Conv2d(3, channels, 3), nn.BatchNorm2d(channels))


def test_load_weights_unwraps_checkpoints_and_prefixes(tmp_path):
    source = two_layer()
    path = tmp_path / "w.pt"
    wrapped = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
    wrapped["module.head.weight"] = torch.zeros(1)
    torch.save({"state_dict": wrapped, "epoch": 3}, path)
    target = load_weights(two_layer(), path, source_prefix="backbone.")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_weights_ignore_and_transform(tmp_path):
    source = nn.Sequential(two_layer(), nn.Linear(2, 2))
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    target = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))

    def grey_stem(state):
        return {k[2:]: (v.sum(1, keepdim=True) if k == "0.0.weight" else v) for k, v in state.items()}

    load_weights(target, path, ignore=("1.",), transform=grey_stem)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(target[0](x), source[0][0](x.repeat(1, 3, 1, 1)), atol=1e-5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: two_layer(8), "shape mismatch.*0.weight: file \\(4, 3, 3, 3\\) vs network \\(8, 3, 3, 3\\)"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3)), "unexpected key"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)), "missing key.*2.weight"),
    ],
)
def test_load_weights_mismatch_is_an_error_naming_the_file(tmp_path, make, match):
    path = tmp_path / "w.pt"
    torch.save(two_layer().state_dict(), path)
    with pytest.raises(ValueError, match=match) as info:
        load_weights(make(), path)
    assert str(path) in str(info.value)


def test_load_weights_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_weights(two_layer(), tmp_path / "nothing.pt")


# --- every network of the papers --------------------------------------------------------------------------------

import medkd.networks as nets  # noqa: E402
from medkd.networks import resolve_tap, tap_points_of  # noqa: E402
from medkd.profiling import count_flops, count_macs_paper_convention, count_parameters  # noqa: E402

STUDENTS = {
    "ENet": lambda: nets.ENet(in_channels=1, out_channels=2),
    "ERFNet": lambda: nets.ERFNet(in_channels=1, out_channels=2),
    "ESPNet": lambda: nets.ESPNet(in_channels=1, out_channels=2),
    "MobileNetV2UNet": lambda: nets.MobileNetV2UNet(in_channels=1, out_channels=2),
    "MobileNetV2Seg": lambda: nets.MobileNetV2Seg(in_channels=1, out_channels=2),
    "ResNet18Seg": lambda: nets.ResNet18Seg(in_channels=1, out_channels=2),
    "SmallUNet-S1": lambda: nets.SmallUNet(in_channels=3, out_channels=1, channels=(16, 32, 64)),
    "SmallUNet-S2": lambda: nets.SmallUNet(in_channels=3, out_channels=1, channels=(32, 64, 128)),
}
TEACHERS = {
    "FANet": lambda: nets.FANet(in_channels=1, out_channels=2),
    "RAUNet": lambda: nets.RAUNet(in_channels=1, out_channels=2),
    "PSPNet": lambda: nets.PSPNet(in_channels=1, out_channels=2),
    "MultiTaskUNet": lambda: nets.MultiTaskUNet(in_channels=3, out_channels=1),
}

# Published sizes (Graph Flow README; MTMS-CKD thesis Table 4.2 / code): parameters, and "GFLOPs" at 1x256x256 where
# published. Their counters (ptflops / thop) count multiply-accumulates of every layer, transposed convolutions per
# output position: count_macs_paper_convention.
PUBLISHED = {  # parameters, MACs, the counting that reproduces them
    "ENet": (0.349e6, 0.516e9, "all"),
    "ERFNet": (2.063e6, 3.681e9, "conv"),
    "MobileNetV2UNet": (4.640e6, 1.492e9, "conv"),
    "FANet": (38.250e6, 171.556e9, "conv"),
}
PUBLISHED_EXACT = {"SmallUNet-S1": 57_297, "SmallUNet-S2": 227_233, "MultiTaskUNet": 43_236_036}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameters_and_macs(name):
    net = {**STUDENTS, **TEACHERS}[name]()
    params, macs, layers = PUBLISHED[name]
    assert count_parameters(net) == pytest.approx(params, rel=0.01)
    x = torch.randn(1, 1, 256, 256)
    ours = count_macs_paper_convention(net, x, layers)
    assert ours == pytest.approx(macs, rel=0.02), f"{name}: {ours / 1e9:.3f} GMACs vs published {macs / 1e9:.3f}"
    assert count_flops(net, x) / 2 < ours  # the true count: transposed convolutions at their real cost


@pytest.mark.parametrize("name", sorted(PUBLISHED_EXACT))
def test_published_exact_parameter_counts(name):
    assert count_parameters({**STUDENTS, **TEACHERS}[name]()) == PUBLISHED_EXACT[name]


def _in_channels(net: nn.Module) -> int:
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    return first.in_channels


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_student_exports_match_eager(name, tmp_path):
    """TorchScript (scripted, as MONAI's ckpt_export does) and ONNX (run by onnxruntime) give the eager output."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = STUDENTS[name]().eval()
    x = torch.randn(2, _in_channels(net), 64, 96)
    with torch.no_grad():
        expected = net(x)
    scripted = torch.jit.script(net)
    scripted.save(str(tmp_path / "net.ts"))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "net.ts"))(x), expected, atol=1e-5)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["logits"], verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"image": x.numpy()})
    assert onnx_out.shape == tuple(expected.shape)
    assert abs(onnx_out - expected.numpy()).max() < 1e-4


@pytest.mark.parametrize("name", sorted({**STUDENTS, **TEACHERS}))
def test_every_tap_point_resolves_and_fires_once(name):
    net = {**STUDENTS, **TEACHERS}[name]().eval()
    aliases = tap_points_of(net)
    assert {"enc2", "bottleneck"} & set(aliases), sorted(aliases)
    calls = {alias: 0 for alias in aliases}
    hooks = [resolve_tap(net, alias).register_forward_hook(lambda *_, a=alias: calls.__setitem__(a, calls[a] + 1))
             for alias in aliases]
    with torch.no_grad():
        net(torch.randn(1, _in_channels(net), 64, 64))
    for h in hooks:
        h.remove()
    assert all(n == 1 for n in calls.values()), calls
