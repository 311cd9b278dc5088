"""Stage 1 of Graph Flow: pretraining one paraphraser (autoencoder) per frozen teacher tap."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.utils.enums import CommonKeys as Keys

from medkd.distill.teacher import LiveTeacher
from medkd.engines.trainer import amp_enabled, backward_and_step
from medkd.engines.handlers import ModuleSaver

__all__ = ["ParaphraserTrainer", "ParaphraserSaver"]


class ParaphraserTrainer(SupervisedTrainer):
    """Trains ``paraphrasers[tap]`` to reconstruct the frozen teacher's ``tap`` (MSE, mean over elements).

    The teacher (a :class:`~medkd.distill.LiveTeacher` with the same tap names) runs in eval mode without
    gradients; only the paraphrasers are optimised. ``engine.state.output`` holds ``loss`` (sum over taps) and
    ``loss_<tap>``; the engine's ``network`` is the ``nn.ModuleDict`` of paraphrasers.

    Args:
        teacher: frozen teacher with a tap for every paraphraser.
        paraphrasers: tap name -> :class:`medkd.networks.Paraphraser`.
        optimizer: over the paraphrasers' parameters.
        kwargs: other ``monai.engines.SupervisedTrainer`` arguments (device, max_epochs, train_data_loader,
            train_handlers, amp, ...).
    """

    def __init__(self, teacher: LiveTeacher, paraphrasers: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
                 **kwargs: Any):
        missing = sorted(set(paraphrasers) - set(teacher.tap_names))
        if missing:
            raise ValueError(f"no teacher tap for paraphrasers {missing}; teacher taps: {list(teacher.tap_names)}")
        bank = paraphrasers if isinstance(paraphrasers, nn.ModuleDict) else nn.ModuleDict(dict(paraphrasers))
        super().__init__(network=bank, optimizer=optimizer, loss_function=F.mse_loss, **kwargs)
        self.teacher = teacher

    def _iteration(self, engine: "ParaphraserTrainer", batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[0]
        targets = self.teacher(image)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = amp_enabled(engine)
        with torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {})):
            losses = {name: F.mse_loss(p(targets[f"t.{name}"]).float(), targets[f"t.{name}"].float())
                      for name, p in engine.network.items()}
        loss = sum(losses.values())
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"non-finite paraphraser loss at iteration {engine.state.iteration}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }; lower the learning rate")
        backward_and_step(engine, loss, use_amp)
        engine.state.output = {Keys.LOSS: loss.detach(), **{f"loss_{k}": v.detach() for k, v in losses.items()}}
        return engine.state.output


class ParaphraserSaver:
    """Writes every paraphraser to ``<save_dir>/paraphraser_<tap>.pt`` (atomically) after each epoch.

    These are the files :class:`medkd.distill.ParaphrasedTeacher` loads in the distillation stage (written by rank 0
    only, through :class:`medkd.engines.ModuleSaver`).
    """

    def __init__(self, paraphrasers: Mapping[str, nn.Module], save_dir: str | os.PathLike):
        self.paraphrasers, self.save_dir = paraphrasers, Path(save_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, engine: Engine | None = None) -> None:
        for name, module in self.paraphrasers.items():
            ModuleSaver(module, self.save_dir / f"paraphraser_{name}.pt").save(engine)
