from frcnn.modeling.roi_heads.box_heads import BoxPredictor, MLP2Head, SequentialHead
from frcnn.modeling.roi_heads.loss import rcnn_losses
from frcnn.modeling.roi_heads.poolers import MultiLevelPooler, SingleLevelPooler
from frcnn.modeling.roi_heads.postprocess import PostprocessSettings, postprocess_detections
from frcnn.modeling.roi_heads.proposal_target import (
    ProposalTargetSettings,
    RoISamples,
    sample_proposals,
)
from frcnn.modeling.roi_heads.roi_heads import ROIHeads

__all__ = [
    "BoxPredictor",
    "MLP2Head",
    "MultiLevelPooler",
    "PostprocessSettings",
    "ProposalTargetSettings",
    "ROIHeads",
    "RoISamples",
    "SequentialHead",
    "SingleLevelPooler",
    "postprocess_detections",
    "rcnn_losses",
    "sample_proposals",
]
