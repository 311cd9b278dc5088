"""Cost of a network or a training step: parameters, FLOPs, latency, peak memory.

FLOPs come from PyTorch's own counter, ``torch.utils.flop_counter.FlopCounterMode``: it counts **FLOPs, two per
multiply-accumulate**, for convolutions (transposed included), matrix products and attention; element-wise
operations (activations, normalisation, additions) are not counted. Divide by two to compare with MAC tables.

The papers' tables count differently: ptflops/thop count multiply-accumulates (MACs) of every layer (normalisation,
activations and pooling included) and, in the versions they used, a transposed convolution per *output* position,
stride² times its real cost. :func:`count_macs_paper_convention` reproduces that convention (ptflops with such a
transposed-convolution rule) to set our networks beside the published figures; :func:`count_flops` is the true count.

Peak memory is the largest amount of tensor memory allocated at once while a function runs, above what was
allocated when it started: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the allocator events recorded by
``torch.profiler`` (``profile_memory=True``).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "count_flops", "count_macs_paper_convention", "median_time", "latency", "peak_memory",
           "profile_network"]


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(net: nn.Module, example: torch.Tensor) -> int:
    """FLOPs (2 per MAC) of one eval-mode forward pass on ``example`` (batch included)."""
    was_training = net.training
    net.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            net(example)
    finally:
        net.train(was_training)
    return int(counter.get_total_flops())


def _transposed_conv_per_output_position(module: nn.Module, inputs, output: torch.Tensor) -> None:
    positions = output.numel() // output.shape[1]  # batch x output pixels
    kernel = 1
    for k in module.kernel_size:
        kernel *= k
    module.__flops__ += positions * kernel * module.in_channels * module.out_channels // module.groups
    if module.bias is not None:
        module.__flops__ += output.numel()


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


@torch.no_grad()
def count_macs_paper_convention(net: nn.Module, example: torch.Tensor, layers: str = "all") -> int:
    """MACs of one forward pass on ``example`` as the papers' tables count them (see the module docstring).

    ptflops' module-hook backend with transposed convolutions counted per output position. ``layers="all"``
    counts every layer ptflops has a rule for (normalisation, activations, pooling, interpolation);
    ``layers="conv"`` only convolutions and linear layers. Graph Flow's table matches "all" for ENet and "conv"
    for FANet and Mobile U-Net (docs/networks.md). For comparing with published GFLOPs only.
    """
    from ptflops import get_model_complexity_info

    if layers not in ("all", "conv"):
        raise ValueError(f"layers must be 'all' or 'conv', got {layers!r}")
    others = [] if layers == "all" else list({type(m) for m in net.modules() if not isinstance(m, _CONVOLUTIONS)})
    was_training = net.training
    net.eval()
    try:
        macs, _ = get_model_complexity_info(
            net, tuple(example.shape[1:]), input_constructor=lambda _: example, as_strings=False,
            print_per_layer_stat=False, verbose=False, backend="pytorch", ignore_modules=others,
            backend_specific_config={"count_functional": layers == "all"},
            custom_modules_hooks={nn.ConvTranspose1d: _transposed_conv_per_output_position,
                                  nn.ConvTranspose2d: _transposed_conv_per_output_position,
                                  nn.ConvTranspose3d: _transposed_conv_per_output_position},
        )
    finally:
        net.train(was_training)
    return int(macs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], warmup: int = 3, repeats: int = 10, device: torch.device | str = "cpu") -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency(net: nn.Module, example: torch.Tensor, warmup: int = 3, repeats: int = 10) -> float:
    """Median eval-mode forward time (seconds) of ``net`` on ``example``, without gradients."""
    net.eval()

    @torch.no_grad()
    def forward():
        return net(example)

    return median_time(forward, warmup, repeats, example.device)


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory allocated during ``fn()`` above the level at its start."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not mem:
        return 0
    mem.sort(key=lambda a: a.get("Ev Idx", 0))
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return int(max(a["Total Allocated"] for a in mem) - base)


def profile_network(
    net: nn.Module,
    input_shape: Sequence[int],
    device: str | torch.device = "cpu",
    repeats: int = 10,
    memory: bool = True,
    warmup: int = 3,
    paper_macs: bool = False,
) -> dict:
    """Parameters, FLOPs, median latency (ms) and (with ``memory``) peak inference memory (MB) for one input;
    with ``paper_macs`` also ``paper_macs_all`` and ``paper_macs_conv`` (:func:`count_macs_paper_convention`).

    ``input_shape`` includes the batch and channel axes, e.g. ``(1, 1, 96, 112)``.
    """
    device = torch.device(device)
    net = net.to(device).eval()
    example = torch.randn(*input_shape, device=device)
    result = {
        "params": count_parameters(net),
        "flops": count_flops(net, example),
        "latency_ms": 1000.0 * latency(net, example, warmup=warmup, repeats=repeats),
    }
    if paper_macs:
        result["paper_macs_all"] = count_macs_paper_convention(net, example, "all")
        result["paper_macs_conv"] = count_macs_paper_convention(net, example, "conv")
    if memory:
        with torch.no_grad():
            result["peak_memory_mb"] = peak_memory(lambda: net(example), device) / 2**20
    return result


# --- `python -m medkd profile TARGET ...`: networks named by class (with arguments) or by bundle -------------------


def _network_class(name: str) -> type:
    """A network class by name: medkd.networks, then monai.networks.nets, then a dotted import path."""
    import importlib

    import monai.networks.nets as monai_nets

    import medkd.networks as medkd_nets

    for namespace in (medkd_nets, monai_nets):
        cls = getattr(namespace, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    module, _, attr = name.rpartition(".")
    if module:
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            cls = None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    available = sorted(n for n in medkd_nets.__all__ if n[:1].isupper())
    raise ValueError(f"unknown network {name!r}: not in medkd.networks ({', '.join(available)}), "
                     "not in monai.networks.nets, and not an importable 'package.module.Class'")


def parse_network_spec(spec: str) -> tuple[type, dict]:
    """``"ENet"`` or ``"ENet(in_channels=1, out_channels=2)"`` -> (class, keyword arguments).

    Arguments must be Python literals (numbers, strings, tuples, lists, dicts); nothing is evaluated.
    """
    import ast

    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot read network spec {spec!r}: {e.msg}") from None
    call = node if isinstance(node, ast.Call) else None
    func = call.func if call else node
    name = ast.unparse(func)
    if not isinstance(func, (ast.Name, ast.Attribute)):
        raise ValueError(f"network spec {spec!r} must be a class name, optionally called with keyword arguments")
    if call and call.args:
        raise ValueError(f"network spec {spec!r}: pass arguments by keyword, e.g. {name}(in_channels=1)")
    try:
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in (call.keywords if call else [])}
    except ValueError:
        raise ValueError(f"network spec {spec!r}: argument values must be literals") from None
    return _network_class(name), kwargs


def _default_in_channels(cls: type, kwargs: dict) -> int | None:
    import inspect

    if "in_channels" in kwargs:
        return int(kwargs["in_channels"])
    param = inspect.signature(cls).parameters.get("in_channels")
    return None if param is None or param.default is inspect.Parameter.empty else int(param.default)


def _bundle_dir(target: str):
    from pathlib import Path

    from medkd.demo import bundles_dir

    path = Path(target)
    if (path / "configs" / "train.json").is_file():
        return path
    try:
        candidate = bundles_dir() / target
    except FileNotFoundError:
        return None
    return candidate if (candidate / "configs" / "train.json").is_file() else None


def _bundle_networks(bundle, recipe: str | None) -> tuple[list[tuple[str, nn.Module]], list[int], int]:
    """Student (``network_def``) and, when present, teacher (``teacher_def``) of a bundle, with its ROI size."""
    from monai.bundle import ConfigParser

    configs = [bundle / "configs" / "train.json"]
    if recipe:
        path = bundle / "configs" / "recipes" / (recipe if recipe.endswith(".json") else f"{recipe}.json")
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} not found")
        configs.append(path)
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    nets = []
    for key, role in (("teacher_def", "teacher"), ("network_def", "student")):
        if key in parser:
            net = parser.get_parsed_content(key, instantiate=True)
            nets.append((f"{bundle.name} {role} ({type(net).__name__})", net))
    return nets, list(parser.get_parsed_content("roi_size")), int(parser.get_parsed_content("in_channels"))


def profile_targets(
    targets: Sequence[str],
    size: Sequence[int] | None = None,
    batch: int = 1,
    recipe: str | None = None,
    pairs: Sequence[str] = (),
    repeats: int = 20,
    warmup: int = 5,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Profile every target on CPU; returns (rows, teacher/student ratio rows).

    A target is a bundle (directory or name under ``bundles/``; its ``teacher_def`` and ``network_def``, with
    ``recipe`` applied) or a network spec (see :func:`parse_network_spec`), optionally labelled ``NAME=SPEC``.
    ``size`` is the spatial input size (default: a bundle's ``roi_size``, else 256x256). ``pairs`` are
    ``"TEACHER/STUDENT"`` row names whose ratios to report; a bundle adds its own pair.
    """
    entries: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    pair_names = [tuple(p.split("/", 1)) for p in pairs]
    for target in targets:
        label, _, spec = target.partition("=") if "=" in target.split("(", 1)[0] else ("", "", target)
        bundle = _bundle_dir(spec)
        if bundle is not None:
            nets, roi, in_channels = _bundle_networks(bundle, recipe)
            shape = (batch, in_channels, *(size or roi))
            entries += [(name, net, shape) for name, net in nets]
            if len(nets) == 2:
                pair_names.append((nets[0][0], nets[1][0]))
            continue
        cls, kwargs = parse_network_spec(spec)
        in_channels = _default_in_channels(cls, kwargs)
        if in_channels is None:
            raise ValueError(f"{spec}: give in_channels=... (the class has no default)")
        entries.append((label or spec, cls(**kwargs), (batch, in_channels, *(size or (256, 256)))))
    rows = []
    for name, net, shape in entries:
        if progress:
            progress(f"profiling {name} at {'x'.join(map(str, shape))}")
        cost = profile_network(net, shape, repeats=repeats, warmup=warmup, memory=memory, paper_macs=True)
        rows.append({"name": name, "network": type(net).__name__, "input": list(shape), **cost})
    by_name = {r["name"]: r for r in rows}
    ratios = []
    for teacher, student in pair_names:
        missing = [n for n in (teacher, student) if n not in by_name]
        if missing:
            raise ValueError(f"pair {teacher}/{student}: no profiled network named {missing}; names: {sorted(by_name)}")
        t, s = by_name[teacher], by_name[student]
        ratios.append({"teacher": teacher, "student": student, "params": t["params"] / s["params"],
                       "flops": t["flops"] / max(s["flops"], 1), "latency": t["latency_ms"] / s["latency_ms"]})
    return rows, ratios


def profile_markdown(rows: Sequence[dict], ratios: Sequence[dict], title: str = "Network cost") -> str:
    """The rows of :func:`profile_targets` as a markdown table (plus the ratio table), with the conventions."""
    memory = any("peak_memory_mb" in r for r in rows)
    header = ("| network | input | parameters (M) | GFLOPs | GMACs | paper GMACs (all layers) | paper GMACs (conv only) "
              "| CPU latency (ms) |"
              + (" peak memory (MB) |" if memory else ""))
    lines = [f"# {title}", "",
             f"CPU latency: median of timed eval-mode forward passes after warm-up, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads. FLOPs: torch.utils.flop_counter, which counts 2 FLOPs per "
             "multiply-accumulate (MAC) of convolutions and matrix products and nothing for element-wise operations; "
             "GMACs = GFLOPs / 2. Paper GMACs: how the papers' counters (ptflops, thop) count, to compare with published "
             "GFLOPs: multiply-accumulates with transposed convolutions counted per output position, of every layer "
             "(all layers) or of convolutions only."
             + (" Peak memory: tensor memory allocated at once during one forward pass." if memory else ""),
             "", header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        line = (f"| {r['name']} | {'x'.join(map(str, r['input']))} | {r['params'] / 1e6:.3f} | {r['flops'] / 1e9:.3f} | "
                f"{r['flops'] / 2e9:.3f} | {r['paper_macs_all'] / 1e9:.3f} | {r['paper_macs_conv'] / 1e9:.3f} | "
                f"{r['latency_ms']:.2f} |")
        if memory:
            line += f" {r.get('peak_memory_mb', float('nan')):.1f} |"
        lines.append(line)
    if ratios:
        lines += ["", "| teacher | student | parameters ratio | FLOPs ratio | CPU latency ratio (speed-up) |", "|---|---|---|---|---|"]
        lines += [f"| {q['teacher']} | {q['student']} | {q['params']:.1f}x | {q['flops']:.1f}x | {q['latency']:.1f}x |"
                  for q in ratios]
    return "\n".join(lines) + "\n"
