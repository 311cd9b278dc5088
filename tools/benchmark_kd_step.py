"""Overhead of a KD step over its floor (teacher forward + student step), measured in one run on one batch.

    python tools/benchmark_kd_step.py [--size 256] [--batch 8] [--dims 2] [--repeats 20] [--bundle emkd_segmentation]
        [--overrides '{"teacher_def#channels": [32, 64, 128, 256, 512]}']

Builds the teacher, the student, the task loss and the KD terms from the bundle's ``configs/train.json`` (so it
measures exactly what the bundle trains; the teacher gets random weights saved to a temporary checkpoint) and
times, interleaved round by round on the same batch:

- teacher forward (eval, no grad),
- student step: forward + task loss + backward + Adam step,
- KD step: the Distiller's full step (teacher forward, student forward with taps, task loss + every KD term,
  backward, Adam step),

then prints the medians, the ratio KD step / (teacher forward + student step), and the peak tensor memory of each
(see :func:`medkd.profiling.peak_memory`). Targets: ratio <= 1.10; KD peak <= student peak + teacher peak.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import fire
import torch
from monai.bundle import ConfigParser

from medkd.profiling import median_time, peak_memory

ROOT = Path(__file__).resolve().parents[1]


def build(bundle: str, dims: int, num_classes: int | None, overrides: dict | None = None):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    parser["spatial_dims"] = dims
    parser.update(overrides or {})
    if num_classes:
        parser["num_classes"] = num_classes
    student = parser.get_parsed_content("network_def", instantiate=True)
    teacher = parser.get_parsed_content("teacher_def", instantiate=True)
    task_loss = parser.get_parsed_content("loss", instantiate=True)
    terms = parser.get_parsed_content("kd_terms", instantiate=True)
    student_taps = parser.get_parsed_content("student_taps")
    teacher_taps = parser.get_parsed_content("teacher_taps")
    return parser["num_classes"], student, teacher, task_loss, terms, student_taps, teacher_taps


def main(size: int = 256, batch: int = 8, dims: int = 2, repeats: int = 20, warmup: int = 3, bundle: str = "emkd_segmentation",
         threads: int = 0, num_classes: int = 0, overrides: dict | None = None, out: str = "") -> None:
    from medkd.distill import Distiller

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    n_cls, student, teacher, task_loss, terms, s_taps, t_taps = build(bundle, dims, num_classes or None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "teacher.pt")
        torch.save(teacher.state_dict(), ckpt)
        distiller = Distiller(student, task_loss, terms, teacher, ckpt, s_taps, t_taps).to(device).train()
    teacher_net = distiller.teacher.network
    x = torch.randn(batch, 1, *([size] * dims), device=device)
    y = torch.randint(0, n_cls, (batch, 1, *([size] * dims)), device=device)
    opt_student = torch.optim.Adam(student.parameters(), lr=1e-4)
    opt_kd = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-4)

    @torch.no_grad()
    def teacher_forward():
        teacher_net(x)

    def student_step():
        opt_student.zero_grad(set_to_none=True)
        task_loss(student(x), y).backward()
        opt_student.step()

    def kd_step():
        opt_kd.zero_grad(set_to_none=True)
        distiller(x, y)["loss"].backward()
        opt_kd.step()

    fns = {"teacher forward (no grad)": teacher_forward, "student step (fwd+bwd+Adam)": student_step, "KD step (EMKD)": kd_step}
    for fn in fns.values():  # warm-up, also allocates the Adam states before memory is measured
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved rounds: the three see the same machine state
        for name, fn in fns.items():
            times[name].append(median_time(fn, warmup=0, repeats=1))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    peaks = {k: peak_memory(fn, device) / 2**20 for k, fn in fns.items()}
    t_teacher, t_student, t_kd = med.values()
    m_teacher, m_student, m_kd = peaks.values()
    ratio = t_kd / (t_teacher + t_student)
    ratio_best = best["KD step (EMKD)"] / (best["teacher forward (no grad)"] + best["student step (fwd+bwd+Adam)"])
    lines = [
        f"KD step benchmark: bundle {bundle}{f' with {overrides}' if overrides else ''}, {dims}D {size}^{dims}, "
        f"batch {batch}, {n_cls} classes, {torch.get_num_threads()} CPU threads, {repeats} interleaved rounds; "
        f"teacher {sum(p.numel() for p in teacher_net.parameters()) / 1e6:.2f} M parameters, "
        f"student {sum(p.numel() for p in student.parameters()) / 1e3:.1f} k",
        "",
        "| step | median time (ms) | fastest round (ms) | peak memory (MB) |",
        "|---|---|---|---|",
        *[f"| {k} | {1000 * med[k]:.1f} | {1000 * best[k]:.1f} | {peaks[k]:.1f} |" for k in fns],
        "",
        f"time ratio KD step / (teacher forward + student step) = {ratio:.3f} on medians, {ratio_best:.3f} on fastest "
        "rounds (target <= 1.10)",
        f"memory: KD step peak {m_kd:.1f} MB vs student step peak + teacher forward peak = {m_student + m_teacher:.1f} MB "
        f"({'within' if m_kd <= m_student + m_teacher else 'ABOVE'} target)",
    ]
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    fire.Fire(main)
