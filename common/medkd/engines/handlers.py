"""Handlers for KD training: atomic best-model saving, resumable training state, progress bar, log transforms."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from medkd.io import atomic_torch_save

__all__ = ["AtomicCheckpointSaver", "ModuleSaver", "TermSchedule", "TrainingState", "ProgressBar", "loss_scalars"]

logger = logging.getLogger(__name__)


class _AtomicFileSaver(BaseSaveHandler):
    """Ignite save handler writing through :func:`medkd.io.atomic_torch_save`.

    With a fixed ``filename`` the file is replaced atomically on every save and never removed, so a crash or a
    kill never leaves the bundle without its ``models/model.pt``.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None):
        self.dirname = Path(dirname)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if _is_rank0():
            atomic_torch_save(checkpoint, self.dirname / (self.filename or filename))

    def remove(self, filename: str) -> None:
        if self.filename is None and _is_rank0():
            (self.dirname / filename).unlink(missing_ok=True)


def _is_rank0() -> bool:
    """True unless this is a non-zero rank of an initialised process group (replicas are identical there)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) with atomic writes (temporary file + rename).

    MONAI writes checkpoints in place (``atomic=False``) and removes a fixed-name best model before writing its
    replacement; this subclass swaps the save handler so that ``models/model.pt`` is always complete. It also
    offers ``state_dict`` so that the key-metric tracking (the best score so far) is part of the resumable
    training state: a resumed run does not overwrite a better ``model.pt`` saved before the interruption.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any):
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                old = ckpt.save_handler
                ckpt.save_handler = _AtomicFileSaver(save_dir, getattr(old, "filename", None))

    def state_dict(self) -> dict:
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is not None and state_dict:
            self._key_metric_checkpoint.load_state_dict(state_dict)


class ModuleSaver:
    """Writes ``module.state_dict()`` to ``path`` (atomically, rank 0 only) after every epoch.

    The output file of an auxiliary training stage (e.g. GKD's ``models/psae.pt`` and ``models/msan.pt``), which the
    next stage loads strictly.

    Args:
        module: what to save (a ``torch.nn.Module``; a ``DistributedDataParallel`` wrapper is unwrapped).
        path: the file.
    """

    def __init__(self, module: torch.nn.Module, path: str | os.PathLike):
        self.module = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, engine: Engine | None = None) -> None:
        if _is_rank0():
            atomic_torch_save(self.module.state_dict(), self.path)


class TrainingState:
    """Saves the full training state after every epoch and resumes from it when a run starts again.

    The state file (``torch.save`` of ``{name: obj.state_dict()}``, written atomically by rank 0) holds every
    object in ``objects`` (student, term adapters, adversaries, optimisers, schedulers, the best-model saver ...)
    plus the trainer itself (epoch and iteration counters) and its AMP grad scaler. If the file exists when the
    trainer starts, everything is restored (``weights_only=True``) and training continues at the next epoch with
    the same command. A state saved for another number of epochs or another epoch length (different data, batch
    size or GPU count) is refused with an error: its schedule and counters would not fit this run.

    Args:
        path: state file, e.g. ``models/train_state.pt``.
        objects: name -> object with ``state_dict``/``load_state_dict``.
        resume: ``False`` ignores an existing file (it is overwritten after the first epoch).
        save_interval: save every N epochs (the last epoch is always saved).
    """

    def __init__(self, path: str | os.PathLike, objects: Mapping[str, Any], resume: bool = True, save_interval: int = 1):
        self.path = Path(path)
        self.objects = {k: v for k, v in objects.items() if v is not None}
        self.resume = bool(resume)
        self.save_interval = max(1, int(save_interval))

    def attach(self, engine: Engine) -> None:
        if "trainer" in self.objects:
            raise ValueError("TrainingState adds the trainer itself under the name 'trainer'; rename that object")
        self.objects = {**self.objects, "trainer": engine}
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def load(self, engine: Engine) -> None:
        if not self.resume or not self.path.is_file():
            return
        state = torch.load(self.path, map_location=getattr(engine.state, "device", "cpu"), weights_only=True)
        missing = sorted(set(self.objects) - set(state))
        if missing:
            raise ValueError(f"training state {self.path} lacks {missing}; delete it to start from scratch")
        saved, now = state["trainer"], {"max_epochs": engine.state.max_epochs, "epoch_length": engine.state.epoch_length}
        changed = {k: (saved.get(k), v) for k, v in now.items() if v is not None and saved.get(k) != v}
        if changed:
            raise ValueError(
                f"training state {self.path} does not fit this run: "
                + ", ".join(f"{k} was {a}, is now {b}" for k, (a, b) in changed.items())
                + ". Delete the file (or pass --resume false) to start from scratch."
            )
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        logger.info(f"Resumed training from {self.path} at epoch {engine.state.epoch} of {engine.state.max_epochs}.")

    def save(self, engine: Engine) -> None:
        if engine.state.epoch % self.save_interval and engine.state.epoch != engine.state.max_epochs:
            return
        if not _is_rank0():
            return
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        atomic_torch_save(state, self.path)


class TermSchedule:
    """Epoch-dependent KD terms: calls ``set_epoch(epoch)`` on every term's loss module that has one (e.g. the
    gradient-reversal ramp of :class:`medkd.losses.LearnableTemperature`) and keeps the terms named in
    ``warmup_terms`` at weight 0 during the first ``warmup_epochs`` epochs, at every epoch start (so a resumed run
    gets the same values).

    Args:
        terms: the Distiller's terms (``$@distiller.terms``).
        warmup_epochs: epochs of warm-up (0: none).
        warmup_terms: names of the terms that wait for the warm-up to end.
    """

    def __init__(self, terms, warmup_epochs: int = 0, warmup_terms=()):
        self.terms = list(terms)
        self.warmup_epochs = int(warmup_epochs)
        names = {t.name for t in self.terms}
        unknown = sorted(set(warmup_terms) - names)
        if unknown:
            raise ValueError(f"warm-up terms {unknown} are not among the KD terms {sorted(names)}")
        self.weights = {t.name: t.weight for t in self.terms if t.name in set(warmup_terms)}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        for term in self.terms:
            if hasattr(term.loss, "set_epoch"):
                term.loss.set_epoch(epoch)
            if term.name in self.weights:
                term.weight = 0.0 if epoch <= self.warmup_epochs else self.weights[term.name]


def loss_scalars(output: Any) -> dict[str, float]:
    """Every loss scalar of a trainer output (``loss``, ``loss_*``, ``raw_*``), for StatsHandler/TensorBoard.

    Accepts the decollated list of per-sample dicts or a single dict.
    """
    first = output[0] if isinstance(output, (list, tuple)) else output
    return {
        k: float(v.item() if isinstance(v, torch.Tensor) else v)
        for k, v in first.items()
        if isinstance(k, str) and (k == "loss" or k.startswith(("loss_", "raw_")))
    }


class ProgressBar:
    """A tqdm progress bar (ignite's) over the iterations of an epoch, showing ``keys`` of the output.

    Args:
        desc: label of the bar (e.g. ``"train"``, ``"evaluate"``).
        keys: output scalars shown next to the bar (trainer: ``["loss"]``); empty for evaluators.
        persist: keep the finished bar on screen.
        only_tty: draw the bar only when stderr is a terminal (log files and CI logs get the StatsHandler lines
            instead of carriage-return noise).
    """

    def __init__(self, desc: str = "", keys: tuple[str, ...] | list[str] = (), persist: bool = False, only_tty: bool = True):
        self.desc = desc
        self.keys = tuple(keys)
        self.persist = persist
        self.only_tty = only_tty

    def _postfix(self, output: Any) -> dict[str, float]:
        scalars = loss_scalars(output)
        return {k: scalars[k] for k in self.keys if k in scalars}

    def attach(self, engine: Engine) -> None:
        if self.only_tty and not sys.stderr.isatty():
            return
        bar = _IgniteProgressBar(persist=self.persist, desc=self.desc, mininterval=1.0)
        bar.attach(engine, output_transform=self._postfix if self.keys else None)
