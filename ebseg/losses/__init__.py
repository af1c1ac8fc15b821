"""EBSeg's training objectives: Hungarian matching, cross-entropy on branches A and B, point-sampled mask
BCE and dice with deep supervision, and the SSC loss.

    criterion = build_criterion("reference")
    affinity = text_affinity(class_embeddings)          # [K, K], the training vocabulary's
    terms = criterion(model(images, class_embeddings), targets, affinity)
    total_loss(terms).backward()
"""

from ebseg.losses.config import PRESETS, LossConfig
from ebseg.losses.criterion import (
    REFERENCE_NAMES,
    Criterion,
    LossResult,
    build_criterion,
    reference_name,
    total_loss,
)
from ebseg.losses.matcher import HungarianMatcher, Indices
from ebseg.losses.points import pixel_centres, point_sample, uncertain_points, uniform_points
from ebseg.losses.ssc import ssc_loss, text_affinity
from ebseg.losses.targets import Targets, count_masks

__all__ = [
    "PRESETS",
    "REFERENCE_NAMES",
    "Criterion",
    "HungarianMatcher",
    "Indices",
    "LossConfig",
    "LossResult",
    "Targets",
    "build_criterion",
    "count_masks",
    "pixel_centres",
    "point_sample",
    "reference_name",
    "ssc_loss",
    "text_affinity",
    "total_loss",
    "uncertain_points",
    "uniform_points",
]
