"""ResNet-based networks of EMKD (Qin et al., IEEE TMI 2021): ResNet18 student, RA-UNet and PSPNet teachers.

All three build their encoder from :class:`ResNetBackbone`, a 2D ``monai.networks.nets.ResNet`` whose state-dict
keys follow the usual ImageNet ResNet layout (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer2.0.downsample.0/1``), so a user's ImageNet weight file (``fc.*`` ignored) loads into it with
``pretrained_weights``. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Norm
from monai.networks.nets import ResNet

from medkd.networks.weights import load_weights

__all__ = ["ResNetBackbone", "ResNet18Seg", "RAUNet", "PSPNet", "LinkNetDecoderBlock", "AugmentedAttention",
           "PyramidPooling"]

# depth -> (MONAI block name, blocks per stage)
_RESNET_LAYERS = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}
_DEEP_STEM_CHANNELS = 128
_RELU = ("relu", {"inplace": False})


def _conv3x3_bn_relu(in_channels: int, out_channels: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    return (Conv[Conv.CONV, 2](in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            Norm[Norm.BATCH, 2](out_channels), nn.ReLU(inplace=False))


def _kaiming_fan_out(modules) -> None:
    """The initialisation MONAI's ResNet applies in its constructor, for modules added afterwards."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _dilate(layer: nn.Module, dilation: int) -> None:
    """Remove the stride of ``layer`` and dilate its 3x3 convs: by ``dilation // 2`` in the conv that had stride
    2, by ``dilation`` in the others (as the PSPNet code EMKD uses); 1x1 shortcut convs only lose their stride."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            d = dilation
            if m.stride == (2, 2):
                m.stride, d = (1, 1), dilation // 2
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (d, d), (d, d)


def _stem_for(in_channels: int, path: str | os.PathLike) -> Callable[[dict], dict]:
    """Weight-file transform fitting the file's stem conv (``conv1.weight``) to ``in_channels`` input channels.

    A 1-channel network takes the sum over the file's input channels, which equals feeding the file's network
    the grey image replicated to every channel (what EMKD does); any other channel mismatch is an error.
    """

    def transform(state: dict) -> dict:
        w = state.get("conv1.weight")
        if w is None or w.ndim != 4 or w.shape[1] == in_channels:
            return state
        if in_channels != 1:
            raise ValueError(
                f"weights {path}: stem conv1.weight takes {w.shape[1]} input channels but the network takes "
                f"{in_channels}; only a 1-channel network can adapt a stem (by summing over its input channels)"
            )
        return {**state, "conv1.weight": w.sum(dim=1, keepdim=True)}

    return transform


class ResNetBackbone(ResNet):
    """2D ``monai.networks.nets.ResNet`` in the ImageNet layout whose forward returns its stage outputs.

    Built with ``shortcut_type="B"`` (1x1 conv + BN shortcuts) and ``bias_downsample=False``, no classifier, so
    the state-dict keys are those of the usual ImageNet ResNet files without ``fc.*``. After MONAI's constructor:

    - ``deep_stem=True`` (PSPNet / CSAIL "deep base" ResNet): the stem becomes three 3x3 conv-BN-ReLU
      (``conv1`` stride 2, ``in -> 64``; ``conv2`` 64 -> 64; ``conv3`` 64 -> 128) before the max-pool, and
      ``layer1`` is rebuilt with MONAI's ``_make_layer`` for its 128 input channels. With the 7x7 stem
      (``deep_stem=False``) ``conv2 .. act3`` are parameter-free ``nn.Identity``.
    - ``output_stride`` 16 or 8: ``layer4`` (and ``layer3`` for 8) lose their stride and their 3x3 convs are
      dilated (2 for ``layer3``, 4 for ``layer4`` at output stride 8; the formerly strided conv by half of that).
    - every ReLU is made non-inplace (taps must never be modified in place).

    Args:
        depth: 18, 34, 50, 101 or 152.
        in_channels: input channels of the stem conv.
        deep_stem: three-conv stem as described above.
        output_stride: 32 (ImageNet), 16 or 8.

    Shapes: ``(B, in_channels, H, W)`` -> ``[stem (64 @ H/2), layer1 (@ H/4), layer2 (@ H/8), layer3, layer4]``,
    where ``stem`` is the first ReLU output (module ``act``) and layer1..4 have ``64, 128, 256, 512`` channels
    times the block expansion (1 basic, 4 bottleneck).
    """

    def __init__(self, depth: int = 34, in_channels: int = 1, deep_stem: bool = False, output_stride: int = 32):
        if depth not in _RESNET_LAYERS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNET_LAYERS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        block, layers = _RESNET_LAYERS[depth]
        super().__init__(block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                         n_input_channels=in_channels, conv1_t_size=3 if deep_stem else 7, conv1_t_stride=2,
                         shortcut_type="B", bias_downsample=False, feed_forward=False, act=_RELU)
        del self.avgpool  # a feature extractor: no global pooling
        if deep_stem:
            self.conv2, self.bn2, self.act2 = _conv3x3_bn_relu(64, 64)
            self.conv3, self.bn3, self.act3 = _conv3x3_bn_relu(64, _DEEP_STEM_CHANNELS)
            self.in_planes = _DEEP_STEM_CHANNELS
            self.layer1 = self._make_layer(type(self.layer1[0]), 64, layers[0], 2, "B")
            _kaiming_fan_out([self.conv2, self.bn2, self.conv3, self.bn3, *self.layer1.modules()])
        else:
            self.conv2, self.bn2, self.act2, self.conv3, self.bn3, self.act3 = (nn.Identity() for _ in range(6))
        if output_stride == 8:
            _dilate(self.layer3, 2)
        if output_stride <= 16:
            _dilate(self.layer4, 4 if output_stride == 8 else 2)
        for m in self.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        stem = self.act(self.bn1(self.conv1(x)))
        x = self.act3(self.bn3(self.conv3(self.act2(self.bn2(self.conv2(stem))))))
        e1 = self.layer1(self.maxpool(x))
        e2 = self.layer2(e1)
        e3 = self.layer3(e2)
        e4 = self.layer4(e3)
        return [stem, e1, e2, e3, e4]

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load a user's ImageNet-layout weight file (``fc.*`` ignored; a 3-channel stem summed for 1 channel).

        Raises:
            ValueError: naming ``path``, when its keys or shapes do not fit (e.g. a ResNet-18 file for ResNet-34).
        """
        load_weights(self, path, ignore=("fc.",), transform=_stem_for(self.conv1.in_channels, path))


# EMKD's taps (low: stem ReLU at H/2, high: layer2 at H/8) and enc<k> at stride 2**k, for a ResNet encoder.
RESNET_ENCODER_TAPS = {
    "low": "encoder.act",
    "high": "encoder.layer2",
    "enc2": "encoder.layer1",
    "enc3": "encoder.layer2",
    "enc4": "encoder.layer3",
    "enc5": "encoder.layer4",
    "bottleneck": "encoder.layer4",
}


class ResNet18Seg(nn.Module):
    """EMKD's ResNet18 student: ResNet-18 encoder, 1x1 conv on ``layer4`` (stride 32), bilinear upsampling
    (align_corners=True) to the input size. Encoder: :class:`ResNetBackbone` (MONAI ``ResNet``).

    Differences from the official code (EMKD ``networks/resnet18.py``): the stem takes ``in_channels`` directly
    (EMKD replicates the grey image to 3 channels; :meth:`ResNetBackbone.load_pretrained` sums a 3-channel stem,
    which is equivalent); ``forward`` returns the logits only. The official ``get_model('resnet18')`` cannot build
    this network (its name check compares against ``'resnet'``); that factory bug has no counterpart here.

    Reference: Qin et al., "Efficient Medical Image Segmentation Based on Knowledge Distillation", IEEE TMI 2021.

    Args:
        in_channels: input channels.
        out_channels: number of classes (logit channels).
        pretrained_weights: optional ImageNet ResNet-18 weight file for the encoder (``torchvision`` key layout).

    Shapes: ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``.
    """

    tap_points = RESNET_ENCODER_TAPS

    def __init__(self, in_channels: int = 1, out_channels: int = 2, pretrained_weights: str | None = None):
        super().__init__()
        self.encoder = ResNetBackbone(18, in_channels)
        self.head = nn.Conv2d(512, out_channels, kernel_size=1)
        if pretrained_weights is not None:
            self.encoder.load_pretrained(pretrained_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(x)[4])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True) -> Convolution:
    return Convolution(2, in_channels, out_channels, kernel_size=kernel_size, act=_RELU, norm="batch", bias=bias)


class LinkNetDecoderBlock(nn.Sequential):
    """LinkNet decoder block: 1x1 conv ``in -> in/4`` + BN + ReLU, ConvTranspose(k4, s2, p1) ``in/4 -> in/4`` +
    BN + ReLU (x2 upsampling), 1x1 conv ``in/4 -> out`` + BN + ReLU. MONAI ``Convolution`` blocks.

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, 2H, 2W)``.
    """

    def __init__(self, in_channels: int, out_channels: int):
        mid = in_channels // 4
        super().__init__(
            _conv_bn_relu(in_channels, mid),
            Convolution(2, mid, mid, strides=2, kernel_size=4, padding=1, output_padding=0, is_transposed=True,
                        act=_RELU, norm="batch"),
            _conv_bn_relu(mid, out_channels),
        )


class AugmentedAttention(nn.Module):
    """RA-UNet's augmented attention module (AAM), fusing a decoder feature with the encoder skip.

    Channel weights ``w = softmax_C(conv(relu(bn(conv(GAP(high)))) + relu(bn(conv(GAP(low))))))`` re-weight the
    projected skip, ``out = high + relu(bn(conv1x1(low))) * w``. MONAI ``Convolution`` blocks. The BatchNorm after
    global pooling needs a batch of at least 2 in training, as in the official code.

    Args:
        channels: channels of both inputs and of the output.

    Shapes: ``high`` and ``low`` ``(B, channels, H, W)`` -> ``(B, channels, H, W)``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.high_context = _conv_bn_relu(channels, channels)
        self.low_context = _conv_bn_relu(channels, channels)
        self.weights = Convolution(2, channels, channels, kernel_size=1, act=("softmax", {"dim": 1}), norm=None)
        self.project_low = _conv_bn_relu(channels, channels)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        w = self.weights(self.high_context(self.pool(high)) + self.low_context(self.pool(low)))
        return high + self.project_low(low) * w


class RAUNet(nn.Module):
    """RA-UNet, EMKD's teacher: ResNet-34 encoder, LinkNet decoder blocks and augmented attention modules.

    Encoder :class:`ResNetBackbone` (MONAI ``ResNet``, 7x7 stem, e1..e4 = layer1..4 at H/4..H/32). Decoder:
    ``d4 = dec4(e4)``, ``b4 = aam3(d4, e3)``, ``d3 = dec3(b4)``, ``b3 = aam2(d3, e2)``, ``d2 = dec2(b3)``,
    ``b2 = aam1(d2, e1)``, ``d1 = dec1(b2)`` (:class:`LinkNetDecoderBlock` with a 4x4 stride-2 transposed conv as
    in the EMKD code, :class:`AugmentedAttention` with a channel softmax); head:
    ConvTranspose(64 -> 32, k3, s2) + ReLU, conv 3x3 (no padding) 32 -> 32 + ReLU, conv 2x2 (padding 1)
    32 -> ``out_channels``, which lands exactly on the input size (H/2 -> H + 1 -> H - 1 -> H).

    Differences from the official code (EMKD ``networks/RAUNet.py``, from Ni et al.): returns the raw logits
    (the official forward returns ``log_softmax``); the stem takes ``in_channels`` directly instead of the grey
    image replicated to 3 channels (a 3-channel ImageNet stem is summed on loading, which is equivalent); the
    ImageNet weights come from a user's file (``pretrained_weights``) instead of a download; non-inplace ReLUs.
    As in the official code, training needs batches of at least 2 (BatchNorm on globally pooled features).

    Reference: Ni et al., "RAUNet: Residual Attention U-Net for Semantic Segmentation of Cataract Surgical
    Instruments", ICONIP 2019 (arXiv 1909.10360).

    Args:
        in_channels: input channels.
        out_channels: number of classes (logit channels).
        pretrained_weights: optional ImageNet ResNet-34 weight file for the encoder (``torchvision`` key layout).

    Shapes: ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``, H and W multiples of 32.
    """

    tap_points = RESNET_ENCODER_TAPS

    def __init__(self, in_channels: int = 1, out_channels: int = 2, pretrained_weights: str | None = None):
        super().__init__()
        self.encoder = ResNetBackbone(34, in_channels)
        self.dec4 = LinkNetDecoderBlock(512, 256)
        self.dec3 = LinkNetDecoderBlock(256, 128)
        self.dec2 = LinkNetDecoderBlock(128, 64)
        self.dec1 = LinkNetDecoderBlock(64, 64)
        self.aam3 = AugmentedAttention(256)
        self.aam2 = AugmentedAttention(128)
        self.aam1 = AugmentedAttention(64)
        self.head = nn.Sequential(
            nn.ConvTranspose2d(64, 32, kernel_size=3, stride=2), nn.ReLU(inplace=False),
            nn.Conv2d(32, 32, kernel_size=3), nn.ReLU(inplace=False),
            nn.Conv2d(32, out_channels, kernel_size=2, padding=1),
        )
        if pretrained_weights is not None:
            self.encoder.load_pretrained(pretrained_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder(x)
        d = self.aam3(self.dec4(e[4]), e[3])
        d = self.aam2(self.dec3(d), e[2])
        d = self.aam1(self.dec2(d), e[1])
        return self.head(self.dec1(d))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: for each bin b, adaptive average pooling to b x b -> 1x1 conv
    ``C -> C / len(bins)`` + BN + ReLU -> bilinear upsampling (align_corners=True); the input and the pooled maps
    are concatenated and fused by a 3x3 conv -> ``out_channels`` + BN + ReLU + Dropout2d. MONAI ``Convolution``.

    Args:
        in_channels: input channels C.
        out_channels: output channels (C / len(bins) in PSPNet).
        bins: pooled grid sizes.
        dropout: channel dropout after the fusion conv.

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int = 2048, out_channels: int = 512, bins: tuple[int, ...] = (1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        branch = in_channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), _conv_bn_relu(in_channels, branch, bias=False)) for b in bins
        )
        self.fuse = Convolution(2, in_channels + branch * len(bins), out_channels, kernel_size=3, adn_ordering="NAD",
                                act=_RELU, norm="batch", dropout=dropout, dropout_dim=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pyramid = [x]
        for branch in self.branches:
            pyramid.append(F.interpolate(branch(x), size=size, mode="bilinear", align_corners=True))
        return self.fuse(torch.cat(pyramid, dim=1))


class PSPNet(nn.Module):
    """PSPNet with a dilated ResNet-50 (output stride 8), EMKD's alternative teacher.

    Encoder :class:`ResNetBackbone` (MONAI ``ResNet`` adapted after construction: deep stem of three 3x3 convs
    64, 64, 128; ``layer3``/``layer4`` without stride, dilated 2/4). Head: :class:`PyramidPooling` with bins
    (1, 2, 3, 6) on ``layer4`` (2048 -> 512), 1x1 conv 512 -> ``out_channels``, bilinear upsampling
    (align_corners=True) to the input size. The head is initialised as in the official code (kaiming-normal
    fan-in, BatchNorm weight 1 and bias 1e-4); the encoder as MONAI's ResNet (kaiming-normal fan-out).

    Differences from the official code (EMKD ``networks/PspNet``): the stem takes ``in_channels`` directly
    (EMKD replicates the grey image to 3 channels); ``out_channels`` is honoured (the official factory always
    builds 2 classes); no auxiliary branch (off in EMKD); ``forward`` returns the logits only.

    Reference: Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017.

    Args:
        in_channels: input channels.
        out_channels: number of classes (logit channels).
        pretrained_weights: optional ImageNet deep-stem ResNet-50 weight file for the encoder (keys ``conv1``,
            ``bn1``, ``conv2``, ``bn2``, ``conv3``, ``bn3``, ``layer1`` .. ``layer4``; ``fc.*`` ignored).

    Shapes: ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``.
    """

    tap_points = {
        "low": "encoder.act",
        "enc2": "encoder.layer1",
        "high": "encoder.layer4",
        "bottleneck": "encoder.layer4",
    }

    def __init__(self, in_channels: int = 1, out_channels: int = 2, pretrained_weights: str | None = None):
        super().__init__()
        self.encoder = ResNetBackbone(50, in_channels, deep_stem=True, output_stride=8)
        self.head = nn.Sequential(PyramidPooling(2048, 512, (1, 2, 3, 6), 0.1), nn.Conv2d(512, out_channels, 1))
        for m in self.head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 1e-4)
        if pretrained_weights is not None:
            self.encoder.load_pretrained(pretrained_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(x)[4])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
