"""Evaluation protocols of the papers (EMKD, TransUNet/Graph Flow Synapse, Graph Flow Gastric, MTMS-CKD) and the
project's common per-case Dice/HD95, as plain functions and small accumulators; see :mod:`medkd.metrics.protocols`.
GKD's Frechet Semantic Distance: :func:`frechet_semantic_distance` and :class:`FrechetSemanticDistance`."""

from medkd.metrics import protocols
from medkd.metrics.fsd import FrechetSemanticDistance, FSDValue, frechet_semantic_distance
from medkd.metrics.protocols import *  # noqa: F401,F403 - the public API is protocols.__all__

__all__ = list(protocols.__all__) + ["FSDValue", "FrechetSemanticDistance", "frechet_semantic_distance"]
