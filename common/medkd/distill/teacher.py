"""The teacher side of the feature dict.

The :class:`Distiller` asks one :class:`TeacherSource` for ``{"t.logits": ..., "t.<tap>": ...}`` per batch.
:class:`LiveTeacher` runs a frozen network; :class:`medkd.distill.cache.CachedTeacher` serves outputs precomputed on
recorded augmented views (offline KD) through the same interface, without touching the losses or the bundles.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from medkd.distill.taps import FeatureTaps
from medkd.io import load_state_dict_file

__all__ = ["TeacherSource", "LiveTeacher", "ParaphrasedTeacher", "first_tensor", "load_teacher_weights"]


def first_tensor(output) -> torch.Tensor:
    """The logits of a network output: the tensor itself, or the first tensor of a tuple/list/dict output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot take logits from a network output of type {type(output).__name__}")


def load_teacher_weights(network: nn.Module, path: str | os.PathLike | None, role: str = "teacher") -> None:
    """Load ``path`` into ``network`` strictly; every failure is an error naming the file and the network.

    ``role`` names the frozen network in the messages: ``"teacher"`` (config key ``teacher_def``) or ``"student"`` (a
    frozen, already trained student, ``network_def``)."""
    definition = "teacher_def" if role == "teacher" else "network_def"
    if path is None or str(path) == "":
        raise ValueError(
            f"teacher_ckpt is required for teacher {type(network).__name__}: a KD run never starts from a random "
            "teacher. Train the teacher first (bundles/supervised_segmentation) and pass its models/model.pt."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{role} checkpoint not found: {path}. Train the teacher first (bundles/supervised_segmentation) "
            "or point teacher_ckpt at its models/model.pt."
        )
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    state = load_state_dict_file(path, map_location=device)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"{role} checkpoint {path} does not match {definition} {type(network).__name__}: {e}. "
            f"Check that {definition} has the architecture the checkpoint was trained with."
        ) from None


class TeacherSource(nn.Module):
    """Provides the teacher side of the feature dict: ``forward(image) -> {"t.logits": ..., "t.<name>": ...}``."""

    tap_names: tuple[str, ...] = ()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class LiveTeacher(TeacherSource):
    """A frozen teacher network run online, under ``torch.no_grad()``, always in eval mode.

    Weights are loaded strictly from ``checkpoint`` at construction; parameters get ``requires_grad=False``;
    :meth:`train` never takes the network out of eval mode (BatchNorm statistics and dropout stay frozen).

    Args:
        network: the teacher ``torch.nn.Module``.
        checkpoint: state-dict file (bare, or under a ``"model"`` key).
        taps: feature name -> tap spec (alias or dotted path) of the teacher.
        role: how error messages name the network (``"teacher"``, or ``"student"`` for a frozen trained student).
    """

    def __init__(self, network: nn.Module, checkpoint: str | os.PathLike | None, taps: dict[str, str] | None = None,
                 role: str = "teacher"):
        super().__init__()
        load_teacher_weights(network, checkpoint, role)
        self.checkpoint = str(checkpoint)
        network.requires_grad_(False)
        self.network = network.eval()
        self.taps = FeatureTaps(network, taps or {}, role="teacher")
        self.tap_names = tuple(self.taps.specs)

    def train(self, mode: bool = True) -> "LiveTeacher":
        super().train(mode)
        self.network.eval()
        return self

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode_taps(self.raw_outputs(image))

    @torch.no_grad()
    def raw_outputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``t.logits`` and the raw ``t.<tap>`` features of the network (what a teacher cache stores)."""
        self.network.eval()
        with self.taps.capture() as feats:
            logits = first_tensor(self.network(image))
        self.taps.check_captured(feats)
        out = {"t.logits": logits}
        out.update({f"t.{k}": v for k, v in feats.items()})
        return out

    def encode_taps(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What this source makes of the raw teacher outputs (identity here); also applied to cached outputs."""
        return outputs


class ParaphrasedTeacher(LiveTeacher):
    """A :class:`LiveTeacher` whose taps are replaced by the factors of frozen, pretrained paraphrasers (Graph Flow).

    ``t.<tap>`` holds ``paraphrasers[tap].encode(teacher tap)`` for every tap with a paraphraser (other taps and
    ``t.logits`` are unchanged). Each paraphraser is loaded strictly from ``<paraphraser_dir>/paraphraser_<tap>.pt``
    (the output of the bundle's ``pretrain_paraphraser.json``); a missing file is an error, never random weights.
    Paraphrasers are frozen and stay in eval mode like the teacher.

    Args:
        network, checkpoint, taps: as :class:`LiveTeacher`.
        paraphrasers: tap name -> :class:`medkd.networks.Paraphraser` (architecture only).
        paraphraser_dir: folder of the pretrained ``paraphraser_<tap>.pt`` files.
    """

    def __init__(self, network: nn.Module, checkpoint: str | os.PathLike | None, taps: dict[str, str],
                 paraphrasers: dict[str, nn.Module], paraphraser_dir: str | os.PathLike):
        super().__init__(network, checkpoint, taps)
        unknown = sorted(set(paraphrasers) - set(self.tap_names))
        if unknown:
            raise ValueError(f"paraphrasers for {unknown} have no teacher tap; teacher taps: {list(self.tap_names)}")
        for name, module in paraphrasers.items():
            path = os.path.join(str(paraphraser_dir), f"paraphraser_{name}.pt")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"paraphraser checkpoint not found: {path}. Run the pretrain_paraphraser.json stage first "
                    "(it writes one paraphraser_<tap>.pt per teacher tap); distillation never uses random paraphrasers."
                )
            device = next(self.network.parameters(), torch.zeros(())).device
            try:
                module.load_state_dict(load_state_dict_file(path, map_location=device), strict=True)
            except RuntimeError as e:
                raise RuntimeError(f"paraphraser checkpoint {path} does not match its definition: {e}") from None
            module.to(device).requires_grad_(False).eval()
        self.paraphrasers = nn.ModuleDict(paraphrasers)

    def train(self, mode: bool = True) -> "ParaphrasedTeacher":
        super().train(mode)
        self.paraphrasers.eval()
        return self

    @torch.no_grad()
    def encode_taps(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The raw teacher taps replaced by their paraphraser factors (live or cached outputs alike)."""
        out = dict(outputs)
        self.paraphrasers.eval()
        for name, module in self.paraphrasers.items():
            out[f"t.{name}"] = module.encode(out[f"t.{name}"])
        return out
