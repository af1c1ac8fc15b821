"""EBSeg (CVPR 2024) open-vocabulary semantic segmentation in plain PyTorch.

import ebseg
model = ebseg.build_ebseg("base")
seg = ebseg.Segmenter(model, ebseg.Vocabulary.from_benchmark("ade150"))
[p] = seg.predict([image])            # image: (H, W, 3) uint8 RGB
p.label_map                           # (H, W) class ids into the vocabulary
"""

from ebseg import checkpoint
from ebseg.build import build_ebseg
from ebseg.config import PRESETS, EBSegConfig
from ebseg.model import EBSeg, EBSegOutput
from ebseg.predictor import Prediction, Segmenter
from ebseg.vocab import Vocabulary

__version__ = "0.1.0"

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
]
