"""EBSeg (CVPR 2024) open-vocabulary semantic segmentation in plain PyTorch.

import ebseg
model = ebseg.build_ebseg("base")
seg = ebseg.Segmenter(model, ebseg.Vocabulary.from_benchmark("ade150"))
[p] = seg.predict([image])            # image: (H, W, 3) uint8 RGB
p.label_map                           # (H, W) class ids into the vocabulary
"""

from ebseg.lazy import lazy_exports

__version__ = "0.1.0"

# Loaded on first use: light modules such as ebseg.resize and ebseg.vocab can be imported by CPU-only decode
# workers without paying for torch, open_clip and segment_anything.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PRESETS": "ebseg.config",
        "EBSegConfig": "ebseg.config",
        "EBSeg": "ebseg.model",
        "EBSegOutput": "ebseg.model",
        "Prediction": "ebseg.labeller",
        "Segmenter": "ebseg.predictor",
        "Vocabulary": "ebseg.vocab",
        "build_ebseg": "ebseg.build",
        "checkpoint": "ebseg.checkpoint",
        "load_model": "ebseg.zoo",
    },
)

__all__ = [
    "PRESETS",
    "EBSeg",
    "EBSegConfig",
    "EBSegOutput",
    "Prediction",
    "Segmenter",
    "Vocabulary",
    "__version__",
    "build_ebseg",
    "checkpoint",
    "load_model",
]
