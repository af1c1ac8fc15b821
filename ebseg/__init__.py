"""EBSeg (CVPR 2024) open-vocabulary semantic segmentation in plain PyTorch.

import ebseg
model = ebseg.build_ebseg("base")
seg = ebseg.Segmenter(model, ebseg.Vocabulary.from_benchmark("ade150"))
[p] = seg.predict([image])            # image: (H, W, 3) uint8 RGB
p.label_map                           # (H, W) class ids into the vocabulary
"""

import importlib

__version__ = "0.1.0"

# Loaded on first use (PEP 562): light modules such as ebseg.resize and ebseg.vocab can be imported by
# CPU-only decode workers without paying for torch, open_clip and segment_anything.
_EXPORTS = {
    "PRESETS": "ebseg.config",
    "EBSegConfig": "ebseg.config",
    "EBSeg": "ebseg.model",
    "EBSegOutput": "ebseg.model",
    "Prediction": "ebseg.predictor",
    "Segmenter": "ebseg.predictor",
    "Vocabulary": "ebseg.vocab",
    "build_ebseg": "ebseg.build",
    "checkpoint": "ebseg.checkpoint",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ebseg' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"ebseg.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
