"""Networks of the papers (students and teachers) and the tap-point registry shared by every network.

Students: :class:`ENet`, :class:`ERFNet`, :class:`ESPNet`, :class:`MobileNetV2UNet` (Graph Flow's / GKD's
"Mobile U-Net"), :class:`MobileNetV2Seg` (EMKD's output-stride-8 MobileNetV2), :class:`ResNet18Seg`,
:class:`SmallUNet` (MTMS-CKD's S1 / S2). Teachers: :class:`FANet`, :class:`RAUNet`, :class:`PSPNet`,
:class:`MultiTaskUNet` (MTMS-CKD's T1). Every one returns logits and names its KD taps in ``tap_points``;
MONAI's UNet, BasicUNet, SegResNet and SwinUNETR get theirs from :data:`ALIAS_TABLES`. Adapter:
:class:`Paraphraser` (Graph Flow's teacher-side autoencoder). GKD's alignment networks: :class:`AlignmentNetwork`
(MSAN) and :class:`SemanticAutoEncoder` (P-SAE).
"""

from medkd.networks.alignment import AlignmentNetwork, SemanticAutoEncoder
from medkd.networks.enet import ENet
from medkd.networks.erfnet import ERFNet
from medkd.networks.espnet import ESPNet
from medkd.networks.fanet import FANet
from medkd.networks.mobilenetv2 import MobileNetV2Seg, MobileNetV2UNet
from medkd.networks.paraphraser import Paraphraser
from medkd.networks.resnet import PSPNet, RAUNet, ResNet18Seg
from medkd.networks.taps import ALIAS_TABLES, register_tap_aliases, resolve_tap, tap_points_of
from medkd.networks.unet import MultiTaskUNet, SmallUNet
from medkd.networks.weights import load_weights

__all__ = [
    "ENet", "ERFNet", "ESPNet", "FANet", "MobileNetV2Seg", "MobileNetV2UNet", "MultiTaskUNet", "PSPNet", "RAUNet",
    "Paraphraser", "ResNet18Seg", "SmallUNet", "AlignmentNetwork", "SemanticAutoEncoder",
    "ALIAS_TABLES", "register_tap_aliases", "resolve_tap", "tap_points_of", "load_weights",
]
