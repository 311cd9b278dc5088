"""Cost of a network or a training step: parameters, FLOPs, latency, peak memory.

FLOPs come from PyTorch's own counter, ``torch.utils.flop_counter.FlopCounterMode``: it counts **FLOPs, two per
multiply-accumulate**, for convolutions (transposed included), matrix products and attention; element-wise
operations (activations, normalisation, additions) are not counted. Divide by two to compare with MAC tables.

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

__all__ = ["count_parameters", "count_flops", "median_time", "latency", "peak_memory", "profile_network"]


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
) -> dict:
    """Parameters, FLOPs, median latency (ms) and (with ``memory``) peak inference memory (MB) for one input.

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
    if memory:
        with torch.no_grad():
            result["peak_memory_mb"] = peak_memory(lambda: net(example), device) / 2**20
    return result
