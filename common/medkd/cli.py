"""``python -m medkd ...``: prepare datasets, run the demo.

    python -m medkd prepare demo --out DIR [--subjects 12] [--seed 0] [--dims 2|3] [--spacing 2.0]
    python -m medkd demo [--out demo_results] [--epochs 30]
"""

from __future__ import annotations

from pathlib import Path

import fire

__all__ = ["main", "prepare", "demo"]

DATASETS = ("demo",)


def prepare(dataset: str, out: str, **options) -> None:
    """Write DATASET as NIfTI + an MSD-style datalist under OUT; prints and returns the datalist path.

    Datasets: ``demo`` (the embedded MNI152 pseudo-subjects; options: subjects, seed, dims, spacing,
    slices_per_subject, and the variation strengths of :class:`medkd.data.DemoConfig`).
    """
    if dataset == "demo":
        from medkd.data.demo import prepare_demo

        path = prepare_demo(out, **options)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
    print(f"wrote {path}")


def demo(out: str = "demo_results", epochs: int = 30, subjects: int = 12, seed: int = 0, data: str = "data/demo2d") -> None:
    """The end-to-end demo: data -> teacher -> student baseline -> EMKD student -> evaluation table and figure."""
    from medkd.demo import run_demo

    run_demo(Path(out), epochs=epochs, subjects=subjects, seed=seed, data_dir=Path(data))


def main() -> None:
    fire.Fire({"prepare": prepare, "demo": demo}, name="medkd")
