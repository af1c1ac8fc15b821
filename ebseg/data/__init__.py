"""Training data: label maps, per-image targets, augmentation, and the synthetic shapes set.

Label maps are int32 arrays of class ids with ``IGNORE_INDEX`` (-1) on unlabelled pixels; on disk they are
8-bit PNGs with 255 = ignore, or 16-bit with 65535 = ignore for more than 255 classes (see ``labels.py``).
"""

from ebseg.lazy import lazy_exports

# Loaded on first use: the label codec and the augmentation presets need no torch (targets do), and
# ``python -m ebseg.data.shapes`` must not import its own module twice.
_MODULES = {
    "ebseg.data.labels": ("IGNORE_INDEX", "decode_label", "encode_label", "label_bits"),
    "ebseg.data.targets": ("semantic_targets",),
    "ebseg.data.transforms": ("AUGMENT_PRESETS", "AugmentConfig", "ColorJitter", "augment", "augment_config"),
    "ebseg.data.shapes": ("SHAPES_CLASSES", "generate", "shapes_vocabulary", "write_shapes"),
}
__getattr__, __dir__ = lazy_exports(__name__, {n: m for m, names in _MODULES.items() for n in names})

__all__ = [
    "AUGMENT_PRESETS",
    "IGNORE_INDEX",
    "SHAPES_CLASSES",
    "AugmentConfig",
    "ColorJitter",
    "augment",
    "augment_config",
    "decode_label",
    "encode_label",
    "generate",
    "label_bits",
    "semantic_targets",
    "shapes_vocabulary",
    "write_shapes",
]
