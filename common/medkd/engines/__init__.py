"""MONAI/Ignite glue: the KD trainer and the handlers the bundles use."""

from medkd.engines.handlers import AtomicCheckpointSaver, ProgressBar, TrainingState, loss_scalars
from medkd.engines.adversarial import WGANGPStep
from medkd.engines.protocols import PROTOCOL_OPTIONS, ProtocolSaver, needs_probabilities
from medkd.engines.trainer import AdversaryStep, KDTrainer

__all__ = ["AdversaryStep", "AtomicCheckpointSaver", "KDTrainer", "ProgressBar", "TrainingState", "WGANGPStep", "loss_scalars"]
__all__ += ["PROTOCOL_OPTIONS", "ProtocolSaver", "needs_probabilities"]
