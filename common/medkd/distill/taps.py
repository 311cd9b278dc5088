"""Forward hooks that capture tapped features, registered once and armed only while a KD step runs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from medkd.networks.taps import resolve_tap

__all__ = ["FeatureTaps"]


class FeatureTaps:
    """Capture the outputs of named sub-modules of ``net`` during a forward pass.

    Hooks are registered at construction and stay registered, but store nothing unless :meth:`capture` is
    active, so validation and inference through the same network keep no feature references. Each capture
    writes into a fresh dict that the taps forget when the capture ends: features never leak from one step
    into the next, and nothing is held between steps.

    Args:
        net: any ``torch.nn.Module``.
        taps: feature name -> tap spec (an alias of ``net`` or a dotted module path), see
            :func:`medkd.networks.taps.resolve_tap`.
        role: ``"student"`` or ``"teacher"``, used in error messages.

    Raises:
        KeyError: at construction, for a tap that does not exist (the message lists the available names).
    """

    def __init__(self, net: nn.Module, taps: dict[str, str], role: str = "network"):
        self.role = role
        self.specs = dict(taps)
        self.features: dict[str, torch.Tensor] = {}
        self._armed = False
        self._handles = [
            resolve_tap(net, spec, role).register_forward_hook(self._hook(name)) for name, spec in self.specs.items()
        ]

    def _hook(self, name: str):
        def store(module: nn.Module, args, output) -> None:
            if self._armed:
                if isinstance(output, (tuple, list)):  # blocks returning (feature, extras): tap the feature
                    output = output[0]
                self.features[name] = output

        return store

    @contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """Arm the hooks for one forward pass; yields the dict the features are written into."""
        self.features = {}
        self._armed = True
        try:
            yield self.features
        finally:
            self._armed = False
            self.features = {}

    def check_captured(self, features: dict[str, torch.Tensor]) -> None:
        """Raise if a tapped module did not run in a captured forward (e.g. a branch not taken)."""
        missing = [n for n in self.specs if n not in features]
        if missing:
            raise RuntimeError(
                f"{self.role} taps {missing} (modules {[self.specs[n] for n in missing]}) produced no output "
                "during the forward pass; tap a module that runs on every forward"
            )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
