"""What an exact resume needs beyond the model and optimiser: every random state that drives training, the
hyper-parameters a stored state would silently override, and a strict reading of boolean options.

:class:`RandomStates` gathers the random generators of a training run (torch, CUDA, numpy, Python ``random``, the
data loader's sampler generator and the ``R`` of every MONAI random transform reachable from the data loader) so
that :class:`medkd.engines.TrainingState` can save them after an epoch and restore them on resume: the next epoch
then draws the same shuffle order, the same per-worker seeds and the same augmentations as the uninterrupted run.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform

__all__ = ["parse_bool", "RandomStates", "changed_hyperparameters"]

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(value: Any, key: str) -> bool:
    """``value`` as a boolean: ``True``/``False``, ``1``/``0`` or the strings true/false, 1/0, yes/no, on/off (any
    case), as a command line writes them (``--resume false`` arrives as the string ``'false'``).

    Raises:
        ValueError: naming ``key`` for anything else.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{key} must be true or false (also accepted: 1/0, yes/no, on/off), got {value!r}")


def _randomstate_to_tensors(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"keys": torch.as_tensor(np.asarray(keys, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached), "name": str(name)}


def _randomstate_from_tensors(state: dict) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached"]


def _children(obj: Any) -> list:
    """Datasets, transforms and generators held by a data loader, a dataset or a transform (not the data itself)."""
    out = []
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        items = value if isinstance(value, (list, tuple)) else [value]
        if items and isinstance(items[0], (torch.utils.data.Dataset, Transform, torch.utils.data.Sampler)):
            out += [v for v in items if isinstance(v, (torch.utils.data.Dataset, Transform, torch.utils.data.Sampler))]
    return out


class RandomStates:
    """The random states of a training run, with ``state_dict``/``load_state_dict`` (tensors and plain numbers
    only, so the state loads with ``weights_only=True``).

    Holds: the torch CPU generator (which also draws the data loader's shuffle order and per-worker base seed when
    the sampler has no generator of its own), the CUDA generators when CUDA is initialised, numpy's and Python's
    global generators, the generator of the data loader and of its sampler when they have one, and the ``R``
    (numpy ``RandomState``) of every MONAI ``Randomizable`` reachable from ``loader`` (its dataset, wrapped datasets,
    their ``Compose`` transforms, nested transforms), in a fixed traversal order.

    Args:
        loader: the training data loader (``None``: global generators only).
    """

    def __init__(self, loader: Any = None):
        self.loader = loader

    def _walk(self) -> tuple[list[np.random.RandomState], list[torch.Generator]]:
        states, generators, seen, todo = [], [], set(), [self.loader] if self.loader is not None else []
        while todo:
            obj = todo.pop(0)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, Randomizable) and isinstance(getattr(obj, "R", None), np.random.RandomState):
                if all(obj.R is not s for s in states):
                    states.append(obj.R)
            gen = getattr(obj, "generator", None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in generators):
                generators.append(gen)
            todo += _children(obj)
        return states, generators

    def state_dict(self) -> dict:
        transforms, generators = self._walk()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _randomstate_to_tensors(np.random.get_state()),
            "python": {"version": random.getstate()[0], "keys": torch.tensor(random.getstate()[1], dtype=torch.int64),
                       "gauss": random.getstate()[2]},
            "transforms": [_randomstate_to_tensors(r.get_state()) for r in transforms],
            "generators": [g.get_state() for g in generators],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        transforms, generators = self._walk()
        if len(state["transforms"]) != len(transforms) or len(state["generators"]) != len(generators):
            raise ValueError(
                f"the stored random states are for {len(state['transforms'])} random transforms and "
                f"{len(state['generators'])} data generators, this run has {len(transforms)} and {len(generators)} "
                "(the transforms or the data loader changed)"
            )
        torch.set_rng_state(state["torch"])
        np.random.set_state(_randomstate_from_tensors(state["numpy"]))
        py = state["python"]
        random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
        for r, s in zip(transforms, state["transforms"]):
            r.set_state(_randomstate_from_tensors(s))
        for g, s in zip(generators, state["generators"]):
            g.set_state(s)
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


# Entries of a scheduler's state_dict that change while training; every other entry is a hyper-parameter.
_SCHEDULER_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial", "base_lrs"}


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(_differs(a[k], b[k]) for k in a)
    return a != b


def changed_hyperparameters(name: str, obj: Any, stored: Any) -> list[str]:
    """Hyper-parameters of ``obj`` (an optimiser or a learning-rate scheduler) that its ``stored`` state dict would
    override on resume, as ``"<name> <field>: stored X, now Y"`` lines (empty for other objects or no change).

    Optimiser: every param-group entry except ``params`` and the scheduled ``lr`` (the group's ``initial_lr``, set by
    a scheduler, is compared instead; without a scheduler ``lr`` is compared). Scheduler: every entry except its
    progress counters.
    """
    out = []
    if isinstance(obj, torch.optim.Optimizer) and isinstance(stored, dict) and "param_groups" in stored:
        for i, (now, old) in enumerate(zip(obj.state_dict()["param_groups"], stored["param_groups"])):
            skip = {"params"} | ({"lr"} if "initial_lr" in now or "initial_lr" in old else set())
            for key in sorted((set(now) | set(old)) - skip):
                if _differs(old.get(key), now.get(key)):
                    group = f" group {i}" if len(stored["param_groups"]) > 1 else ""
                    hint = " (the learning rate, e.g. --learning_rate)" if key in ("lr", "initial_lr") else ""
                    out.append(f"{name}{group} {key}{hint}: stored {old.get(key)}, now {now.get(key)}")
    elif isinstance(obj, torch.optim.lr_scheduler.LRScheduler) and isinstance(stored, dict):
        now = obj.state_dict()
        for key in sorted((set(now) | set(stored)) - _SCHEDULER_PROGRESS - {"optimizer"}):
            if _differs(stored.get(key), now.get(key)):
                out.append(f"{name} {key}: stored {stored.get(key)}, now {now.get(key)}")
    return out
