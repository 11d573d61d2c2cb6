from frcnn.modeling.rpn.anchor_target import AnchorMatcher, AnchorTargets, anchor_targets
from frcnn.modeling.rpn.head import SIGMOID, SOFTMAX, RPNHead, objectness_logit
from frcnn.modeling.rpn.loss import rpn_loss_box, rpn_loss_cls, rpn_losses
from frcnn.modeling.rpn.proposals import Proposals, ProposalSettings, generate_proposals
from frcnn.modeling.rpn.rpn import RPN

__all__ = [
    "RPN",
    "SIGMOID",
    "SOFTMAX",
    "AnchorMatcher",
    "AnchorTargets",
    "ProposalSettings",
    "Proposals",
    "RPNHead",
    "anchor_targets",
    "generate_proposals",
    "objectness_logit",
    "rpn_loss_box",
    "rpn_loss_cls",
    "rpn_losses",
]
