"""Distillation core: feature taps, loss terms, teacher sources and the Distiller module."""

from medkd.distill.distiller import Distiller
from medkd.distill.taps import FeatureTaps
from medkd.distill.teacher import LiveTeacher, ParaphrasedTeacher, TeacherSource, first_tensor, load_teacher_weights
from medkd.distill.terms import LossTerm, parse_key

__all__ = [
    "Distiller",
    "FeatureTaps",
    "LiveTeacher",
    "LossTerm",
    "ParaphrasedTeacher",
    "TeacherSource",
    "first_tensor",
    "load_teacher_weights",
    "parse_key",
]
