"""MONAI/Ignite glue: the KD trainer, adversary steps, paraphraser pretraining, schedules, the handlers the bundles
use, and the evaluation-protocol handler."""

from medkd.engines.adversarial import WGANGPStep
from medkd.engines.fsd import FSDSaver
from medkd.engines.handlers import AtomicCheckpointSaver, ModuleSaver, ProgressBar, TermSchedule, TrainingState, ValidationHandler, loss_scalars
from medkd.engines.paraphraser import ParaphraserSaver, ParaphraserTrainer
from medkd.engines.checks import check_output_channels, check_writable
from medkd.engines.resume import RandomStates, parse_bool
from medkd.engines.protocols import PROTOCOL_OPTIONS, ProtocolSaver, needs_probabilities
from medkd.engines.schedules import PiecewisePolyLR
from medkd.engines.trainer import AdversaryStep, KDTrainer, ObjectiveTrainer, mean_across_ranks

__all__ = [
    "AdversaryStep",
    "AtomicCheckpointSaver",
    "FSDSaver",
    "KDTrainer",
    "ModuleSaver",
    "ObjectiveTrainer",
    "PROTOCOL_OPTIONS",
    "ParaphraserSaver",
    "ParaphraserTrainer",
    "PiecewisePolyLR",
    "ProgressBar",
    "ProtocolSaver",
    "RandomStates",
    "TermSchedule",
    "check_output_channels",
    "check_writable",
    "TrainingState",
    "ValidationHandler",
    "WGANGPStep",
    "loss_scalars",
    "mean_across_ranks",
    "needs_probabilities",
    "parse_bool",
]
