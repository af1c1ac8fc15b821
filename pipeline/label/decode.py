"""Decode stage of the labelling job: encoded image bytes -> uint8 RGB arrays sized for the model.

``decode_image`` turns any image PIL reads into an (H, W, 3) uint8 RGB array, upright (EXIF orientation
applied), and refuses images over a pixel budget from their header, before any pixel is decoded.
``DecodeImages`` is the Ray Data ``map_batches`` step around it; every failure becomes a row. It decodes a
JPEG far larger than the model's input at a reduced DCT scale (PIL's draft mode) before resizing it.

Conversions to 8-bit RGB:

- grayscale ``L`` / ``1``: replicated to three channels (``1`` as 0 / 255);
- 16-bit grayscale (``I;16*``, and ``I``, which is how PIL opens 16-bit PNG/TIFF): value * 255 / 65535,
  rounded (``I`` is clipped to 0..65535 first);
- float ``F``: values in [0, 1] are scaled by 255; any other range is stretched from its finite minimum to
  its maximum (a depth map or a measurement, not a photo); NaN and inf become 0;
- anything with transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a ``transparency``
  key) is composited over ``BACKGROUND``, white: transparent pixels look as they do on a page;
- palette, ``CMYK``, ``YCbCr`` and the rest: PIL's conversion to RGB (PIL undoes Adobe's inverted CMYK
  JPEGs itself).

Multi-frame files (GIF, TIFF, APNG) give their first frame.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ebseg.resize import resize_image, resized_shape

# 8192 x 8192: an (H, W, 3) uint8 array of 192 MiB. PIL's own guard (Image.MAX_IMAGE_PIXELS, a process
# global that we leave alone) still refuses images over twice its value, whatever max_pixels says.
DEFAULT_MAX_PIXELS = 8192 * 8192
BACKGROUND = (255, 255, 255)
REASONS = ("read", "decode", "too_large", "empty", "unsupported")
EXIF_ORIENTATION = 0x0112
EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class DecodeError(Exception):
    """An image that cannot be decoded. ``code`` is one of ``REASONS``; ``str(error)`` is "code: message"."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _open(data: bytes) -> Image.Image:
    """Parse the header only (PIL decodes pixels on ``load``)."""
    with warnings.catch_warnings():
        # Our own pixel limit answers for size; PIL's warning between its two limits would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise DecodeError("too_large", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise DecodeError("decode", f"not a recognised image format ({len(data)} bytes)") from exc
        except Exception as exc:
            raise DecodeError("decode", _describe(exc)) from exc


def _orient(im: Image.Image) -> Image.Image:
    try:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:
        return im  # unreadable EXIF: the pixels are still good, keep them as stored
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im)
    return im


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    lo, hi = values[finite].min(), values[finite].max()
    if lo < 0 or hi > 1:
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    values = np.where(finite, values, 0.0)
    return np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)


def _composite(im: Image.Image) -> np.ndarray:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))


def to_rgb(im: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode -> (H, W, 3) uint8 RGB (rules in the module docstring)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return np.asarray(im)
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale_16bit(np.asarray(im)))
    if mode == "I":
        return _gray_to_rgb(_scale_16bit(np.asarray(im)))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(im)))
    if mode in ALPHA_MODES or "transparency" in im.info:
        return _composite(im)
    try:
        return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise DecodeError("unsupported", f"image mode {mode!r}: {_describe(exc)}") from exc


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header."""
    width, height = im.size
    try:
        transposed = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:
        transposed = False  # as _orient: unreadable EXIF keeps the stored orientation
    return (width, height) if transposed else (height, width)


def _decode(data: bytes | None, max_pixels: int, needed: Callable[[int, int], tuple[int, int]] | None):
    """-> (RGB array, original upright height, width). ``needed`` maps the upright size to the smallest
    size the caller will use: a JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale (DCT
    scaling, PIL's draft mode), still no smaller than it."""
    if not data:
        raise DecodeError("empty", "no image bytes" if data is None else "0 bytes")
    im = _open(data)
    try:
        width, height = im.size
        if width * height > max_pixels:
            raise DecodeError(
                "too_large", f"{width} x {height} = {width * height} pixels, over max_pixels={max_pixels}"
            )
        if width == 0 or height == 0:
            raise DecodeError("empty", f"{width} x {height} image")
        upright = _upright_size(im)
        if needed is not None and im.format == "JPEG":
            need_h, need_w = needed(*upright)
            if upright != (height, width):
                need_h, need_w = need_w, need_h
            if width >= 2 * need_w and height >= 2 * need_h:
                im.draft(im.mode, (need_w, need_h))
        try:
            im.load()
        except Exception as exc:
            raise DecodeError("decode", f"{im.format} {width} x {height}: {_describe(exc)}") from exc
        return to_rgb(_orient(im)), upright[0], upright[1]
    finally:
        im.close()


def decode_image(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, WebP, TIFF, GIF, BMP, ... as PIL reads them) -> (H, W, 3) uint8 RGB.

    H, W are the upright size (after EXIF orientation). The header's width * height is checked against
    ``max_pixels`` before any pixel is decoded. Raises DecodeError: "empty" (no bytes, zero-size image),
    "decode" (unknown format, truncated or corrupt data), "too_large", "unsupported" (a mode PIL cannot
    turn into RGB).
    """
    return _decode(data, max_pixels, None)[0]


def _strings_or_none(values: np.ndarray) -> np.ndarray:
    """Ray hands an all-null Arrow column (``member`` of a files shard) to numpy batches as float NaN."""
    out = np.empty(len(values), dtype=object)
    out[:] = [v if isinstance(v, str) else None for v in values]
    return out


class DecodeImages:
    """``map_batches`` step: raw rows (``pipeline.label.listing.read_shard``) -> decoded rows for the model.

    short_side, max_long_side: the model's input size rule (``Segmenter.input_shape``); short_side None
    keeps each image at its original size. max_pixels: see ``decode_image``.

    Batch format "numpy" (a dict of arrays), in and out. Every input column but ``data`` passes through;
    added or set: ``width``, ``height`` int32 (the original, upright size; 0 on error), ``status``
    ("ok" / "error"), ``error`` (None, or a string starting with a code of ``REASONS``), ``image`` (an
    object array of (h, w, 3) uint8 arrays, ragged, maybe read-only; an empty (0, 0, 3) one on error),
    ``decode_ms`` float32 (decode + resize of the row). ``member`` comes out as None or str (Ray hands an
    all-null column in as NaN). Never raises for a bad image: each failure is a row.

    Stateless, so it runs as tasks: ``ds.map_batches(DecodeImages(640), batch_format="numpy")``.
    """

    def __init__(
        self, short_side: int | None = None, max_long_side: int = 2560, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.short_side = short_side
        self.max_long_side = max_long_side
        self.max_pixels = max_pixels

    def _model_shape(self, height: int, width: int) -> tuple[int, int]:
        return resized_shape(height, width, self.short_side, self.max_long_side)

    def decode_one(self, data: bytes | None) -> tuple[np.ndarray, int, int]:
        """-> (model-sized image, original height, original width); raises DecodeError.

        A JPEG at least twice the model's input size on both sides is decoded at a reduced scale (draft
        mode: 12 MP in a third of the time) and then resized; the original size is still the header's.
        """
        if self.short_side is None:
            return _decode(data, self.max_pixels, None)
        image, height, width = _decode(data, self.max_pixels, self._model_shape)
        return resize_image(image, self._model_shape(height, width)), height, width

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["image_id"])
        read_errors = batch.get("error")
        images = np.empty(n, dtype=object)
        widths, heights = np.zeros(n, np.int32), np.zeros(n, np.int32)
        statuses, errors = np.empty(n, dtype=object), np.empty(n, dtype=object)
        elapsed = np.zeros(n, np.float32)
        for i in range(n):
            start = time.perf_counter()
            error = read_errors[i] if read_errors is not None else None
            if not isinstance(error, str) or not error:  # None, or NaN when a batch came through pandas
                try:
                    images[i], heights[i], widths[i] = self.decode_one(batch["data"][i])
                    error = None
                except DecodeError as exc:
                    error = str(exc)
                except Exception as exc:  # a PIL bug or MemoryError must not fail the whole batch
                    error = f"decode: {_describe(exc)}"
            if error is not None:
                images[i], heights[i], widths[i] = EMPTY_IMAGE, 0, 0
            statuses[i] = "ok" if error is None else "error"
            errors[i] = error
            elapsed[i] = (time.perf_counter() - start) * 1000
        out = {key: value for key, value in batch.items() if key != "data"}
        if "member" in out:
            out["member"] = _strings_or_none(out["member"])
        out.update(
            width=widths, height=heights, status=statuses, error=errors, image=images, decode_ms=elapsed
        )
        return out
