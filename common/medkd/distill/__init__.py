"""Distillation core: feature taps, loss terms, teacher sources and the Distiller module."""

from medkd.distill.cache import CachedTeacher, TeacherCache, TeacherViews, build_teacher_cache
from medkd.distill.bundle import (
    BundleTeacher,
    BundleTeacherError,
    TorchScriptTeacher,
    bundle_teacher_ckpt,
    bundle_teacher_network,
    check_teacher_fits,
    load_bundle_teacher,
)
from medkd.distill.distiller import Distiller
from medkd.distill.gkd import (
    AlignmentConsistencyObjective,
    GKDDistiller,
    SemanticAutoEncoderObjective,
    decode_replacing,
    load_stage_file,
    output_of,
    tap_channels,
)
from medkd.distill.self_distill import AuxiliaryHead, ClassWiseFeatures, FeatureReconstruction, SelfDistillationStudent
from medkd.distill.taps import FeatureTaps
from medkd.distill.teacher import LiveTeacher, ParaphrasedTeacher, TeacherSource, first_tensor, load_teacher_weights
from medkd.distill.terms import LossTerm, parse_key

__all__ = [
    "BundleTeacher",
    "BundleTeacherError",
    "TorchScriptTeacher",
    "bundle_teacher_ckpt",
    "bundle_teacher_network",
    "check_teacher_fits",
    "load_bundle_teacher",
    "AlignmentConsistencyObjective",
    "GKDDistiller",
    "SemanticAutoEncoderObjective",
    "decode_replacing",
    "load_stage_file",
    "output_of",
    "tap_channels",
    "AuxiliaryHead",
    "CachedTeacher",
    "TeacherCache",
    "TeacherViews",
    "build_teacher_cache",
    "ClassWiseFeatures",
    "Distiller",
    "FeatureReconstruction",
    "FeatureTaps",
    "LiveTeacher",
    "LossTerm",
    "ParaphrasedTeacher",
    "SelfDistillationStudent",
    "TeacherSource",
    "first_tensor",
    "load_teacher_weights",
    "parse_key",
]
