"""Cost of a KD step: online (live teacher), offline (teacher cache) and compiled, against the plain student step.

    python tools/benchmark_kd_step.py [--size 256] [--batch 8] [--dims 2] [--repeats 10] [--threads 2]
        [--bundle emkd_segmentation] [--recipe raunet_enet.json] [--overrides '{"teacher_def#_target_": "..."}']
        [--modes online,offline,compiled[,compiled_teacher]] [--device cpu|cuda] [--amp] [--out FILE.md]

Builds student, teacher, task loss and KD terms from the bundle's ``configs/train.json`` (+ ``--recipe`` files from its
``configs/``, + ``--overrides``), so it measures exactly what the bundle trains (the teacher gets random weights saved
to a temporary checkpoint), and times, interleaved round by round on the same batch:

- teacher forward (eval, no grad) and the plain student step (forward + task loss + backward + Adam step);
- ``online``: the Distiller's full step with the live teacher (teacher forward, student forward with taps, task loss +
  every KD term, backward, Adam step);
- ``offline``: the same step with the teacher outputs read from a real teacher cache on disk (``batch`` item files
  written by :func:`medkd.distill.build_teacher_cache`, float16, loaded and stacked every step, as the data loader
  does in training);
- ``compiled``: the plain student step and the offline KD step with ``nn.Module.compile()`` applied to the student,
  after warm-up rounds that include the compilation; ``compiled_teacher`` adds the online KD step with the student
  and the live teacher compiled (compiling a big teacher takes minutes on 2 cores).

It prints the medians, steps per second and the ratios (online / offline = the offline speed-up, offline / student
step = the overhead over the floor), the cache's build time and size per item view, peak tensor memory, and with
``--device cuda --amp`` the AMP KD loss relative to the fp32 loss on the same batch.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import fire
import torch
from monai.bundle import ConfigParser

from medkd.profiling import median_time, peak_memory

ROOT = Path(__file__).resolve().parents[1]


def build(bundle: str, dims: int, recipe: str, overrides: dict | None):
    parser = ConfigParser()
    configs = ROOT / "bundles" / bundle / "configs"
    parser.read_config([str(configs / "train.json"), *[str(configs / r if (configs / r).is_file() else configs / "recipes" / r) for r in recipe.split("+") if r]])
    parser["spatial_dims"] = dims
    parser.update(overrides or {})
    student = parser.get_parsed_content("network_def", instantiate=True)
    teacher = parser.get_parsed_content("teacher_def", instantiate=True)
    task_loss = parser.get_parsed_content("loss", instantiate=True)
    terms = parser.get_parsed_content("kd_terms", instantiate=True)
    return (parser["num_classes"], student, teacher, task_loss, terms, parser.get_parsed_content("student_taps"),
            parser.get_parsed_content("teacher_taps"))


def _cache_items(distiller, x: torch.Tensor, folder: str):
    """A real teacher cache of the ``B`` images of ``x`` (one view each); returns (cache, build seconds, bytes/item)."""
    from monai.data import Dataset
    from monai.transforms import Compose

    from medkd.distill import TeacherCache, build_teacher_cache

    data = [{"image": x[i].cpu().numpy()} for i in range(x.shape[0])]
    start = time.perf_counter()
    build_teacher_cache(distiller, Dataset(data, transform=Compose([])), folder, views=1, batch_size=x.shape[0])
    seconds = time.perf_counter() - start
    cache = TeacherCache(folder)
    size = sum(cache.item_path(i, 0).stat().st_size for i in range(x.shape[0])) / x.shape[0]
    return cache, seconds, size


def measure(size: int = 256, batch: int = 8, dims: int = 2, repeats: int = 10, warmup: int = 3,
         bundle: str = "emkd_segmentation", recipe: str = "", threads: int = 2, num_classes: int = 0,
         overrides: dict | None = None, modes: str = "online,offline,compiled", device: str = "cpu",
         amp: bool = False, out: str = "", title: str = "", memory: bool = True) -> dict:
    from medkd.distill import Distiller

    if threads:
        torch.set_num_threads(threads)
    modes_on = {m.strip() for m in (modes if isinstance(modes, (list, tuple)) else str(modes).split(",")) if m.strip()}
    dev = torch.device(device)
    torch.manual_seed(0)
    overrides = dict(overrides or {})
    if num_classes:
        overrides["num_classes"] = num_classes
    n_cls, student, teacher, task_loss, terms, s_taps, t_taps = build(bundle, dims, recipe, overrides)
    student_c = copy.deepcopy(student) if "compiled" in modes_on else None
    terms_c = copy.deepcopy(terms) if "compiled" in modes_on else None
    tmp = tempfile.TemporaryDirectory()
    ckpt = os.path.join(tmp.name, "teacher.pt")
    torch.save(teacher.state_dict(), ckpt)
    teacher.to(dev)
    distiller = Distiller(student, task_loss, terms, teacher, ckpt, s_taps, t_taps).to(dev).train()
    teacher_net = distiller.teacher.network
    x = torch.randn(batch, 1, *([size] * dims), device=dev)
    y = torch.randint(0, n_cls, (batch, 1, *([size] * dims)), device=dev)

    cache, build_s, item_bytes = _cache_items(distiller, x, os.path.join(tmp.name, "cache"))

    def cached_batch() -> dict[str, torch.Tensor]:
        """What the data loader delivers: per-item files read and stacked, then moved to the device."""
        items = [cache.load(i, 0)["outputs"] for i in range(batch)]
        return {k: torch.stack([it[k][0] for it in items]).to(dev) for k in items[0]}

    opt_student = torch.optim.Adam(student.parameters(), lr=1e-4)
    opt_kd = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-4)
    use_amp = bool(amp and dev.type == "cuda")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    @torch.no_grad()
    def teacher_forward():
        teacher_net(x)

    def student_step(net=student, opt=opt_student):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=use_amp):
            loss = task_loss(net(x), y)
        loss.backward()
        opt.step()

    def kd_step(d=distiller, opt=opt_kd, outputs=None):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=use_amp):
            loss = d(x, y, teacher_outputs=outputs() if outputs else None)["loss"]
        loss.backward()
        opt.step()

    fns = {"teacher forward (no grad)": teacher_forward, "student step (no KD)": student_step}
    if "online" in modes_on:
        fns["KD step, online (live teacher)"] = kd_step
    offline = None
    if "offline" in modes_on or "compiled" in modes_on:
        offline = Distiller(student, task_loss, terms, teacher, ckpt, s_taps, t_taps).to(dev).train()
        offline.use_teacher_cache(cache)
        opt_off = torch.optim.Adam(offline.trainable_parameters(), lr=1e-4)
        if "offline" in modes_on:
            fns["KD step, offline (teacher cache)"] = lambda: kd_step(offline, opt_off, cached_batch)
    compile_s = None
    if "compiled" in modes_on:
        teacher_c = copy.deepcopy(teacher)
        live_c = Distiller(student_c, task_loss, terms_c, teacher_c, ckpt, s_taps, t_taps).to(dev).train()
        off_c = Distiller(student_c, task_loss, terms_c, teacher_c, ckpt, s_taps, t_taps).to(dev).train()
        off_c.use_teacher_cache(cache)
        opt_c = torch.optim.Adam(off_c.trainable_parameters(), lr=1e-4)
        opt_sc = torch.optim.Adam(student_c.parameters(), lr=1e-4)
        student_c.compile()
        if "compiled_teacher" in modes_on:
            live_c.teacher.network.compile()
        start = time.perf_counter()
        compiled_online = "compiled_teacher" in modes_on and "online" in modes_on
        for _ in range(2):  # compile the training graphs (forward + backward) of each compiled step
            kd_step(off_c, opt_c, cached_batch)
            student_step(student_c, opt_sc)
            if compiled_online:
                kd_step(live_c, opt_c)
        sync()
        compile_s = time.perf_counter() - start
        fns["student step (no KD), compiled"] = lambda: student_step(student_c, opt_sc)
        fns["KD step, offline, compiled"] = lambda: kd_step(off_c, opt_c, cached_batch)
        if compiled_online:
            fns["KD step, online, compiled"] = lambda: kd_step(live_c, opt_c)
    for fn in fns.values():  # warm-up, also allocates the Adam states before memory is measured
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved rounds: every step sees the same machine state
        for name, fn in fns.items():
            times[name].append(median_time(fn, warmup=0, repeats=1, device=dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    peaks = {k: peak_memory(fn, dev) / 2**20 for k, fn in fns.items() if "compiled" not in k} if memory else {}

    t_student = med["student step (no KD)"]
    ratios: dict[str, float] = {}
    if "KD step, online (live teacher)" in med and "KD step, offline (teacher cache)" in med:
        ratios["offline speed-up (online / offline)"] = med["KD step, online (live teacher)"] / med["KD step, offline (teacher cache)"]
    if "KD step, online (live teacher)" in med and "KD step, offline, compiled" in med:
        ratios["offline + compiled speed-up (online / offline compiled)"] = (
            med["KD step, online (live teacher)"] / med["KD step, offline, compiled"])
    if "KD step, offline (teacher cache)" in med:
        ratios["offline KD step / student step"] = med["KD step, offline (teacher cache)"] / t_student
    if "KD step, offline, compiled" in med:
        ratios["offline compiled KD step / compiled student step"] = (
            med["KD step, offline, compiled"] / med["student step (no KD), compiled"])
    if "KD step, online, compiled" in med:
        ratios["online compiled speed-up (online / online compiled)"] = (
            med["KD step, online (live teacher)"] / med["KD step, online, compiled"])

    amp_check = None
    if amp and dev.type == "cuda":
        with torch.no_grad():
            fp32 = float(distiller(x, y)["loss"])
            with torch.autocast("cuda"):
                half = float(distiller(x, y)["loss"])
        amp_check = abs(half - fp32) / abs(fp32)

    name = title or f"{type(teacher_net).__name__} -> {type(student).__name__}"
    head = (f"{name} ({bundle}{' + ' + recipe if recipe else ''}): {dims}D {size}^{dims}, batch {batch}, {n_cls} "
            f"classes, {'GPU ' + torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}"
            f"{', AMP' if use_amp else ''}, {repeats} interleaved rounds; teacher "
            f"{sum(p.numel() for p in teacher_net.parameters()) / 1e6:.2f} M parameters, student "
            f"{sum(p.numel() for p in student.parameters()) / 1e3:.1f} k; KD terms "
            f"{[t.name for t in distiller.terms]}")
    lines = [head, "", "| step | median (ms) | steps / s | peak memory (MB) |", "|---|---|---|---|"]
    lines += [f"| {k} | {1000 * med[k]:.1f} | {1 / med[k]:.2f} | {peaks[k]:.1f} |" if k in peaks else
              f"| {k} | {1000 * med[k]:.1f} | {1 / med[k]:.2f} | — |" for k in fns]
    lines += ["", *[f"- {k}: **{v:.2f}×**" if "speed-up" in k else f"- {k}: **{v:.3f}**" for k, v in ratios.items()],
              f"- teacher cache: {build_s / batch * 1000:.0f} ms and {item_bytes / 2**20:.2f} MiB per item view "
              f"(float16: logits + taps {sorted(cache.manifest['taps'])})"]
    if compile_s is not None:
        lines.append(f"- compilation (first two rounds of each compiled step): {compile_s:.1f} s")
    if amp_check is not None:
        lines.append(f"- AMP KD loss vs fp32 on the same batch: {100 * amp_check:.3f} % relative difference")
    text = "\n".join(lines)
    print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(text + "\n\n")
    tmp.cleanup()
    return {"median_s": med, "ratios": ratios, "cache_build_s_per_item": build_s / batch,
            "cache_bytes_per_item": item_bytes, "compile_s": compile_s, "amp_rel_diff": amp_check}


def main(**kwargs) -> None:
    """Command line: :func:`measure` with the same arguments (prints the table, appends it to ``--out``)."""
    measure(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
