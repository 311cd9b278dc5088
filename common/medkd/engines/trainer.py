"""KDTrainer: MONAI's SupervisedTrainer driving a :class:`medkd.distill.Distiller`."""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from medkd.data.mixing import BatchMixing, MixedBatch, mixed_task_loss
from medkd.distill import Distiller

__all__ = ["KDTrainer", "AdversaryStep", "ObjectiveTrainer", "mean_across_ranks"]


def amp_enabled(engine: SupervisedTrainer) -> bool:
    """Whether this iteration runs under CUDA autocast (AMP requested, a grad scaler, a CUDA device)."""
    return bool(engine.amp and engine.scaler is not None and torch.device(engine.state.device).type == "cuda")


def backward_and_step(engine: SupervisedTrainer, loss: torch.Tensor, use_amp: bool) -> None:
    """Backward pass and optimiser step of ``engine`` (through its grad scaler under AMP); fires BACKWARD_COMPLETED."""
    if use_amp:
        engine.scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()


def mean_across_ranks(scalars: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean of each scalar over the ranks of the default process group (one all-reduce for all of them).

    Without an initialised process group (or with one rank) the values come back unchanged. Every rank must call
    it with the same keys (the KD trainer does, every iteration), as for any collective.
    """
    dist = torch.distributed
    if not scalars or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return scalars
    keys = sorted(scalars)
    device = scalars[keys[0]].device
    packed = torch.stack([scalars[k].detach().to(device=device, dtype=torch.float32).reshape(()) for k in keys])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.unbind(0)))


def finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on this rank and (under DDP) on every other: all ranks stop together instead of
    one hanging in the next collective."""
    finite = torch.isfinite(loss.detach()).to(torch.float32)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


class AdversaryStep:
    """An extra optimisation step run right after each student step (e.g. a discriminator, WGAN-GP).

    Subclasses implement :meth:`step`, which reads the step's feature dict (``s.logits``, ``t.logits``, taps,
    ``label``; all still attached to the student's graph, detach what the adversary must not backpropagate
    into), updates the adversary with its own optimiser, and returns scalars to log (``loss_<name>`` keys).
    ``state_dict``/``load_state_dict`` make it part of the resumable training state.
    """

    def step(self, engine: "KDTrainer", features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class KDTrainer(SupervisedTrainer):
    """Trains the student of a :class:`~medkd.distill.Distiller` (task loss + weighted KD terms).

    ``engine.network`` is the Distiller (student + term adapters + frozen teacher), so DDP, ``train()`` and
    the optimiser see exactly what is trained; the bundle's ``network`` (the student alone) is what validation,
    checkpoints, export and MONAI Label use. Each iteration: teacher forward (no grad) -> student forward with
    taps -> task loss + terms -> backward -> optimiser step -> adversary steps. ``engine.state.output`` holds
    ``image``, ``label``, ``pred`` (student logits) and the scalars ``loss``, ``loss_task``, ``loss_<term>``
    (weighted), ``raw_<term>`` (unweighted) and whatever the adversaries return, each averaged over the ranks when
    a process group is initialised (DDP), so rank 0's logs show the global values. A non-finite loss stops
    training with an error naming the term (the last saved checkpoint is kept). AMP applies on CUDA devices.

    Offline KD: with ``teacher_cache`` the Distiller serves the teacher outputs from the cache
    (:meth:`~medkd.distill.Distiller.use_teacher_cache`): the training data loader's dataset must be a
    :class:`~medkd.distill.TeacherViews` over the same cache, whose batches carry the cached ``t.*`` tensors; the
    trainer passes them on. Whenever the loader's dataset has ``set_epoch`` (recorded views), the trainer calls it with
    the 0-based epoch at every epoch start.

    Batch mixing (``batch_mixing``, off by default; Beyer et al., CVPR 2022: KD as function matching on consistent,
    mixed views): every batch is mixed by a :class:`~medkd.data.mixing.BatchMixing` (mixup or CutMix) right after
    ``prepare_batch``, *before* both networks, so the teacher sees exactly the mixed image the student sees and its
    outputs on it are the KD targets. The task loss follows :func:`~medkd.data.mixing.mixed_task_loss`: CutMix pastes
    the same box into the label maps, so the task loss and every term that reads ``label`` see the exact label of the
    mixed image; mixup's task loss is ``lam · L(pred, label) + (1 - lam) · L(pred, label[index])``, while terms that
    read ``label`` (e.g. EMKD's region affinity, IFVD) see ``label``, the label map of the image weighted ``lam`` (a
    mixup image has no single label map). Semi-supervised batches: a mixed sample counts as labelled only when both
    of its sources are. ``engine.state.output`` holds the mixed images and the labels the terms saw (training
    metrics are computed on them). The mixing's generator state belongs in the resumable training state (the
    bundles pass the same object to :class:`~medkd.engines.TrainingState` as ``batch_mixing``). Batch mixing cannot
    be combined with ``teacher_cache`` (the cached outputs belong to unmixed images): refused at construction.

    Args:
        distiller: the :class:`~medkd.distill.Distiller` to train, or a ``DistributedDataParallel`` wrapping it
            (multi-GPU); passed to MONAI as ``network``.
        optimizer: optimiser over ``distiller.trainable_parameters()``.
        adversaries: :class:`AdversaryStep` objects run after each student step, in order.
        teacher_cache: a teacher cache folder (``python -m medkd cache-teacher``), or ``None`` for the live teacher.
        batch_mixing: a :class:`~medkd.data.mixing.BatchMixing`, or a dict of its arguments (``mode``, ``alpha``,
            ``prob``, ``seed``), or ``None`` (default: no mixing, every step exactly as without this argument).
        compile: run the student (and a live teacher) through ``torch.compile`` (``nn.Module.compile``: weights,
            state dicts and taps unchanged); where compilation fails, the first iteration falls back to eager mode
            with a warning.
        kwargs: every other argument of ``monai.engines.SupervisedTrainer`` except ``network`` and
            ``loss_function`` (the Distiller's task loss is used), e.g. ``device``, ``max_epochs``,
            ``train_data_loader``, ``train_handlers``, ``key_train_metric``, ``postprocessing``, ``amp``.
    """

    def __init__(self, distiller: Distiller, optimizer: torch.optim.Optimizer, adversaries: Sequence[AdversaryStep] = (),
                 teacher_cache: str | None = None, compile: bool = False,
                 batch_mixing: BatchMixing | Mapping[str, Any] | None = None, **kwargs: Any):
        for key in ("network", "loss_function", "iteration_update", "accumulation_steps", "compile_kwargs"):
            if key in kwargs:
                raise TypeError(f"KDTrainer does not take '{key}': the Distiller defines the network and its losses")
        core = distiller.module if isinstance(distiller, torch.nn.parallel.DistributedDataParallel) else distiller
        if not isinstance(core, Distiller):
            raise TypeError(f"KDTrainer needs a medkd.distill.Distiller (optionally DDP-wrapped), got {type(core).__name__}")
        if isinstance(batch_mixing, Mapping):
            batch_mixing = BatchMixing(**batch_mixing)
        if batch_mixing is not None and not isinstance(batch_mixing, BatchMixing):
            raise TypeError(f"batch_mixing must be a medkd.data.mixing.BatchMixing, a dict of its arguments or None, "
                            f"got {type(batch_mixing).__name__}")
        if batch_mixing is not None and teacher_cache:
            raise ValueError(
                f"batch_mixing ({batch_mixing.mode}) and teacher_cache ({teacher_cache}) cannot be combined: the cached "
                "teacher outputs belong to the unmixed images, the student would see mixed ones; set batch_mixing to "
                "null to train from the cache, or teacher_cache to null to mix batches with the live teacher"
            )
        self.batch_mixing = batch_mixing
        super().__init__(network=distiller, optimizer=optimizer, loss_function=core.task_loss, **kwargs)
        self.distiller = core
        self.adversaries = list(adversaries or [])
        dataset = getattr(self.data_loader, "dataset", None)
        if teacher_cache:
            cache = getattr(dataset, "cache", None)
            if cache is None:
                raise ValueError(
                    f"teacher_cache {teacher_cache} is set but the training data loader's dataset "
                    f"({type(dataset).__name__}) carries no cached outputs: wrap it in "
                    "medkd.distill.TeacherViews(dataset, cache=teacher_cache)"
                )
            core.use_teacher_cache(cache)
        if hasattr(dataset, "set_epoch"):
            self.add_event_handler(Events.EPOCH_STARTED, lambda engine: dataset.set_epoch(engine.state.epoch - 1))
        self._compiled: list[torch.nn.Module] = []
        self._compile_tried = False
        if compile:
            self._compiled = [core.student]
            live = getattr(core.teacher, "network", None)
            if live is not None and not hasattr(core.teacher, "cache"):
                self._compiled.append(live)
            for module in self._compiled:
                module.compile()

    def _uncompile(self, error: BaseException) -> None:
        warnings.warn(f"torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                      "training continues in eager mode", RuntimeWarning, stacklevel=2)
        for module in self._compiled:
            module._compiled_call_impl = None  # back to the eager forward
        self._compiled = []
        torch._dynamo.reset()

    def _mixup_task(self, out: dict, mixed: MixedBatch, labelled) -> None:
        """Replace the Distiller's task loss ``L(pred, label)`` in ``out`` by mixup's
        ``lam · L(pred, label) + (1 - lam) · L(pred, label_b)`` (on the labelled samples)."""
        pred, label, label_b = out["pred"], mixed.label, mixed.label_b
        if labelled is not None:
            mask = torch.as_tensor(labelled, dtype=torch.bool).view(-1).to(pred.device)
            if not bool(mask.any()):
                return  # no labelled sample: the task loss is 0 either way
            pred, label, label_b = pred[mask], label[mask], label_b[mask]

        def task(p, y):
            value = self.distiller.task_loss(p, y)
            return value.mean() if value.ndim else value

        plain = task(pred, label)  # what the Distiller added to the total
        mixed_task = mixed_task_loss(task, pred, label, label_b, mixed.lam)
        out["loss"] = out["loss"] - plain + mixed_task
        out["loss_task"] = mixed_task.detach()

    def _forward_backward(self, engine: "KDTrainer", inputs, targets, labelled, teacher_outputs,
                          mixed: MixedBatch | None = None) -> dict:
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = amp_enabled(engine)
        with torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {})):
            out = engine.network(inputs, targets, labelled, teacher_outputs=teacher_outputs)
            if mixed is not None and mixed.label_b is not None and targets is not None:
                self._mixup_task(out, mixed, labelled)
        engine.state.output[Keys.PRED] = out["pred"]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = out["loss"]
        self._check_finite(engine, out)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        backward_and_step(engine, loss, use_amp)
        return out

    def _iteration(self, engine: "KDTrainer", batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        labelled = batchdata.get("labelled") if isinstance(batchdata, dict) else None
        teacher_outputs = None
        if isinstance(batchdata, dict) and any(isinstance(k, str) and k.startswith("t.") for k in batchdata):
            teacher_outputs = {k: torch.as_tensor(v).to(engine.state.device, non_blocking=engine.non_blocking)
                               for k, v in batchdata.items() if isinstance(k, str) and k.startswith("t.")}
        mixed = None
        if self.batch_mixing is not None:  # before both networks: the teacher sees the mixed image too
            mixed = self.batch_mixing(inputs, targets, labelled)
            inputs, targets = mixed.image, mixed.label
            if labelled is not None:
                labelled = mixed.labelled
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        engine.network.train()
        if self._compiled and not self._compile_tried:
            self._compile_tried = True
            try:  # the first compiled step: compilation errors surface here; fall back to eager mode
                out = self._forward_backward(engine, inputs, targets, labelled, teacher_outputs, mixed)
            except FloatingPointError:
                raise
            except Exception as error:  # noqa: BLE001 - any compiler failure; eager mode re-raises real errors
                self._uncompile(error)
                out = self._forward_backward(engine, inputs, targets, labelled, teacher_outputs, mixed)
        else:
            out = self._forward_backward(engine, inputs, targets, labelled, teacher_outputs, mixed)

        features = out.pop("features")
        for adversary in self.adversaries:
            out.update(adversary.step(engine, features))
        del features
        # logged scalars: the mean over the ranks under DDP (the gradients are averaged the same way)
        engine.state.output.update(mean_across_ranks({k: v.detach() for k, v in out.items() if k.startswith(("loss", "raw_"))}))
        engine.state.output[Keys.PRED] = out["pred"].detach()
        if labelled is not None:  # training metrics see labelled samples only (the others carry placeholder labels)
            mask = torch.as_tensor(labelled, dtype=torch.bool, device=out["pred"].device).view(-1)
            if bool(mask.any()):
                for key in (Keys.IMAGE, Keys.LABEL, Keys.PRED):
                    engine.state.output[key] = engine.state.output[key][mask]
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    @staticmethod
    def _check_finite(engine: "KDTrainer", out: dict) -> None:
        if finite_on_all_ranks(out["loss"]):
            return
        checked = [k for k in out if k == "loss_task" or k.startswith("raw_")]
        bad = [k for k in checked if not math.isfinite(float(out[k]))]
        names = [k[4:] if k.startswith("raw_") else "task" for k in bad] or ["total"]
        raise FloatingPointError(
            f"non-finite loss at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
            f"term(s) {names} = {[float(out[k]) for k in bad]}"
            + (" (in the sum of the terms, or on another rank)" if not bad else "")
            + ". Training stopped before the optimiser step; "
            "the last saved checkpoint is kept. Lower the learning rate or the term's weight, or check the inputs."
        )


class ObjectiveTrainer(SupervisedTrainer):
    """Trains a module that computes its own objective: ``objective(image, label) -> {"loss": ..., "loss_*": ...}``.

    For the auxiliary stages of multi-stage methods (GKD's semantic autoencoder and alignment networks): MONAI's
    ``SupervisedTrainer`` loop (handlers, AMP on CUDA, DDP) around an objective module that holds its own frozen
    parts. ``engine.state.output`` holds ``loss`` and every other ``loss_*`` / ``raw_*`` scalar the objective
    returns (averaged over the ranks under DDP); a non-finite loss stops training naming the scalars.

    Args:
        objective: the module (or a ``DistributedDataParallel`` wrapping it); its trainable parameters are those
            the optimiser holds.
        optimizer: the optimiser.
        kwargs: other ``monai.engines.SupervisedTrainer`` arguments (device, max_epochs, train_data_loader,
            train_handlers, amp, ...).
    """

    def __init__(self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any):
        for key in ("network", "loss_function", "iteration_update"):
            if key in kwargs:
                raise TypeError(f"ObjectiveTrainer does not take '{key}': the objective module defines both")
        super().__init__(network=objective, optimizer=optimizer, loss_function=lambda *a: None, **kwargs)

    def _iteration(self, engine: "ObjectiveTrainer", batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = amp_enabled(engine)
        with torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {})):
            out = engine.network(image, label)
        loss = out["loss"]
        if not finite_on_all_ranks(loss):
            scalars = {k: float(v) for k, v in out.items() if k.startswith(("loss", "raw_"))}
            raise FloatingPointError(f"non-finite objective at epoch {engine.state.epoch}, iteration "
                                     f"{engine.state.iteration}: {scalars}; lower the learning rate or check the inputs")
        backward_and_step(engine, loss, use_amp)
        engine.state.output = mean_across_ranks({k: v.detach() for k, v in out.items() if k.startswith(("loss", "raw_"))})
        return engine.state.output
