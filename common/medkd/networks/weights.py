"""Loading a user's weight file into a network or one of its parts (e.g. ImageNet ResNet weights into an encoder).

No weights are ever downloaded: the user passes a file (a ``torch.save``-d state dict, or a checkpoint dict that
holds one under ``model``/``state_dict``/``network``). Keys are matched after dropping DataParallel/DDP
``module.`` prefixes, optionally taking only the keys under ``source_prefix`` and skipping ``ignore`` prefixes
(a classifier head the segmentation network does not have). Any missing key, unexpected key or shape mismatch is
an error that lists them, never a silently half-initialised network.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch.nn as nn

from medkd.io import load_state_dict_file

__all__ = ["load_weights"]

_CONTAINER_KEYS = ("model", "state_dict", "network")


def _unwrap(state: dict) -> dict:
    for key in _CONTAINER_KEYS:
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def load_weights(
    module: nn.Module,
    path: str | os.PathLike,
    source_prefix: str = "",
    ignore: Sequence[str] = (),
    strict: bool = True,
    transform: Callable[[dict], dict] | None = None,
) -> nn.Module:
    """Copy the tensors of the file at ``path`` into ``module`` and return ``module``.

    Args:
        module: the network, or the part of it the file describes (e.g. ``raunet.encoder``).
        path: weight file written by ``torch.save`` (read with ``weights_only=True``).
        source_prefix: take only the file's keys starting with this prefix, with the prefix removed
            (e.g. ``"backbone."`` to take a backbone out of a whole-network checkpoint).
        ignore: key prefixes of the file (after ``source_prefix`` is removed) to skip, e.g. ``("fc.",)``.
        strict: when False, keys of ``module`` absent from the file keep their values (they are still reported
            if nothing at all matched); unexpected keys and shape mismatches are always errors.
        transform: applied to the selected ``{key: tensor}`` before matching, e.g. to sum a 3-channel stem's
            weights over the input axis for a 1-channel network (the same as feeding it a grey image replicated
            to 3 channels).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is unreadable, or its keys or shapes do not match ``module``.
    """
    state = _unwrap(load_state_dict_file(path, key=None))
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    if source_prefix:
        state = {k[len(source_prefix) :]: v for k, v in state.items() if k.startswith(source_prefix)}
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
    if transform is not None:
        state = transform(state)
    own = module.state_dict()
    name = type(module).__name__
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:5]}")
    if missing and (strict or len(missing) == len(own)):
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if problems:
        hint = f" (taking keys under '{source_prefix}')" if source_prefix else ""
        raise ValueError(f"weights {path} do not fit {name}{hint}: " + "; ".join(problems))
    module.load_state_dict(state, strict=strict)
    return module
