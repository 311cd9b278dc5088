"""The discriminator step of adversarial distillation (WGAN-GP), run by :class:`KDTrainer` after each student step."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from medkd.engines.trainer import AdversaryStep
from medkd.losses.adversarial import gradient_penalty

__all__ = ["WGANGPStep"]


class WGANGPStep(AdversaryStep):
    """Trains a discriminator to score teacher output maps above student output maps (WGAN-GP).

    ``loss_d = weight * (mean D(student) - mean D(teacher) + gp_weight * GP)`` on detached logits: the student is
    not touched by this step, and only the discriminator's optimiser steps. Graph Flow: ``weight`` (lambda_d) 1,
    ``gp_weight`` 10, Adam(betas 0.9, 0.99) at 3e-5 x poly(0.9).

    Logged (``engine.state.output``): ``loss_d`` (the weighted loss), ``raw_d_wasserstein`` (mean D(teacher) -
    mean D(student), the critic's estimate of the distance) and ``raw_d_gp``.

    Args:
        discriminator: e.g. :class:`medkd.losses.LogitsDiscriminator` (the module the student's
            :class:`~medkd.losses.AdversarialGeneratorLoss` refers to), already on the training device.
        optimizer: optimiser over ``discriminator.parameters()`` only.
        lr_scheduler: optional scheduler stepped after every discriminator step (per iteration).
        weight: lambda_d.
        gp_weight: weight of the gradient penalty.
        student_key / teacher_key: feature-dict keys of the fake and real inputs.
    """

    def __init__(self, discriminator: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any = None,
                 weight: float = 1.0, gp_weight: float = 10.0, student_key: str = "s.logits",
                 teacher_key: str = "t.logits"):
        own = {id(p) for p in discriminator.parameters()}
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        if not stepped or any(id(p) not in own for p in stepped):
            raise ValueError("the discriminator's optimiser must hold the discriminator's parameters only")
        self.discriminator, self.optimizer, self.lr_scheduler = discriminator, optimizer, lr_scheduler
        self.weight, self.gp_weight = float(weight), float(gp_weight)
        self.student_key, self.teacher_key = student_key, teacher_key

    def step(self, engine, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key in (self.student_key, self.teacher_key):
            if key not in features:
                raise KeyError(f"WGANGPStep needs '{key}' in the feature dict (has {sorted(features)})")
        fake = features[self.student_key].detach().float()
        real = features[self.teacher_key].detach().float()
        d = self.discriminator
        d.train()
        self.optimizer.zero_grad(set_to_none=True)
        wasserstein = d(real).mean() - d(fake).mean()
        gp = gradient_penalty(d, real, fake)
        loss = self.weight * (-wasserstein + self.gp_weight * gp)
        loss.backward()
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return {"loss_d": loss.detach(), "raw_d_wasserstein": wasserstein.detach(), "raw_d_gp": gp.detach()}

    def state_dict(self) -> dict:
        state = {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
