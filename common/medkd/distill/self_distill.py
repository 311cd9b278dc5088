"""Training-time wrapper for teacher-free (self-)distillation: ACW-SKD's auxiliary head, class-wise feature layer
and feature reconstruction modules (FRMs) around an unchanged student.

The wrapper is what the :class:`medkd.distill.Distiller` trains; the bundle's ``network_def`` (what is saved as
``models/model.pt``, exported and served) stays the plain student, so inference costs exactly the student.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers import Conv

from medkd.distill.teacher import first_tensor
from medkd.losses.self_distill import class_wise_features
from medkd.networks.taps import resolve_tap

__all__ = ["AuxiliaryHead", "ClassWiseFeatures", "FeatureReconstruction", "SelfDistillationStudent"]


class AuxiliaryHead(nn.Module):
    """PSPNet/OCR-style auxiliary head: Conv3 (C -> C) + BN + ReLU, dropout, Conv1 (C -> K); 2D or 3D (MONAI
    ``Convolution``)."""

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 2, dropout: float = 0.1):
        super().__init__()
        self.block = Convolution(spatial_dims, in_channels, in_channels, kernel_size=3, norm="batch", act="relu",
                                 dropout=dropout, adn_ordering="NAD")
        self.classify = Conv[Conv.CONV, spatial_dims](in_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.block(x))


class FeatureReconstruction(nn.Module):
    """ACW-SKD's feature reconstruction module (FRM), built as MGD's masked generation block: in training, keep each
    position with probability ``1 - mask_ratio`` (a random spatial mask shared by the channels), then
    Conv3 -> ReLU -> Conv3 (C -> C). In eval mode nothing is masked.

    Args:
        channels: C. spatial_dims: 2 or 3. mask_ratio: share of positions dropped (MGD: 0.75).
    """

    def __init__(self, channels: int, spatial_dims: int = 2, mask_ratio: float = 0.75):
        super().__init__()
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        conv = Conv[Conv.CONV, spatial_dims]
        self.generate = nn.Sequential(conv(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                      conv(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.mask_ratio > 0:
            keep = torch.rand((x.shape[0], 1, *x.shape[2:]), device=x.device) > self.mask_ratio
            x = x * keep.to(x.dtype)
        return self.generate(x)


class ClassWiseFeatures(nn.Module):
    """Parameter-free class-wise feature layer: :func:`medkd.losses.class_wise_features` of (features, coarse logits)."""

    def __init__(self, eps: float = 1e-6, detach_masks: bool = False):
        super().__init__()
        self.eps, self.detach_masks = float(eps), bool(detach_masks)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return class_wise_features(features, logits, self.eps, self.detach_masks)[0]


class SelfDistillationStudent(nn.Module):
    """A student plus ACW-SKD's training-only branches; ``forward`` returns the student's logits unchanged.

    In training mode one forward also computes, from the penultimate feature ``F_pen`` (the input of the student's
    final ``classifier`` layer), outputs that the Distiller's taps read by module name:

    - ``pen``: ``F_pen`` (B, C, *S);
    - ``aux``: the auxiliary head's coarse logits ``A`` (B, K, *S);
    - ``classwise``: the class-wise features ``F_cw`` from ``F_pen`` and ``softmax(A)``;
    - ``frm_pen``: ``FRM_pen(F_pen)`` (masked reconstruction; trained towards ``F_cw``);
    - ``frm_cw``: ``FRM_cw(F_cw)`` (trained towards ``F_cw``);
    - ``cw_logits``: ``classifier(FRM_cw(F_cw))``, the class-wise logits through the student's own classifier.

    Terms read them as ``s.aux``, ``s.classwise`` and so on. With ``reconstruction=False`` both FRMs are identities
    (the "without FRM" ablation). In eval mode only the student runs.

    Args:
        student: the network being trained (the bundle's ``network_def``).
        num_classes: K. channels: C, the channel count of ``F_pen``.
        classifier: tap alias or dotted module path of the student's last layer (whose *input* is ``F_pen``), e.g.
            ``"model.2"`` for MONAI ``UNet``, ``"final_conv"`` for ``BasicUNet``, ``"decoders.0.head"`` for
            :class:`medkd.networks.SmallUNet`.
        spatial_dims: 2 or 3. aux_dropout: dropout of the auxiliary head (0.1). mask_ratio: FRM masking (0.75).
        reconstruction: build the two FRMs (``False``: identities). detach_masks: stop gradients through the
            auxiliary masks in the class-wise layer.
    """

    def __init__(self, student: nn.Module, num_classes: int, channels: int, classifier: str, spatial_dims: int = 2,
                 aux_dropout: float = 0.1, mask_ratio: float = 0.75, reconstruction: bool = True,
                 detach_masks: bool = False):
        super().__init__()
        self.student = student
        self.channels = int(channels)
        head = resolve_tap(student, classifier, "student")
        object.__setattr__(self, "_classifier", head)  # a reference, not a second registration of its weights
        self._pen: torch.Tensor | None = None
        self._armed = False
        head.register_forward_pre_hook(self._grab)
        self.pen = nn.Identity()
        self.aux = AuxiliaryHead(channels, num_classes, spatial_dims, aux_dropout)
        self.classwise = ClassWiseFeatures(detach_masks=detach_masks)
        self.frm_pen = FeatureReconstruction(channels, spatial_dims, mask_ratio) if reconstruction else nn.Identity()
        self.frm_cw = FeatureReconstruction(channels, spatial_dims, mask_ratio) if reconstruction else nn.Identity()
        self.cw_logits = nn.Identity()

    def _grab(self, module: nn.Module, args) -> None:
        if self._armed:
            self._pen = args[0]

    def heads(self) -> nn.ModuleDict:
        """The training-only modules (for the training state; never part of ``models/model.pt``)."""
        return nn.ModuleDict({"aux": self.aux, "frm_pen": self.frm_pen, "frm_cw": self.frm_cw})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return first_tensor(self.student(x))
        self._armed, self._pen = True, None
        try:
            logits = first_tensor(self.student(x))
        finally:
            self._armed = False
        pen, self._pen = self._pen, None
        if pen is None:
            raise RuntimeError("the student's classifier layer did not run in forward; check the 'classifier' path")
        if pen.shape[1] != self.channels:
            raise ValueError(f"the classifier's input has {pen.shape[1]} channels but channels={self.channels}; "
                             "set the bundle's pen_channels to it")
        pen = self.pen(pen)
        aux = self.aux(pen)
        f_cw = self.classwise(pen, aux)
        self.frm_pen(pen)
        self.cw_logits(self._classifier(self.frm_cw(f_cw)))
        return logits
