"""Pair sets the pair and training tests build: encoded images, 16-bit label folders, expected shapes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ebseg.data import IGNORE_INDEX, encode_label, generate


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def wide_label_set(root) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """A folder set with 16-bit labels (ids up to 900), mixed image formats and nested ids."""
    rng = np.random.default_rng(0)
    pairs = []
    for i, (stem, fmt, ext) in enumerate(
        [("a", "PNG", "png"), ("b", "WEBP", "webp"), ("sub/c", "BMP", "bmp")]
    ):
        image = rng.integers(0, 256, size=(20 + i, 30, 3), dtype=np.uint8)
        label = rng.choice([0, 17, 256, 900, IGNORE_INDEX], size=(20 + i, 30)).astype(np.int32)
        for sub, data, suffix in [
            ("images", encode_image(image, fmt), ext),
            ("annotations", encode_label(label), "png"),
        ]:
            path = root / sub / f"{stem}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        pairs.append((stem, image, label))
    return pairs


def assert_same_pairs(got, expected) -> None:
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (_, gi, gl), (_, ei, el) in zip(got, expected):
        assert gi.shape == ei.shape and (gi == ei).all() and (gl == el).all()


def expected_shapes(count: int, seed: int, size: int):
    return [(f"{i:06d}", *generate(i, seed=seed, size=size)) for i in range(count)]
