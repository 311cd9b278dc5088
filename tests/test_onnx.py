"""ONNX export of every student with MONAI's ``onnx_export``, run by onnxruntime and checked against PyTorch.

Each case is a bundle's ``network_def`` (its default student from ``inference.json``, or the student a recipe
selects, read from ``train.json`` + the recipe: what trained ``models/model.pt``). The test writes a model.pt-style
state dict (random weights, batch-norm statistics and affine parameters drawn away from their identity defaults so
that an exporter dropping them would show), exports it with ``monai.bundle.onnx_export`` exactly as the CLI does
(``--input_shape`` = one ``roi_size`` patch, ``--converter_kwargs`` with dynamic batch and spatial axes), then runs
the ONNX file with onnxruntime's CPUExecutionProvider on a batch of 2 at a spatial size *other* than the exported
one, and compares with the eval-mode PyTorch network loaded from the same file:

- max |logit difference| <= ``ATOL`` (1e-4), and
- identical argmax on >= ``ARGMAX_AGREEMENT`` (99.9 %) of the pixels/voxels.

Networks with max-unpooling (ENet) are held to the argmax criterion and to ``ATOL`` on >= 99 % of the logits only:
where two values of a 2x2 pooling window differ by less than the float round-off between PyTorch's and
onnxruntime's convolutions, the two runtimes may pick different argmax indices, and the unpooled value then lands in
a different pixel (measured: a 5e-8 gap flipped one index, 0.6 % of the logits moved by up to 0.016).

Exporters: the default of ``onnx_export`` on torch >= 2.9 (``use_trace=False``: the raw module goes to
``torch.onnx.export``, whose default is the ``torch.export``-based "dynamo" exporter) and the TorchScript-based one
(``use_trace=True`` with ``converter_kwargs={'dynamo': False}``). The dynamo exporter takes 3-15 s of CPU per
network, so the default suite runs it on every bundle's default student, one 3D student and ERFNet (the student
that needed a fix, see :class:`medkd.networks.enet.ConvPoolDownsampler`), and the TorchScript exporter (about 1 s)
on every distinct student; the dynamo export of the remaining students and the commands of ``docs/onnx.md`` are
marked slow.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import BUNDLE_NAMES, BUNDLES, ROOT
from monai.bundle import ConfigParser, onnx_export

from medkd.networks.enet import ConvPoolDownsampler

ATOL = 1e-4
ARGMAX_AGREEMENT = 0.999
UNPOOLING_LOGITS_WITHIN_ATOL = 0.99
UNPOOLING_NETWORKS = {"medkd.networks.ENet"}
SPATIAL_AXES = ("height", "width", "depth")
# Test sizes differ from every bundle's roi_size and are multiples of 32 (RAUNet's and ResNet18Seg's stride).
TEST_SPATIAL = {2: (64, 160), 3: (32, 64, 96)}
TEST_BATCH = 2
# MONAI networks a user may put in network_def by override (no recipe selects them); exported through emkd's config.
MONAI_STUDENTS = {
    "BasicUNet": {"_target_": "BasicUNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                  "features": [8, 8, 16, 32, 64, 8]},
    "SegResNet": {"_target_": "SegResNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 3, "init_filters": 8},
}


@dataclass(frozen=True)
class Case:
    """One student to export: ``bundle``'s network_def from ``configs`` (+ an optional network_def override)."""

    bundle: str
    configs: tuple[str, ...]
    override: dict | None = field(default=None, hash=False, compare=False)

    @property
    def files(self) -> list[str]:
        return [str(BUNDLES / self.bundle / "configs" / c) for c in self.configs]

    @property
    def meta_file(self) -> str:
        return str(BUNDLES / self.bundle / "configs" / "metadata.json")

    def parser(self) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(self.files)
        if self.override is not None:
            parser["network_def"] = self.override
        return parser


def resolved_network_def(case: Case) -> dict:
    """``network_def`` with every argument resolved (references, expressions), without building the network."""
    parser = case.parser()
    config = parser["network_def"]
    return {"_target_": config["_target_"],
            **{k: parser.get_parsed_content(f"network_def#{k}") for k in config if k != "_target_"}}


def _key(config: dict, drop: tuple[str, ...] = ()) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in drop}, sort_keys=True, default=str)


def collect_cases() -> tuple[list, list]:
    """(dynamo cases, TorchScript-exporter cases) as ``pytest.param``s, one per distinct student configuration.

    Every bundle's default student is a case of its own; a recipe's student is a case unless an earlier case has the
    same resolved ``network_def``. A recipe whose config cannot be read becomes a case that fails with the error.
    """
    dynamo, torchscript = [], []
    seen: set[str] = set()
    fast_architectures: set[str] = set()
    first_3d = True
    entries = [(b, Case(b, ("inference.json",)), b) for b in BUNDLE_NAMES]
    for b in BUNDLE_NAMES:
        for recipe in sorted((BUNDLES / b / "configs" / "recipes").glob("*.json")):
            entries.append((b, Case(b, ("train.json", f"recipes/{recipe.name}")), f"{b}/{recipe.stem}"))
    entries += [("emkd_segmentation", Case("emkd_segmentation", ("inference.json",), cfg), f"override/{name}")
                for name, cfg in MONAI_STUDENTS.items() if "emkd_segmentation" in BUNDLE_NAMES]
    for bundle, case, case_id in entries:
        try:
            config = resolved_network_def(case)
        except Exception:  # surfaces in the test itself, with the full error
            config = {"unreadable": case_id}
        key = _key(config)
        default = case.configs == ("inference.json",) and case.override is None
        if key in seen and not default:
            continue
        seen.add(key)
        architecture = _key(config, drop=("in_channels", "out_channels"))
        torchscript.append(pytest.param(case, id=case_id))
        is_3d = config.get("spatial_dims") == 3
        fast = default or config.get("_target_") == "medkd.networks.ERFNet" or (is_3d and first_3d)
        first_3d = first_3d and not is_3d
        fast = fast and architecture not in fast_architectures
        fast_architectures.add(architecture)
        dynamo.append(pytest.param(case, id=case_id, marks=() if fast or default else pytest.mark.slow))
    return dynamo, torchscript


DYNAMO_CASES, TORCHSCRIPT_CASES = collect_cases()


def randomise_norm_statistics(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every normalisation layer's running statistics and affine parameters away from identity, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.75 + 0.5 * torch.rand(n, generator=g))
                    m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return net


def dynamic_axes(spatial_dims: int) -> dict[str, dict[int, str]]:
    axes = {0: "batch", **{2 + i: SPATIAL_AXES[i] for i in range(spatial_dims)}}
    return {"image": axes, "pred": dict(axes)}


def write_checkpoint(case: Case, path: Path, seed: int = 0) -> dict:
    """A model.pt-style state dict of the case's student; returns the student's resolved ``network_def``."""
    torch.manual_seed(seed)
    net = randomise_norm_statistics(case.parser().get_parsed_content("network_def"), seed)
    torch.save(net.state_dict(), path)
    return resolved_network_def(case)


def export_shape(case: Case) -> list[int]:
    parser = case.parser()
    return [1, int(parser.get_parsed_content("network_def#in_channels")), *parser.get_parsed_content("roi_size")]


def compare_with_pytorch(case: Case, onnx_file: Path, ckpt: Path, spatial: tuple[int, ...], seed: int = 1) -> dict:
    """Run ``onnx_file`` with onnxruntime and the PyTorch student loaded from ``ckpt`` (eval) on the same input."""
    net = case.parser().get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    net.eval()
    in_channels = int(case.parser().get_parsed_content("network_def#in_channels"))
    x = torch.randn(TEST_BATCH, in_channels, *spatial, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = net(x).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    (got,) = session.run(None, {"image": x.numpy()})
    assert got.shape == expected.shape, (got.shape, expected.shape)
    diff = np.abs(got - expected)
    return {"max_abs": float(diff.max()), "within_atol": float((diff <= ATOL).mean()),
            "argmax": float((got.argmax(1) == expected.argmax(1)).mean()), "scale": float(np.abs(expected).max())}


def assert_matches(case: Case, stats: dict) -> None:
    assert stats["argmax"] >= ARGMAX_AGREEMENT, stats
    if resolved_network_def(case)["_target_"] in UNPOOLING_NETWORKS:
        assert stats["within_atol"] >= UNPOOLING_LOGITS_WITHIN_ATOL, stats
    else:
        assert stats["max_abs"] <= ATOL, stats


def assert_dynamic_input(onnx_file: Path, spatial_dims: int) -> None:
    """The graph input has symbolic (not fixed) batch and spatial dimensions."""
    (graph_input,) = onnx.load(str(onnx_file), load_external_data=False).graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert len(dims) == 2 + spatial_dims
    assert all(dims[i].dim_param and not dims[i].HasField("dim_value") for i in [0, *range(2, 2 + spatial_dims)]), dims
    assert dims[1].HasField("dim_value")  # channels stay fixed


def export_and_check(case: Case, tmp_path: Path, converter_kwargs: dict, use_trace: bool) -> dict:
    ckpt, onnx_file = tmp_path / "model.pt", tmp_path / "model.onnx"
    write_checkpoint(case, ckpt)
    shape = export_shape(case)
    spatial_dims = len(shape) - 2
    override = {} if case.override is None else {"network_def": case.override}
    onnx_export(net_id="network_def", filepath=str(onnx_file), ckpt_file=str(ckpt), meta_file=case.meta_file,
                config_file=case.files, input_shape=shape, use_trace=use_trace,
                converter_kwargs={"input_names": ["image"], "output_names": ["pred"],
                                  "dynamic_axes": dynamic_axes(spatial_dims), **converter_kwargs}, **override)
    assert_dynamic_input(onnx_file, spatial_dims)
    spatial = TEST_SPATIAL[spatial_dims]
    assert list(spatial) != shape[2:]
    stats = compare_with_pytorch(case, onnx_file, ckpt, spatial)
    assert_matches(case, stats)
    return stats


@pytest.mark.parametrize("case", DYNAMO_CASES)
def test_onnx_export_default_exporter_matches_pytorch(case, tmp_path, record_property):
    """``monai.bundle onnx_export`` as the CLI runs it by default (torch.export-based exporter), dynamic axes."""
    for name, value in export_and_check(case, tmp_path, converter_kwargs={}, use_trace=False).items():
        record_property(name, value)  # in --junitxml reports: the numbers docs/onnx.md quotes


@pytest.mark.parametrize("case", TORCHSCRIPT_CASES)
def test_onnx_export_torchscript_exporter_matches_pytorch(case, tmp_path, record_property):
    """``onnx_export --use_trace True --converter_kwargs "{'dynamo': False, ...}"``: the TorchScript-based exporter."""
    for name, value in export_and_check(case, tmp_path, converter_kwargs={"dynamo": False}, use_trace=True).items():
        record_property(name, value)


def test_every_student_class_and_bundle_default_is_covered():
    """The cases include every bundle's default student and every student class of ``medkd.networks``."""
    import medkd.networks

    students = re.search(r"Students: (.*?)\. Teachers", medkd.networks.__doc__, re.S).group(1)
    classes = {f"medkd.networks.{name}" for name in re.findall(r":class:`(\w+)`", students)}
    assert len(classes) >= 7, classes
    targets = {resolved_network_def(p.values[0])["_target_"] for p in TORCHSCRIPT_CASES}
    assert classes <= targets, classes - targets
    defaults = {p.values[0].bundle for p in DYNAMO_CASES if p.values[0].configs == ("inference.json",)}
    assert defaults == set(BUNDLE_NAMES)
    assert any(resolved_network_def(p.values[0]).get("spatial_dims") == 3 for p in DYNAMO_CASES)


def test_static_export_runs_only_at_the_exported_size(tmp_path):
    """Without ``dynamic_axes`` the ONNX graph is fixed to ``--input_shape``: it matches there, rejects other sizes."""
    case = Case("mtms_ckd_segmentation", ("inference.json",))
    ckpt, onnx_file = tmp_path / "model.pt", tmp_path / "model.onnx"
    write_checkpoint(case, ckpt)
    shape = export_shape(case)
    onnx_export(net_id="network_def", filepath=str(onnx_file), ckpt_file=str(ckpt), meta_file=case.meta_file,
                config_file=case.files, input_shape=shape, converter_kwargs={"input_names": ["image"]})
    (graph_input,) = onnx.load(str(onnx_file)).graph.input
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == shape
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = torch.randn(*shape)
    net = case.parser().get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() <= ATOL
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"image": np.zeros([1, shape[1], *TEST_SPATIAL[2]], np.float32)})


@pytest.mark.parametrize("size", [(64, 96), (96, 112), (32, 160)])
def test_conv_pool_downsampler_equals_symmetric_padding(size):
    """The exportable downsampler (top/left padding) gives the output of the usual ``padding=1`` convolution."""
    torch.manual_seed(0)
    block = randomise_norm_statistics(ConvPoolDownsampler(3, 16, act="relu", norm=("batch", {"eps": 1e-3}),
                                                          bias=True), 0).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        conv = F.conv2d(x, block.conv.weight, block.conv.bias, stride=2, padding=1)
        expected = block.norm_act(torch.cat([conv, F.max_pool2d(x, 2)], dim=1))
        assert torch.allclose(block(x), expected, atol=1e-6)
    assert block(torch.randn(1, 3, 33, 47)).shape == (1, 16, 16, 23)  # odd sizes: both paths floor


# --- the commands of docs/onnx.md, run as a user would (subprocess, from the bundle folder) ---

DOC = ROOT / "docs" / "onnx.md"


def documented_commands() -> list[tuple[str, list[str]]]:
    """``(bundle folder, argv)`` of every ``python -m monai.bundle onnx_export`` bash block in docs/onnx.md."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S):
        text = block.replace("\\\n", " ")
        cd = re.search(r"^cd (\S+)", text, re.M)
        cmd = re.search(r"^python -m monai\.bundle onnx_export .*$", text, re.M)
        if cd and cmd:
            commands.append((cd.group(1), shlex.split(cmd.group(0))))
    return commands


def _replace_option(argv: list[str], option: str, value: str) -> list[str]:
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2:]]


def test_docs_show_a_default_and_a_recipe_command():
    commands = documented_commands()
    configs = [argv[argv.index("--config_file") + 1] for _, argv in commands]
    assert any("recipes/" not in c for c in configs) and any("recipes/" in c for c in configs), configs


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(documented_commands())))
def test_documented_cli_command(index, tmp_path):
    """The documented command, with --filepath / --ckpt_file pointed at a temporary folder, exports a file that
    onnxruntime runs at another size and batch with the PyTorch student's output."""
    folder, argv = documented_commands()[index]
    bundle_root = ROOT / folder
    config_arg = argv[argv.index("--config_file") + 1]
    configs = [str(Path(c).relative_to("configs")) for c in re.findall(r"configs/[\w/.-]+\.json", config_arg)]
    case = Case(bundle_root.name, tuple(configs))
    ckpt, onnx_file = tmp_path / "model.pt", tmp_path / "model.onnx"
    write_checkpoint(case, ckpt)
    argv = _replace_option(_replace_option(argv, "--filepath", str(onnx_file)), "--ckpt_file", str(ckpt))
    assert argv[:3] == ["python", "-m", "monai.bundle"]
    done = subprocess.run([sys.executable, *argv[1:]], cwd=bundle_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_dynamic_input(onnx_file, len(export_shape(case)) - 2)
    assert_matches(case, compare_with_pytorch(case, onnx_file, ckpt, TEST_SPATIAL[len(export_shape(case)) - 2]))
