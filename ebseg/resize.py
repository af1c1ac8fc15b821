"""The inference resize rule, without torch: decode workers import this and nothing heavier."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["resize_image", "resized_shape"]


def resized_shape(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge rule: short side to ``short_side``, long side capped."""
    scale = short_side / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_long_side:
        scale = max_long_side / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with PIL bilinear, as the reference's ResizeShortestEdge.

    Returns ``image`` itself when it already has ``shape``.
    """
    new_h, new_w = shape
    if image.shape[:2] == (new_h, new_w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
