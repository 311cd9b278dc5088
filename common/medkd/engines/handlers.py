"""Handlers for KD training: atomic best-model saving, resumable training state, progress bar, log transforms."""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver
from monai.handlers import ValidationHandler as _MonaiValidationHandler

from medkd.engines.resume import RandomStates, changed_hyperparameters, parse_bool
from medkd.io import atomic_torch_save, remove_stale_temp_files

__all__ = [
    "AtomicCheckpointSaver", "ModuleSaver", "TermSchedule", "TrainingState", "ValidationHandler", "ProgressBar", "loss_scalars"
]

logger = logging.getLogger(__name__)


class _AtomicFileSaver(BaseSaveHandler):
    """Ignite save handler writing through :func:`medkd.io.atomic_torch_save`.

    With a fixed ``filename`` the file is replaced atomically on every save and never removed, so a crash or a
    kill never leaves the bundle without its ``models/model.pt``. When ``deferred`` (set by a
    :class:`TrainingState`), a save is staged as ``.<filename>.<token>.pending`` and only :meth:`commit` (called
    right after the training state that records ``token`` is written) renames it into place: the best model and
    the training state then always describe the same epoch, whatever the moment of a kill.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None):
        self.dirname = Path(dirname)
        self.filename = filename
        self.deferred = False
        self.pending: str | None = None  # token of the staged file that the next training state will commit
        self.owned = False  # the fixed-name file was written by this run (or by the run it resumes)

    def staged(self, token: str) -> Path:
        return self.dirname / f".{self.filename}.{token}.pending"

    def stale_staged(self, keep: str | None = None) -> list[Path]:
        """Staged files other than the one of token ``keep``."""
        if not self.filename or not self.dirname.is_dir():
            return []
        prefix, keep_name = f".{self.filename}.", keep and self.staged(keep).name
        return sorted(p for p in self.dirname.iterdir()
                      if p.name.startswith(prefix) and p.name.endswith(".pending") and p.name != keep_name)

    def keep_previous(self) -> Path | None:
        """Rename a fixed-name file that this run did not write to ``<stem>.replaced-<its mtime><suffix>``, once."""
        if self.owned or not self.filename:
            return None
        self.owned = True
        target = self.dirname / self.filename
        if not (_is_rank0() and target.is_file()):
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(target.stat().st_mtime))
        kept = target.with_name(f"{target.stem}.replaced-{stamp}{target.suffix}")
        os.replace(target, kept)
        logger.warning(f"{target} was not written by this run (nothing to resume): kept it as {kept}; this run saves "
                       f"its own best model as {target}.")
        return kept

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if not _is_rank0():
            return
        self.keep_previous()
        if self.deferred and self.filename:
            if self.pending:
                self.staged(self.pending).unlink(missing_ok=True)
            self.pending = uuid.uuid4().hex
            atomic_torch_save(checkpoint, self.staged(self.pending))
        else:
            atomic_torch_save(checkpoint, self.dirname / (self.filename or filename))

    def commit(self, token: str | None = None) -> None:
        """Rename the staged file of ``token`` (default: the current one) into place, if it is still there."""
        token = token or self.pending
        if token and _is_rank0() and self.staged(token).is_file():
            os.replace(self.staged(token), self.dirname / self.filename)
        if token == self.pending:
            self.pending = None

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
    offers ``state_dict`` so that the key-metric tracking (the best score so far, and the evaluator's
    ``best_metric``/``best_metric_epoch``) is part of the resumable training state: a resumed run compares against
    the stored best and does not overwrite a better ``model.pt`` saved before the interruption.

    Under a :class:`TrainingState` (which calls :meth:`defer`), a new best model is staged and renamed to its name
    only once the training state that records it is written (:meth:`commit`); a fresh run (nothing to resume) keeps
    an existing best-model file of an earlier run beside it (``model.replaced-<time>.pt``) instead of overwriting it,
    and says so.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any):
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        self._engine: Engine | None = None
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                old = ckpt.save_handler
                ckpt.save_handler = _AtomicFileSaver(save_dir, getattr(old, "filename", None))

    @property
    def _key_handler(self) -> _AtomicFileSaver | None:
        return self._key_metric_checkpoint.save_handler if self._key_metric_checkpoint is not None else None

    @property
    def files(self) -> list[Path]:
        """The fixed-name files this saver writes (their stale temporary files are removed at a restart)."""
        return [h.dirname / h.filename for c in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint)
                if c is not None and (h := c.save_handler).filename]

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        super().attach(engine)

    def defer(self) -> None:
        """Stage best-model writes until :meth:`commit` (see the class docstring)."""
        if self._key_handler is not None:
            self._key_handler.deferred = True

    def commit(self) -> None:
        if self._key_handler is not None:
            self._key_handler.commit()

    def start(self, resumed: bool) -> None:
        """At the start of a training run: remove stale temporary and staged files; a fresh run keeps an earlier
        run's best model beside it (see the class docstring)."""
        if not _is_rank0():
            return
        handler = self._key_handler
        removed = remove_stale_temp_files(*self.files)
        if handler is not None:
            for path in handler.stale_staged(keep=handler.pending):
                path.unlink()
                removed.append(path)
            if not resumed:
                handler.keep_previous()
            else:
                handler.owned = True
        if removed:
            logger.info(f"Removed {len(removed)} temporary file(s) left by an interrupted run: {[p.name for p in removed]}")

    def state_dict(self) -> dict:
        if self._key_metric_checkpoint is None:
            return {}
        state = {"key_metric": self._key_metric_checkpoint.state_dict(), "pending": self._key_handler.pending or ""}
        if self._engine is not None and hasattr(self._engine.state, "best_metric"):  # MONAI workflows track it
            state["best_metric"] = float(self._engine.state.best_metric)
            state["best_metric_epoch"] = int(self._engine.state.best_metric_epoch)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is None or not state_dict:
            return
        self._key_handler.owned = True  # resuming: the best-model file is this run's
        if "key_metric" not in state_dict:  # a state written before the best metric and the staging were recorded
            self._key_metric_checkpoint.load_state_dict(state_dict)
            return
        self._key_metric_checkpoint.load_state_dict(state_dict["key_metric"])
        if state_dict.get("pending"):  # killed after the state was written, before its model was renamed into place
            self._key_handler.commit(state_dict["pending"])
        if self._engine is not None and "best_metric" in state_dict:
            self._engine.state.best_metric = state_dict["best_metric"]
            self._engine.state.best_metric_epoch = state_dict["best_metric_epoch"]


def _quiet_validation_restart(record: logging.LogRecord) -> bool:
    """Drops Ignite's "Engine run resuming from iteration 0, ..." that an evaluator logs at every validation."""
    return not str(record.msg).startswith("Engine run resuming from iteration 0,")


class ValidationHandler(_MonaiValidationHandler):
    """MONAI's epoch-level ``ValidationHandler`` that also validates after the last epoch when ``interval`` does not
    divide ``max_epochs``, so a run always ends with a validated (and saved) best model.

    Args:
        interval: validate every N epochs (the ``val_interval`` key); must be at least 1.
        validator: the evaluator.
        exec_at_start: also validate before the first epoch.
    """

    def __init__(self, interval: int, validator=None, exec_at_start: bool = False):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"val_interval must be an integer of at least 1 (validate every N epochs), got {interval!r}")
        super().__init__(interval=interval, validator=validator, epoch_level=True, exec_at_start=exec_at_start)

    def attach(self, engine: Engine) -> None:
        if self.validator is not None:  # MONAI's evaluator restarts at the trainer's epoch: not a resume, no news
            self.validator.logger.addFilter(_quiet_validation_restart)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._maybe_validate)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)

    def _maybe_validate(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval == 0 or engine.state.epoch == engine.state.max_epochs:
            self(engine)


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


def _check_epochs(max_epochs: Any) -> None:
    if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1):
        raise ValueError(f"epochs must be an integer of at least 1, got {max_epochs!r}")


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


_RESTART = "pass --resume false (or delete the file) to start from scratch"


class TrainingState:
    """Saves the full training state after every epoch and resumes from it when a run starts again.

    The state file (``torch.save`` of ``{name: obj.state_dict()}``, written atomically by rank 0) holds every
    object in ``objects`` (student, term adapters, adversaries, optimisers, schedulers, the best-model saver ...)
    plus the trainer itself (epoch and iteration counters), its AMP grad scaler and every random state that drives
    training (:class:`medkd.engines.resume.RandomStates` of the trainer's data loader: torch, numpy, Python, the
    sampler and the MONAI random transforms). If the file exists when the trainer starts, everything is restored
    (``weights_only=True``) and training continues at the next epoch with the same command; on CPU the resumed run
    ends with the same weights, bit for bit, as the run it replaces, wherever it was interrupted.

    Refused with an error naming the file and saying to pass ``--resume false``: a file that cannot be read, a
    state of another network (or other objects), another number of epochs (``epochs``: a stored run is not
    extended, its schedule was built for its own length), another epoch length (different data, batch size or GPU
    count), and hyper-parameters that the stored state would silently override (the optimisers' and schedulers'
    settings, e.g. a changed ``learning_rate``), each named.

    At every start it removes the temporary files a killed write of its own file or of a best-model saver's files
    left behind; it makes every :class:`AtomicCheckpointSaver` among ``objects`` stage its best model until the
    state recording it is written (:meth:`AtomicCheckpointSaver.defer`).

    Args:
        path: state file, e.g. ``models/train_state.pt``.
        objects: name -> object with ``state_dict``/``load_state_dict``.
        resume: ``False`` ignores an existing file (it is overwritten after the first epoch); booleans and the
            strings true/false, 1/0, yes/no (any case) are accepted, as the command line passes them.
        save_interval: save every N epochs (the last epoch is always saved).
    """

    def __init__(self, path: str | os.PathLike, objects: Mapping[str, Any], resume: bool | str = True, save_interval: int = 1):
        self.path = Path(path)
        self.objects = {k: v for k, v in objects.items() if v is not None}
        self.resume = parse_bool(resume, "resume")
        self.save_interval = max(1, int(save_interval))
        self.savers = [v for v in self.objects.values() if isinstance(v, AtomicCheckpointSaver)]
        for saver in self.savers:
            saver.defer()

    def attach(self, engine: Engine) -> None:
        for reserved in ("trainer", "random_states"):
            if reserved in self.objects:
                raise ValueError(f"TrainingState adds '{reserved}' itself; rename that object")
        _check_epochs(getattr(engine.state, "max_epochs", None))
        loader = getattr(engine, "data_loader", None)
        self.objects = {**self.objects, "trainer": engine, "random_states": RandomStates(loader)}
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _read(self, engine: Engine) -> dict:
        try:
            state = torch.load(self.path, map_location=getattr(engine.state, "device", "cpu"), weights_only=True)
        except Exception as e:  # truncated, garbage, not weights-only: many exception types
            raise ValueError(f"cannot read the training state {self.path} ({_one_line(e)[:300]}); {_RESTART}.") from e
        if not isinstance(state, dict):
            raise ValueError(f"training state {self.path} holds a {type(state).__name__}, not a training state; {_RESTART}.")
        return state

    def load(self, engine: Engine) -> None:
        _check_epochs(engine.state.max_epochs)
        if _is_rank0():
            removed = remove_stale_temp_files(self.path)
            if removed:
                logger.info(f"Removed {len(removed)} temporary file(s) left by an interrupted run: {[p.name for p in removed]}")
        resumed = self.resume and self.path.is_file()
        if resumed:
            self._restore(engine, self._read(engine))
        for saver in self.savers:
            saver.start(resumed)

    def _restore(self, engine: Engine, state: dict) -> None:
        missing = sorted(set(self.objects) - set(state) - {"random_states"})
        if missing:
            raise ValueError(f"training state {self.path} lacks {missing} (saved by another configuration); {_RESTART}.")
        saved = state["trainer"]
        problems = []
        if saved.get("max_epochs") != engine.state.max_epochs:
            problems.append(f"epochs: stored run has {saved.get('max_epochs')}, this run {engine.state.max_epochs} (a stored "
                            "run is not extended or shortened: its learning-rate schedule was built for its own length)")
        if engine.state.epoch_length is not None and saved.get("epoch_length") != engine.state.epoch_length:
            problems.append(f"iterations per epoch: stored {saved.get('epoch_length')}, now {engine.state.epoch_length} (the "
                            "training list, batch_size or number of GPUs changed)")
        for name, obj in self.objects.items():
            problems += changed_hyperparameters(name, obj, state.get(name))
        if problems:
            raise ValueError(f"training state {self.path} does not fit this run: " + "; ".join(problems) + f"; {_RESTART}.")
        for name, obj in self.objects.items():
            if name == "random_states" and name not in state:
                logger.warning(f"{self.path} holds no random states (an older file): the resumed run is not bit-exact.")
                continue
            try:
                obj.load_state_dict(state[name])
            except Exception as e:
                raise ValueError(f"cannot resume from the training state {self.path}: its '{name}' does not fit this run "
                                 f"({_one_line(e)[:300]}); {_RESTART}.") from e
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
        for saver in self.savers:  # the state now records the staged best model: rename it into place
            saver.commit()


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
