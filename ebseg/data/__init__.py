"""Training data: label maps, per-image targets, augmentation, and the synthetic shapes set.

Label maps are int32 arrays of class ids with ``IGNORE_INDEX`` (-1) on unlabelled pixels; on disk they are
8-bit PNGs with 255 = ignore, or 16-bit with 65535 = ignore for more than 255 classes (see ``labels.py``).
"""

from ebseg.data.labels import IGNORE_INDEX, decode_label, encode_label, label_bits
from ebseg.data.targets import semantic_targets
from ebseg.data.transforms import AUGMENT_PRESETS, AugmentConfig, ColorJitter, augment, augment_config

# The shapes set loads lazily, so ``python -m ebseg.data.shapes`` does not import its module twice.
_SHAPES_NAMES = ("SHAPES_CLASSES", "generate", "shapes_vocabulary", "write_shapes")


def __getattr__(name: str):
    if name in _SHAPES_NAMES:
        from ebseg.data import shapes

        return getattr(shapes, name)
    raise AttributeError(f"module 'ebseg.data' has no attribute {name!r}")


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
