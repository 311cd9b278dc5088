"""Named tap points: where KD losses read intermediate features of a network.

A tap is either an alias declared by the network (``tap_points``: alias -> dotted module path) or a raw dotted
module path into any ``torch.nn.Module`` (``model.1.submodule.0``). Networks that do not declare ``tap_points``
get them from :data:`ALIAS_TABLES` when their class is registered there (MONAI's UNet, BasicUNet, SegResNet and
SwinUNETR), so MONAI networks work as teachers and students by alias without wrappers.

Aliases shared by every network: ``low`` (first feature at output stride 2) and ``high`` (encoder feature at
output stride 8), the two taps EMKD uses; ``enc<k>`` / ``dec<k>`` for the encoder / decoder feature at stride
2**k (Graph Flow taps ``enc2`` and ``dec2``); ``bottleneck`` for the deepest encoder feature (GKD, MTMS-CKD).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from monai.networks.nets import BasicUNet, SegResNet, SwinUNETR, UNet

__all__ = ["ALIAS_TABLES", "register_tap_aliases", "tap_points_of", "resolve_tap"]

AliasTable = Callable[[nn.Module], dict[str, str]]
ALIAS_TABLES: dict[type, AliasTable] = {}


def register_tap_aliases(cls: type) -> Callable[[AliasTable], AliasTable]:
    """Decorator registering a function ``net -> {alias: dotted path}`` for instances of ``cls``."""

    def wrap(fn: AliasTable) -> AliasTable:
        ALIAS_TABLES[cls] = fn
        return fn

    return wrap


def _stride_aliases(paths_by_stride: dict[int, str], decoder_by_stride: dict[int, str] | None = None) -> dict[str, str]:
    aliases = {f"enc{s.bit_length() - 1}": p for s, p in paths_by_stride.items()}
    aliases.update({f"dec{s.bit_length() - 1}": p for s, p in (decoder_by_stride or {}).items()})
    if 2 in paths_by_stride:
        aliases["low"] = paths_by_stride[2]
    if 8 in paths_by_stride:
        aliases["high"] = paths_by_stride[8]
    return aliases


@register_tap_aliases(UNet)
def _monai_unet_taps(net: UNet) -> dict[str, str]:
    """MONAI UNet nests each level as ``model.1.submodule...``; level k's encoder block is ``<prefix>.0`` and its
    up block ``<prefix>.2`` (the outermost up block produces the logits, so it is no decoder tap).

    The deepest (bottom) block runs at the stride of the last downsampling level; when that stride is 8 it is
    the ``high`` tap's fallback only if no encoder block reaches stride 8 first.
    """
    paths: dict[int, str] = {}
    decoder: dict[int, str] = {}
    prefix, stride = "model", 1
    strides = [int(s) if not isinstance(s, (tuple, list)) else int(max(s)) for s in net.strides]
    for s in strides:
        if stride > 1:
            decoder.setdefault(stride, f"{prefix}.2")
        stride *= s
        paths.setdefault(stride, f"{prefix}.0")
        prefix = f"{prefix}.1.submodule"
    paths.setdefault(stride, prefix)  # bottom block
    aliases = _stride_aliases(paths, decoder)
    aliases["bottleneck"] = prefix
    return aliases


@register_tap_aliases(BasicUNet)
def _monai_basic_unet_taps(net: BasicUNet) -> dict[str, str]:
    """MONAI BasicUNet: ``conv_0`` at full size, ``down_k`` at stride 2**k (k = 1..4); ``upcat_k`` at 2**(k-1)."""
    encoder = {2**k: f"down_{k}" for k in range(1, 5)}
    aliases = _stride_aliases({1: "conv_0", **encoder}, {2 ** (k - 1): f"upcat_{k}" for k in range(1, 5)})
    aliases["bottleneck"] = "down_4"
    return aliases


@register_tap_aliases(SegResNet)
def _monai_segresnet_taps(net: SegResNet) -> dict[str, str]:
    """MONAI SegResNet: ``down_layers.k`` at stride 2**k; ``up_layers.i`` climbs from the bottom, one level each."""
    n = len(net.down_layers)
    encoder = {2**k: f"down_layers.{k}" for k in range(n)}
    decoder = {2 ** (n - 2 - i): f"up_layers.{i}" for i in range(len(net.up_layers))}
    aliases = _stride_aliases(encoder, decoder)
    aliases["bottleneck"] = f"down_layers.{n - 1}"
    return aliases


@register_tap_aliases(SwinUNETR)
def _monai_swin_unetr_taps(net: SwinUNETR) -> dict[str, str]:
    """MONAI SwinUNETR: ``encoder1..4`` at strides 1..8 and ``encoder10`` (the bottleneck) at 32 on the Swin
    hidden states; ``decoder5..1`` at strides 16..1."""
    encoder = {1: "encoder1", 2: "encoder2", 4: "encoder3", 8: "encoder4", 32: "encoder10"}
    decoder = {2 ** (k - 1): f"decoder{k}" for k in range(1, 6)}
    aliases = _stride_aliases(encoder, decoder)
    aliases["bottleneck"] = "encoder10"
    return aliases


def tap_points_of(net: nn.Module) -> dict[str, str]:
    """Alias -> dotted module path for ``net``: its own ``tap_points`` or the registered alias table."""
    own = getattr(net, "tap_points", None)
    if own is not None:
        return dict(own)
    for cls in type(net).__mro__:
        if cls in ALIAS_TABLES:
            return ALIAS_TABLES[cls](net)
    return {}


def resolve_tap(net: nn.Module, spec: str, role: str = "network") -> nn.Module:
    """The sub-module of ``net`` named by ``spec`` (an alias from :func:`tap_points_of` or a dotted path).

    Raises:
        KeyError: naming the network, the requested tap and every available alias and module path.
    """
    aliases = tap_points_of(net)
    path = aliases.get(spec, spec)
    modules = dict(net.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [n for n in modules if n]
    raise KeyError(
        f"{role} {type(net).__name__} has no tap '{spec}'"
        + (f" (alias of '{path}')" if path != spec else "")
        + f". Aliases: {sorted(aliases) or 'none'}. Module paths: {names}"
    )
