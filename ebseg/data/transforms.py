"""Training augmentation: the reference's semantic-segmentation recipe in numpy and Pillow.

For one (image, label) pair, in this order (the reference's train mapper):

1. resize so the short side is a size drawn from ``short_sides`` (long side capped at ``max_size``); the image
   bilinear through Pillow, the label nearest-neighbour with torch's legacy ``nearest`` index rule;
2. random crop of ``crop_size`` (smaller sides are kept whole), retried up to 10 times while one class covers
   ``single_category_max_area`` or more of the crop (1.0, the reference's value, switches it off);
3. SSD-style colour jitter on the image (brightness, then contrast/saturation/hue in one of two orders, each
   step applied with probability 1/2; saturation and hue in OpenCV's 8-bit HSV, hue in [0, 180));
4. horizontal flip with probability ``flip_prob``;
5. pad right and bottom to ``crop_size`` x ``crop_size``: image value 128, label ``IGNORE_INDEX``.

Every random draw comes from the one ``numpy.random.Generator`` passed in, so a pair augments identically for
the same generator state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ebseg.data.labels import IGNORE_INDEX

CROP_TRIES = 10  # attempts at a crop that satisfies the category-area constraint (the reference's count)


@dataclass(frozen=True)
class ColorJitter:
    """SSD photometric distortion; the defaults are the reference's values."""

    brightness_delta: float = 32.0  # add U(-d, d) to every channel
    contrast: tuple[float, float] = (0.5, 1.5)  # multiply every channel by U(lo, hi)
    saturation: tuple[float, float] = (0.5, 1.5)  # multiply HSV saturation by U(lo, hi)
    hue_delta: int = 18  # add an integer in [-d, d] to the hue, in OpenCV units of 2 degrees


@dataclass(frozen=True)
class AugmentConfig:
    """One training augmentation recipe; output images and labels are ``crop_size`` square."""

    short_sides: tuple[int, ...] = (320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960)  # drawn uniformly
    max_size: int = 2560  # cap on the long side after resizing
    crop_size: int = 640
    # The crop is redrawn while one class covers this fraction of it or more (ignore pixels not counted);
    # 1.0 disables the check.
    single_category_max_area: float = 1.0
    color: ColorJitter | None = field(default_factory=ColorJitter)  # None: no colour jitter
    flip_prob: float = 0.5  # horizontal flip
    pad_value: int = 128  # image fill of the padding (raw 0..255 value, before normalisation)

    def __post_init__(self) -> None:
        sides = tuple(int(s) for s in self.short_sides)
        if not sides or min(sides) <= 0:
            raise ValueError(f"short_sides must be positive sizes, got {self.short_sides!r}")
        object.__setattr__(self, "short_sides", sides)
        if self.crop_size <= 0 or self.max_size <= 0:
            raise ValueError(
                f"crop_size and max_size must be positive, got {self.crop_size}, {self.max_size}"
            )
        if not 0.0 < self.single_category_max_area <= 1.0:
            raise ValueError(
                f"single_category_max_area must be in (0, 1], got {self.single_category_max_area}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"pad_value must be in 0..255, got {self.pad_value}")

    def with_crop_size(self, crop_size: int) -> AugmentConfig:
        """The same recipe at another crop size: the short sides and the long-side cap scale with it."""
        ratio = crop_size / self.crop_size
        return dataclasses.replace(
            self,
            crop_size=crop_size,
            short_sides=tuple(max(1, round(s * ratio)) for s in self.short_sides),
            max_size=max(crop_size, round(self.max_size * ratio)),
        )


def reference() -> AugmentConfig:
    """The paper's recipe (COCO-Stuff training at 640)."""
    return AugmentConfig()


def small() -> AugmentConfig:
    """The same steps at 256 px, for tests and the demo model trained on the 256 px shapes set."""
    return AugmentConfig(short_sides=(192, 224, 256, 288, 320), max_size=1024, crop_size=256)


AUGMENT_PRESETS: dict[str, Callable[[], AugmentConfig]] = {"reference": reference, "small": small}


def augment_config(name_or_config: str | AugmentConfig) -> AugmentConfig:
    """A preset by name, or the config itself."""
    if isinstance(name_or_config, AugmentConfig):
        return name_or_config
    if name_or_config not in AUGMENT_PRESETS:
        raise ValueError(
            f"unknown augmentation preset {name_or_config!r}; choose one of {sorted(AUGMENT_PRESETS)}"
        )
    return AUGMENT_PRESETS[name_or_config]()


def augment(
    image: np.ndarray, label: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """image: uint8 [H, W, 3] RGB; label: int [H, W] class ids (``IGNORE_INDEX`` = ignore).

    Returns image uint8 [3, S, S] and label int32 [S, S] with S = ``config.crop_size``.
    """
    image, label = _check_pair(image, label)
    h, w = label.shape
    new_h, new_w = resized_shape(
        h, w, short_side=int(rng.choice(config.short_sides)), max_size=config.max_size
    )
    image = resize_image(image, new_h, new_w)
    label = resize_label(label, new_h, new_w)

    y0, x0, ch, cw = crop_box(label, config, rng)
    image = image[y0 : y0 + ch, x0 : x0 + cw]
    label = label[y0 : y0 + ch, x0 : x0 + cw]

    if config.color is not None:
        image = color_jitter(image, config.color, rng)
    if rng.uniform() < config.flip_prob:
        image, label = image[:, ::-1], label[:, ::-1]

    size = config.crop_size
    out_image = np.full((3, size, size), config.pad_value, dtype=np.uint8)
    out_label = np.full((size, size), IGNORE_INDEX, dtype=np.int32)
    out_image[:, :ch, :cw] = image.transpose(2, 0, 1)
    out_label[:ch, :cw] = label
    return out_image, out_label


def _check_pair(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image, label = np.asarray(image), np.asarray(label)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an integer [H, W] map, got {label.dtype} {label.shape}")
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"image is {image.shape[0]}x{image.shape[1]} but label is {label.shape[0]}x{label.shape[1]}"
        )
    return image, label.astype(np.int32, copy=False)


# ------------------------------------------------------------------------------------------------ geometry


def resized_shape(h: int, w: int, *, short_side: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) with the short side at ``short_side`` and the long side at most ``max_size``
    (detectron2's ResizeShortestEdge rule, rounding half up)."""
    scale = short_side / min(h, w)
    new_h, new_w = (short_side, scale * w) if h < w else (scale * h, short_side)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_image(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [h, w, 3], Pillow bilinear (which low-pass filters when shrinking)."""
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def _nearest_source(in_size: int, out_size: int) -> np.ndarray:
    # torch's legacy "nearest": source = min(floor(dst * in / out), in - 1), computed in float32.
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def resize_label(label: np.ndarray, h: int, w: int) -> np.ndarray:
    """int [H, W] -> [h, w] nearest neighbour; any id (16-bit and beyond) is kept exactly."""
    if label.shape == (h, w):
        return label
    rows = _nearest_source(label.shape[0], h)
    cols = _nearest_source(label.shape[1], w)
    return label[rows[:, None], cols[None, :]]


def crop_box(label: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y0, x0, crop_h, crop_w) of a random crop of ``label``'s frame, with the category-area constraint."""
    h, w = label.shape
    ch, cw = min(config.crop_size, h), min(config.crop_size, w)
    tries = 1 if config.single_category_max_area >= 1.0 else CROP_TRIES
    for _ in range(tries):
        y0 = int(rng.integers(h - ch + 1))
        x0 = int(rng.integers(w - cw + 1))
        if tries == 1:
            break
        window = label[y0 : y0 + ch, x0 : x0 + cw]
        counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)[1]
        # Accept a crop with two or more classes none of which covers the limit; the last try is kept anyway.
        if len(counts) > 1 and counts.max() < counts.sum() * config.single_category_max_area:
            break
    return y0, x0, ch, cw


# ------------------------------------------------------------------------------------------------ colour


def color_jitter(image: np.ndarray, jitter: ColorJitter, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> uint8 [H, W, 3]; each arithmetic step clips to 0..255 and truncates to uint8."""
    if rng.integers(2):
        image = _affine(image, beta=rng.uniform(-jitter.brightness_delta, jitter.brightness_delta))
    if rng.integers(2):
        image = _contrast(image, jitter, rng)
        image = _saturation(image, jitter, rng)
        image = _hue(image, jitter, rng)
    else:
        image = _saturation(image, jitter, rng)
        image = _hue(image, jitter, rng)
        image = _contrast(image, jitter, rng)
    return image


def _affine(values: np.ndarray, *, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    out = values.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


def _contrast(image: np.ndarray, jitter: ColorJitter, rng: np.random.Generator) -> np.ndarray:
    if rng.integers(2):
        return _affine(image, alpha=rng.uniform(*jitter.contrast))
    return image


def _saturation(image: np.ndarray, jitter: ColorJitter, rng: np.random.Generator) -> np.ndarray:
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = _affine(hsv[..., 1], alpha=rng.uniform(*jitter.saturation))
        return hsv_to_rgb(hsv)
    return image


def _hue(image: np.ndarray, jitter: ColorJitter, rng: np.random.Generator) -> np.ndarray:
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        shift = int(rng.integers(-jitter.hue_delta, jitter.hue_delta + 1))
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 180
        return hsv_to_rgb(hsv)
    return image


# OpenCV's 8-bit RGB -> HSV works in fixed point with 12 fractional bits and these reciprocal tables.
_HSV_SHIFT = 12


def _reciprocal_table(numerator: float) -> np.ndarray:
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        table = np.where(i == 0, 0.0, np.rint(numerator / np.maximum(i, 1)))
    return table.astype(np.int64)


_SAT_TABLE = _reciprocal_table(float(255 << _HSV_SHIFT))
_HUE_TABLE = _reciprocal_table((180 << _HSV_SHIFT) / 6.0)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB -> uint8 [..., 3] HSV, OpenCV's 8-bit convention: H in [0, 180), S, V 0..255.

    Integer maths as OpenCV's: equal to ``cv2.cvtColor(..., COLOR_RGB2HSV)`` on all 2^24 colours.
    """
    r, g, b = (image[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SAT_TABLE[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HUE_TABLE[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


# For each of the six hue sectors: which of (v, p, q, t) is red, green, blue.
_SECTORS = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] HSV (OpenCV's 8-bit convention) -> uint8 [..., 3] RGB.

    Follows OpenCV's vectorised 8-bit path (float32 maths, the two ``1 - s * f`` terms fused into one rounding
    as on FMA hardware, scaled by 255 and truncated): equal to ``cv2.cvtColor(..., COLOR_HSV2RGB)`` of
    opencv-python-headless 5.0 (AVX2) on all 180 x 256 x 256 inputs. OpenCV's scalar path, which rounds
    instead, handles the last ``width % 32`` pixels of each row there, so the reference differs by one level
    on those.
    """
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * (f32(6.0) / f32(180.0))
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    sector = np.trunc(h)
    frac = h - sector
    s64 = s.astype(np.float64)
    # float32 * float32 is exact in float64, so one rounding to float32 reproduces the fused multiply-add.
    q = v * (1.0 - s64 * frac.astype(np.float64)).astype(f32)
    t = v * (1.0 - s64 * (f32(1.0) - frac).astype(np.float64)).astype(f32)
    table = np.stack([v, v * (f32(1.0) - s), q, t], axis=-1)
    rgb = np.take_along_axis(table, _SECTORS[sector.astype(np.int64) % 6], axis=-1) * f32(255.0)
    return np.clip(np.trunc(rgb), 0, 255).astype(np.uint8)
