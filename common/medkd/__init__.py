"""medkd: knowledge distillation for medical image segmentation, as MONAI bundles.

Subpackages: ``medkd.networks`` (tap points, papers' networks), ``medkd.losses`` (KD losses),
``medkd.distill`` (taps, loss terms, Distiller), ``medkd.engines`` (KDTrainer, handlers), ``medkd.data``
(datalists, demo dataset), ``medkd.metrics`` (the papers' evaluation protocols, per-case Dice/HD95),
``medkd.profiling`` (parameters, FLOPs, latency, memory).
"""

__version__ = "0.1.0"

from .errors import install_excepthook as _install_excepthook  # relative: a vendored copy (export-bundle) keeps it

_install_excepthook()  # only under `python -m monai.bundle` / `python -m medkd`: the real error first and last
