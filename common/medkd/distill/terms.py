"""A KD loss term: a loss module, its weight, and the feature-dict keys it reads."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["LossTerm", "parse_key"]

FIXED_KEYS = ("image", "label", "s.logits", "t.logits")


def parse_key(key: str) -> tuple[str, str]:
    """Split a feature-dict key into (side, name): ``s.low`` -> (``s``, ``low``); ``student:low`` is a synonym.

    ``image`` and ``label`` have side ``""``. Raises ``ValueError`` for any other form.
    """
    for long, short in (("student:", "s."), ("teacher:", "t.")):
        if key.startswith(long):
            key = short + key[len(long) :]
    if key in ("image", "label"):
        return "", key
    if key[:2] in ("s.", "t.") and len(key) > 2:
        return key[0], key[2:]
    raise ValueError(
        f"unknown feature key '{key}': use 'image', 'label', 's.logits', 't.logits', or 's.<tap>' / 't.<tap>' "
        "(also written 'student:<tap>' / 'teacher:<tap>') where <tap> is a tap alias or a dotted module path"
    )


class LossTerm(nn.Module):
    """One weighted KD term of a recipe.

    Args:
        name: short name; the engine logs ``loss_<name>`` (weighted) and ``raw_<name>`` (unweighted).
        loss: a loss module called with the features named by ``inputs``, in order.
        weight: multiplier of the raw value in the total loss.
        inputs: feature-dict keys, e.g. ``["s.logits", "t.logits"]`` or ``["s.high", "t.high", "label"]``.

    The loss module is a sub-module, so adapters it owns are trained, saved with the training state and seen
    by DDP, but never exported with the student. Disable a term in a config with MONAI's ``"_disabled_": true``.
    """

    def __init__(self, name: str, loss: nn.Module, weight: float = 1.0, inputs: Sequence[str] = ("s.logits", "t.logits")):
        super().__init__()
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"term name must be a non-empty identifier, got {name!r}")
        if not callable(loss):
            raise TypeError(f"term '{name}': loss must be callable, got {type(loss).__name__}")
        self.name = name
        self.loss = loss
        self.weight = float(weight)
        self.inputs = [self._canonical(k) for k in inputs]
        if not self.inputs:
            raise ValueError(f"term '{name}' reads no inputs")

    @staticmethod
    def _canonical(key: str) -> str:
        side, name = parse_key(key)
        return f"{side}.{name}" if side else name

    @property
    def needs_label(self) -> bool:
        return "label" in self.inputs

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The raw (unweighted) value of the term on ``features``."""
        return self.loss(*[features[k] for k in self.inputs])

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}, inputs={self.inputs}"
