"""Label maps in memory and on disk.

In memory a label map is an int32 array of class ids with ``IGNORE_INDEX`` (-1) on unlabelled pixels. On disk
(the detectron2 layout, Parquet label bytes) it is a single-channel PNG: 8-bit with 255 = ignore, or 16-bit
with 65535 = ignore when a dataset has more than 255 classes. Palette PNGs (VOC style: the palette index is
the class id) and 8/16-bit TIFFs (ADE-847's full-set labels) read the same way.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

IGNORE_INDEX = -1

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

IGNORE_8BIT = 255
IGNORE_16BIT = 65535

# Pillow modes of single-channel label files, by the ignore value their bit depth uses.
_MODES_8BIT = {"L", "P"}
_MODES_16BIT = {"I;16", "I;16B", "I;16L", "I"}


def decode_label(data: bytes, *, name: str = "label") -> np.ndarray:
    """Encoded label file -> int32 [H, W] class ids, ignore pixels = ``IGNORE_INDEX``.

    ``name`` (a file or image id) prefixes error messages.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img)
    except Exception as e:  # Pillow raises several unrelated types for corrupt files
        raise ValueError(f"{name}: cannot decode the label file ({type(e).__name__}: {e})") from e
    if mode in _MODES_8BIT:
        ignore = IGNORE_8BIT
    elif mode in _MODES_16BIT:
        ignore = IGNORE_16BIT
    else:
        raise ValueError(
            f"{name}: a label file must be a single-channel 8- or 16-bit image of class ids, "
            f"got mode {mode!r}"
        )
    label = array.astype(np.int32)
    if mode == "I" and (label.min(initial=0) < 0 or label.max(initial=0) > IGNORE_16BIT):
        raise ValueError(f"{name}: 32-bit label values outside 0..65535")
    label[label == ignore] = IGNORE_INDEX
    return label


def label_bits(num_classes: int) -> int:
    """Bits per pixel (8 or 16) for ``num_classes`` classes on disk; 255 is the 8-bit ignore value."""
    if num_classes <= IGNORE_8BIT:
        return 8
    if num_classes <= IGNORE_16BIT:
        return 16
    raise ValueError(f"{num_classes} classes do not fit a 16-bit label file (at most {IGNORE_16BIT})")


def to_stored(label: np.ndarray, *, bits: int | None = None) -> np.ndarray:
    """int [H, W] class ids (``IGNORE_INDEX`` = ignore) -> the values a label file holds: uint8 with 255 =
    ignore, or uint16 with 65535 = ignore.

    ``bits=None`` picks 8 when every id is below 255, else 16. A dataset writer should pass the bits of its
    class count (:func:`label_bits`) so every file of the dataset has the same depth.
    """
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an integer [H, W] array, got {label.dtype} {label.shape}")
    low, high = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if low < IGNORE_INDEX:
        raise ValueError(f"label has negative class id {low} (only {IGNORE_INDEX} marks ignore)")
    if bits is None:
        bits = 8 if high < IGNORE_8BIT else 16
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    ignore = IGNORE_8BIT if bits == 8 else IGNORE_16BIT
    if high >= ignore:
        raise ValueError(f"class id {high} does not fit a {bits}-bit label file ({ignore} means ignore)")
    out = label.astype(np.uint8 if bits == 8 else np.uint16)  # -1 wraps to 255 / 65535: ignore
    return out


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def encode_stored(stored: np.ndarray, *, compress_level: int = 6) -> bytes:
    """uint8 / uint16 [H, W] label-file values (:func:`to_stored`) -> PNG bytes, 8- or 16-bit grayscale.

    Written directly rather than through Pillow, whose adaptive row filters cost more than they save on
    label maps (long runs of one value): rows are unfiltered and deflated at ``compress_level``; 8-bit maps
    use zlib's run-length strategy, 2x faster than level 1 there and smaller. Any PNG reader decodes them.
    """
    if stored.ndim != 2 or stored.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a uint8/uint16 [H, W] label map, got {stored.dtype} {stored.shape}")
    height, width = stored.shape
    bits = stored.dtype.itemsize * 8
    rows = np.zeros((height, 1 + width * stored.dtype.itemsize), np.uint8)  # column 0: filter type 0 (none)
    rows[:, 1:] = stored.astype(">u2" if bits == 16 else np.uint8).view(np.uint8).reshape(height, -1)
    strategy = zlib.Z_RLE if bits == 8 else zlib.Z_DEFAULT_STRATEGY
    deflate = zlib.compressobj(compress_level, zlib.DEFLATED, 15, 9, strategy)
    data = deflate.compress(rows.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)  # grayscale, no interlace
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def encode_label(label: np.ndarray, *, bits: int | None = None, compress_level: int = 6) -> bytes:
    """int32 [H, W] class ids (``IGNORE_INDEX`` = ignore) -> 8/16-bit PNG bytes (see :func:`to_stored`)."""
    return encode_stored(to_stored(label, bits=bits), compress_level=compress_level)
