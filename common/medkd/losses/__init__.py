"""KD loss modules. Each is a plain ``torch.nn.Module`` called as ``loss(student, teacher[, label])``; it works on
2D and 3D tensors, averages dense quantities per pixel/voxel, detaches the teacher, and reduces over the batch."""

from medkd.losses.adversarial import AdversarialGeneratorLoss, LogitsDiscriminator, SelfAttention, gradient_penalty
from medkd.losses.attention import ImportanceMapsDistillation, attention_map
from medkd.losses.baselines import (
    AttentionTransfer,
    ChannelWiseDistillation,
    FitNetHint,
    FSPLoss,
    IntraClassFeatureVariation,
    PairwiseSimilarity,
)
from medkd.losses.contrastive import BinaryLogitKD, ContrastiveDistillation, SupervisedContrastiveDistillation, info_nce
from medkd.losses.gkd import ContrastiveGraphDistillation
from medkd.losses.graph import CrossLayerSimilarity, GraphFlowEdges, GraphFlowVertices, flow_matrix
from medkd.losses.logits import PredictionMapDistillation
from medkd.losses.relation import DISTLoss, SoftDiceDistillation, pearson_distance
from medkd.losses.region import RegionAffinityDistillation, region_affinities, region_centroids
from medkd.losses.self_distill import (
    AdversarialTemperatureKD,
    FeatureReconstructionLoss,
    InterClassSeparation,
    LearnableTemperature,
    UpsampledLoss,
    class_wise_features,
    cosine_ramp,
    grad_reverse,
)

__all__ = [
    "AttentionTransfer",
    "ChannelWiseDistillation",
    "FitNetHint",
    "FSPLoss",
    "IntraClassFeatureVariation",
    "PairwiseSimilarity",
    "BinaryLogitKD",
    "ContrastiveDistillation",
    "SupervisedContrastiveDistillation",
    "info_nce",
    "AdversarialTemperatureKD",
    "FeatureReconstructionLoss",
    "InterClassSeparation",
    "LearnableTemperature",
    "UpsampledLoss",
    "class_wise_features",
    "cosine_ramp",
    "grad_reverse",
    "AdversarialGeneratorLoss",
    "ContrastiveGraphDistillation",
    "CrossLayerSimilarity",
    "GraphFlowEdges",
    "GraphFlowVertices",
    "LogitsDiscriminator",
    "SelfAttention",
    "flow_matrix",
    "gradient_penalty",
    "ImportanceMapsDistillation",
    "PredictionMapDistillation",
    "DISTLoss",
    "SoftDiceDistillation",
    "pearson_distance",
    "RegionAffinityDistillation",
    "attention_map",
    "region_affinities",
    "region_centroids",
]
