"""A teacher taken from any MONAI bundle folder (``teacher_bundle``): the model zoo's or a user's own.

Only the bundle's ``network_def`` is built, and only after its references (``@id``) and expressions (``$...``) have
been resolved by :func:`resolve_config` — a small evaluator that knows literals, references, arithmetic,
comparisons and conditionals and nothing else — so none of the bundle's other ``$`` expressions (``imports``,
datalists, handlers; see MONAI advisory GHSA-873f-pvrv-4x83) ever runs. ``_target_`` must be a MONAI component
name or a ``monai.``/``torch.``/``medkd.`` class (a medkd export's vendored ``<bundle>_medkd.`` maps back to
``medkd.``): bundle-local ``scripts.*`` code is not imported. Weights load with ``weights_only=True`` from
``models/model.pt`` or the file its ``CheckpointLoader`` names; a bundle that ships only a TorchScript
``models/model.ts`` gives a logits-only teacher.

Taps of the teacher (``teacher:low`` etc.) come from :mod:`medkd.networks.taps` (UNet, BasicUNet, SegResNet,
SwinUNETR aliases; dotted module paths otherwise). In a KD bundle, ``teacher_bundle: PATH`` switches the teacher:
``distiller#teacher`` calls :func:`bundle_teacher_network` and ``distiller#teacher_ckpt`` calls
:func:`bundle_teacher_ckpt`; both return the bundle's own ``teacher_def`` / ``teacher_ckpt`` when it is null.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import operator
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from medkd.io import atomic_torch_save, load_state_dict_file

__all__ = [
    "BundleTeacher",
    "BundleTeacherError",
    "TorchScriptTeacher",
    "bundle_config",
    "bundle_teacher_ckpt",
    "bundle_teacher_network",
    "check_teacher_fits",
    "load_bundle_teacher",
    "resolve_config",
    "safe_target",
]

CONFIG_NAMES = ("inference.json", "train.json")
ALLOWED_PREFIXES = ("monai.", "torch.", "medkd.")
_VENDORED = re.compile(r"^\w+_medkd\.")  # medkd code vendored by ``export-bundle``
_REF = re.compile(r"@([\w#:]+)")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
           ast.GtE: operator.ge}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}


class BundleTeacherError(ValueError):
    """A teacher bundle that cannot serve as a teacher: its file, key and the reason are in the message."""


@dataclass
class BundleTeacher:
    """A network built from a bundle: ``network`` (weights loaded unless asked otherwise), where it came from, and
    its interface (``spatial_dims``, ``in_channels``, ``out_channels``; ``None`` where the config cannot tell)."""

    network: nn.Module
    bundle: Path
    config_file: Path
    checkpoint: Path
    torchscript: bool
    spatial_dims: int | None
    in_channels: int | None
    out_channels: int | None
    network_def: dict = field(default_factory=dict)


class TorchScriptTeacher(nn.Module):
    """A TorchScript teacher (``models/model.ts``) as an ``nn.Module``: logits only, no tap points."""

    tap_points: dict[str, str] = {}

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.scripted = scripted

    def forward(self, x: torch.Tensor):
        return self.scripted(x)


def bundle_config(bundle: str | os.PathLike) -> tuple[Path, dict]:
    """The teacher bundle's config holding ``network_def``: ``configs/inference.json``, else ``configs/train.json``.

    Raises:
        BundleTeacherError: no bundle folder, no such config, unreadable JSON, or no ``network_def`` in either.
    """
    root = Path(bundle)
    if not root.is_dir():
        raise BundleTeacherError(f"teacher bundle {root} is not a folder")
    tried = []
    for name in CONFIG_NAMES:
        path = root / "configs" / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BundleTeacherError(f"teacher bundle config {path} is not valid JSON: {e}") from None
        if isinstance(config, dict) and "network_def" in config:
            return path, config
        tried.append(str(path))
    raise BundleTeacherError(f"teacher bundle {root} has no network_def in configs/inference.json or "
                             f"configs/train.json (looked in: {tried or 'no such files'})")


def _lookup(config: dict, ref: str, where: str) -> Any:
    node: Any = config
    for part in ref.replace("::", "#").split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise BundleTeacherError(f"{where}: reference @{ref} is not in the config")
    return node


def _safe_eval(node: ast.AST, names: dict[str, Any], where: str, text: str) -> Any:
    if isinstance(node, ast.Expression):
        return _safe_eval(node.body, names, where, text)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_safe_eval(e, names, where, text) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_safe_eval(node.left, names, where, text),
                                      _safe_eval(node.right, names, where, text))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_safe_eval(node.operand, names, where, text))
    if isinstance(node, ast.IfExp):
        test = _safe_eval(node.test, names, where, text)
        return _safe_eval(node.body if test else node.orelse, names, where, text)
    if isinstance(node, ast.BoolOp):
        values = [_safe_eval(v, names, where, text) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
        left = _safe_eval(node.left, names, where, text)
        for op, comp in zip(node.ops, node.comparators):
            right = _safe_eval(comp, names, where, text)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    raise BundleTeacherError(
        f"{where}: expression {text!r} is not evaluated (only literals, @references, arithmetic, comparisons and "
        f"'x if c else y' are; a teacher bundle's code never runs). Give the value as a literal in a copy of the "
        f"bundle's config."
    )


def resolve_config(value: Any, config: dict, where: str = "config", _stack: tuple[str, ...] = ()) -> Any:
    """``value`` with every ``@ref``, in-file ``%macro`` and ``$`` expression of ``config`` resolved to literals.

    Expressions are parsed with :mod:`ast` and evaluated by a whitelist (literals, references, arithmetic,
    comparisons, boolean operators, conditional expressions): no names, calls, attributes or imports.

    Raises:
        BundleTeacherError: naming ``where`` (file#key) for a missing reference, a reference cycle, a macro into
            another file, or an expression outside the whitelist.
    """
    if isinstance(value, dict):
        return {k: resolve_config(v, config, f"{where}#{k}", _stack) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_config(v, config, f"{where}#{i}", _stack) for i, v in enumerate(value)]
    if not isinstance(value, str) or not value or value[0] not in "@%$":
        return value
    if value[0] in "@%":
        ref = value[1:]
        if value[0] == "%" and ("." in ref.split("#")[0] or ref.startswith("/")):
            raise BundleTeacherError(f"{where}: macro {value!r} reads another file; teacher configs are read alone")
        if ref in _stack:
            raise BundleTeacherError(f"{where}: reference cycle {' -> '.join((*_stack, ref))}")
        return resolve_config(_lookup(config, ref, where), config, f"{where}->{ref}", (*_stack, ref))
    text = value[1:]
    names: dict[str, Any] = {}

    def substitute(match: re.Match) -> str:
        name = f"__ref{len(names)}"
        ref = match.group(1)
        if ref in _stack:
            raise BundleTeacherError(f"{where}: reference cycle {' -> '.join((*_stack, ref))}")
        names[name] = resolve_config(_lookup(config, ref, where), config, f"{where}->{ref}", (*_stack, ref))
        return name

    try:
        tree = ast.parse(_REF.sub(substitute, text).strip(), mode="eval")
    except SyntaxError as e:
        raise BundleTeacherError(f"{where}: cannot parse expression {value!r}: {e.msg}") from None
    return _safe_eval(tree, names, where, value)


def safe_target(target: Any, where: str) -> str:
    """``target`` as a class name that is safe to build: a MONAI component name (``UNet``, ``Spacingd``) or a
    dotted ``monai.``/``torch.``/``medkd.`` path; a vendored ``<bundle>_medkd.x`` becomes ``medkd.x``.

    Raises:
        BundleTeacherError: for any other target (bundle-local ``scripts.*`` code is never imported).
    """
    from monai.bundle.config_item import ComponentLocator

    if not isinstance(target, str):
        raise BundleTeacherError(f"{where}: _target_ must be a class name, got {target!r}")
    target = _VENDORED.sub("medkd.", target)
    if target.startswith(ALLOWED_PREFIXES) or ("." not in target and ComponentLocator().get_component_module_name(target)):
        return target
    raise BundleTeacherError(
        f"{where}: _target_ {target!r} is neither a MONAI component nor a monai./torch./medkd. class; medkd does not "
        "import a teacher bundle's own code. Make the class importable and name it by its full dotted path in a copy "
        "of the config, or use a bundle whose network_def is a MONAI network."
    )


def _safe_targets(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        out = {k: _safe_targets(v, f"{where}#{k}") for k, v in value.items() if k not in ("_requires_", "_desc_")}
        if "_target_" in out:
            out["_target_"] = safe_target(out["_target_"], f"{where}#_target_")
        if out.get("_mode_", "default") != "default":
            raise BundleTeacherError(f"{where}: _mode_ {out['_mode_']!r} is not supported for a teacher network")
        return out
    if isinstance(value, list):
        return [_safe_targets(v, f"{where}#{i}") for i, v in enumerate(value)]
    return value


def _instantiate(definition: dict, where: str) -> nn.Module:
    from monai.bundle import ConfigParser

    try:
        net = ConfigParser({"network_def": definition}).get_parsed_content("network_def", instantiate=True)
    except Exception as e:  # whatever the network's constructor raises
        raise BundleTeacherError(f"cannot build {where} ({definition.get('_target_')}): {e}") from None
    if not isinstance(net, nn.Module):
        raise BundleTeacherError(f"{where} builds a {type(net).__name__}, not a torch.nn.Module")
    return net


def _interface(definition: dict, cls: type) -> tuple[int | None, int | None, int | None]:
    """spatial_dims, in_channels, out_channels from network_def's arguments and the defaults of its class."""
    kwargs = {k: v for k, v in definition.items() if not k.startswith("_")}
    try:
        bound = inspect.signature(cls).bind_partial(**kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
    except (TypeError, ValueError):
        args = kwargs
    dims = args.get("spatial_dims", args.get("dimensions"))
    return (None if dims is None else int(dims), args.get("in_channels"), args.get("out_channels"))


def _loader_paths(config: dict, where: str) -> list[str]:
    """load_path of every CheckpointLoader of the config that resolves to a literal string."""
    found: list[str] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            target = str(node.get("_target_", ""))
            if target.split(".")[-1] == "CheckpointLoader" and "load_path" in node:
                try:
                    path = resolve_config(node["load_path"], config, f"{key}#load_path")
                except BundleTeacherError:
                    path = None
                if isinstance(path, str):
                    found.append(path)
            for k, v in node.items():
                walk(v, f"{key}#{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}#{i}")

    walk(config, where)
    return found


def _find_checkpoint(root: Path, config: dict, where: str) -> Path:
    candidates = [Path(p) for p in _loader_paths(config, where)]
    candidates += [root / "models" / "model.pt", root / "models" / "model.ts"]
    for path in candidates:
        path = path if path.is_absolute() else root / path
        if path.is_file():
            return path
    raise BundleTeacherError(
        f"teacher bundle {root} has no weights: none of {[str(p) for p in dict.fromkeys(candidates)]} exists "
        "(download the bundle's large files, e.g. python -m monai.bundle download, or pass the checkpoint)"
    )


def _probe_torchscript(net: nn.Module) -> tuple[int | None, int | None, int | None]:
    first = next((p for p in net.parameters() if p.ndim >= 3), None)
    if first is None:
        return None, None, None
    dims, channels = first.ndim - 2, int(first.shape[1])
    with torch.no_grad():
        out = net(torch.zeros((1, channels) + (64,) * dims, device=first.device))
    out = out if isinstance(out, torch.Tensor) else out[0]
    return dims, channels, int(out.shape[1])


def load_bundle_teacher(bundle: str | os.PathLike, ckpt: str | os.PathLike | None = None, load_weights: bool = True,
                        device: str | torch.device = "cpu") -> BundleTeacher:
    """Build the ``network_def`` of a MONAI bundle folder and load its weights strictly (``weights_only=True``).

    Args:
        bundle: the bundle folder (``configs/inference.json`` or ``configs/train.json`` with ``network_def``).
        ckpt: weights to load instead of the bundle's (``models/model.pt``, the file its ``CheckpointLoader``
            names, else ``models/model.ts``).
        load_weights: False builds the architecture only (a KD bundle's Distiller loads the weights itself).
        device: where the network goes.

    Raises:
        BundleTeacherError: naming the file and key for a config that cannot be read, resolved or built, missing
            weights, or weights that do not match ``network_def``.
    """
    root = Path(bundle).resolve()
    config_file, config = bundle_config(root)
    where = f"{config_file}#network_def"
    config = {**config, "bundle_root": str(root)}
    if ckpt is not None:
        checkpoint = Path(ckpt)
    else:
        try:
            checkpoint = _find_checkpoint(root, config, str(config_file))
        except BundleTeacherError:
            if load_weights:
                raise
            checkpoint = root / "models" / "model.pt"  # architecture only: the weights are looked for when loaded
    if ckpt is not None and not checkpoint.is_file():
        raise BundleTeacherError(f"teacher checkpoint {checkpoint} not found")
    if checkpoint.suffix == ".ts":
        try:
            scripted = torch.jit.load(str(checkpoint), map_location=device)
        except Exception as e:
            raise BundleTeacherError(f"cannot load TorchScript teacher {checkpoint}: {e}") from None
        net = TorchScriptTeacher(scripted).eval()
        dims, cin, cout = _probe_torchscript(net)
        return BundleTeacher(net, root, config_file, checkpoint, True, dims, cin, cout)
    definition = _safe_targets(resolve_config(config["network_def"], config, where), where)
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise BundleTeacherError(f"{where} is not a component with a _target_ (got {definition!r})")
    net = _instantiate(definition, where).to(device)
    if load_weights:
        try:
            state = load_state_dict_file(checkpoint, map_location=device)
        except (FileNotFoundError, ValueError) as e:
            raise BundleTeacherError(f"teacher weights of {root}: {e}") from None
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BundleTeacherError(f"teacher checkpoint {checkpoint} does not match {where} "
                                     f"({definition['_target_']}): {e}") from None
    dims, cin, cout = _interface(definition, type(net))
    return BundleTeacher(net.eval(), root, config_file, checkpoint, False, dims, cin, cout, definition)


def check_teacher_fits(teacher: BundleTeacher, spatial_dims: int | None = None, in_channels: int | None = None,
                       num_classes: int | None = None, against: str = "the KD bundle") -> None:
    """Compare the teacher's spatial dims, input channels and class count with the run's.

    Raises:
        BundleTeacherError: naming both values for the first that differs.
    """
    for what, mine, theirs in (("spatial_dims", teacher.spatial_dims, spatial_dims),
                               ("in_channels", teacher.in_channels, in_channels),
                               ("num_classes (out_channels)", teacher.out_channels, num_classes)):
        if mine is not None and theirs is not None and int(mine) != int(theirs):
            raise BundleTeacherError(f"teacher bundle {teacher.bundle} has {what} {mine} ({teacher.config_file.name} "
                                     f"network_def) but {against} has {what} {theirs}")


def _teacher_keys(terms: Sequence[Any] | None) -> list[str]:
    keys = []
    for term in terms or ():
        keys += [k for k in getattr(term, "inputs", ()) if k.startswith("t.") and k != "t.logits"]
    return keys


def bundle_teacher_network(teacher_def: nn.Module | None, teacher_bundle: str | os.PathLike | None,
                           terms: Sequence[Any] | None = None, spatial_dims: int | None = None,
                           in_channels: int | None = None, num_classes: int | None = None) -> nn.Module | None:
    """The teacher network of a KD bundle: ``teacher_def`` when ``teacher_bundle`` is null, else the bundle's
    ``network_def`` (architecture only: the Distiller loads :func:`bundle_teacher_ckpt` strictly), checked against
    the KD bundle's ``spatial_dims``/``in_channels``/``num_classes`` and, for a TorchScript teacher, against taps
    read by ``terms`` (a TorchScript teacher gives logits only)."""
    if teacher_bundle is None or str(teacher_bundle) == "":
        return teacher_def
    teacher = load_bundle_teacher(teacher_bundle, load_weights=False)
    check_teacher_fits(teacher, spatial_dims, in_channels, num_classes)
    tapped = _teacher_keys(terms)
    if teacher.torchscript and tapped:
        raise BundleTeacherError(f"teacher {teacher.checkpoint} is TorchScript and gives logits only, but KD terms "
                                 f"read {tapped}; use a logits-only recipe (e.g. kd_logits.json) or a bundle with "
                                 "models/model.pt")
    return teacher.network


def bundle_teacher_ckpt(teacher_ckpt: str | os.PathLike | None, teacher_bundle: str | os.PathLike | None) -> str | None:
    """The teacher checkpoint of a KD bundle: ``teacher_ckpt`` when ``teacher_bundle`` is null, else the bundle's
    weights file. A TorchScript teacher's weights are written once as a state dict of :class:`TorchScriptTeacher`
    (in the temp folder, named by the archive's SHA-256) so the Distiller loads them like any checkpoint."""
    if teacher_bundle is None or str(teacher_bundle) == "":
        return None if teacher_ckpt is None else str(teacher_ckpt)
    root = Path(teacher_bundle).resolve()
    config_file, config = bundle_config(root)
    path = _find_checkpoint(root, {**config, "bundle_root": str(root)}, str(config_file))
    if path.suffix != ".ts":
        return str(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    state_file = Path(tempfile.gettempdir()) / f"medkd_torchscript_teacher_{digest}.pt"
    if not state_file.is_file():
        teacher = load_bundle_teacher(root)
        atomic_torch_save({k: v.detach().cpu() for k, v in teacher.network.state_dict().items()}, state_file)
    return str(state_file)
