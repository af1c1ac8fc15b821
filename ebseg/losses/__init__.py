"""EBSeg's training objectives: Hungarian matching, cross-entropy on branches A and B, point-sampled mask
BCE and dice with deep supervision, and the SSC loss.

    criterion = build_criterion("reference")
    affinity = text_affinity(class_embeddings)          # [K, K], the training vocabulary's
    terms = criterion(model(images, class_embeddings), targets, affinity)
    total_loss(terms).backward()
"""

from ebseg.lazy import lazy_exports

# Loaded on first use: ``ebseg.losses.config`` (the presets a job spec validates against) needs no torch.
_MODULES = {
    "ebseg.losses.config": ("PRESETS", "LossConfig"),
    "ebseg.losses.criterion": (
        "REFERENCE_NAMES",
        "Criterion",
        "LossResult",
        "build_criterion",
        "reference_name",
        "total_loss",
    ),
    "ebseg.losses.matcher": ("HungarianMatcher", "Indices"),
    "ebseg.losses.points": ("pixel_centres", "point_sample", "uncertain_points", "uniform_points"),
    "ebseg.losses.ssc": ("ssc_loss", "text_affinity"),
    "ebseg.losses.targets": ("Targets", "count_masks"),
}
__getattr__, __dir__ = lazy_exports(__name__, {n: m for m, names in _MODULES.items() for n in names})

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
