"""Evaluation protocols of the papers (EMKD, TransUNet/Graph Flow Synapse, Graph Flow Gastric, MTMS-CKD) and the
project's common per-case Dice/HD95, as plain functions and small accumulators; see :mod:`medkd.metrics.protocols`."""

from medkd.metrics import protocols
from medkd.metrics.protocols import *  # noqa: F401,F403 - the public API is protocols.__all__

__all__ = list(protocols.__all__)
