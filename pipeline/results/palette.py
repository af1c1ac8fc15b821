"""Class colours that stay the same for a class name in every run and vocabulary, and read as their names.

A name that contains a colour word takes that colour ("red circle" is red, "blue square" blue); "background"
and other names meaning "nothing in particular" are a neutral grey; every other name gets a colour from a
hash of the name, placed in OKLab (perceptually even lightness and chroma), so no class is much darker or
louder than another and the same name is always the same colour, whatever its class id.
"""

from __future__ import annotations

import hashlib
import math
import re

RGB = tuple[int, int, int]

# Fixed colours for colour words, saturated enough to stand out from a photo at half opacity.
COLOR_WORDS: dict[str, RGB] = {
    "red": (220, 38, 38),
    "green": (34, 170, 70),
    "blue": (37, 99, 235),
    "yellow": (240, 200, 20),
    "orange": (245, 130, 20),
    "purple": (147, 51, 234),
    "violet": (139, 92, 246),
    "pink": (236, 72, 153),
    "magenta": (217, 40, 190),
    "cyan": (6, 182, 212),
    "teal": (13, 148, 136),
    "brown": (146, 90, 45),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
}
NEUTRAL: RGB = (105, 105, 105)
NEUTRAL_NAMES = frozenset({"background", "other", "others", "unlabeled", "unlabelled", "void", "none"})


def _srgb(linear: float) -> float:
    x = min(max(linear, 0.0), 1.0)
    return 12.92 * x if x <= 0.0031308 else 1.055 * x ** (1 / 2.4) - 0.055


def _oklab_to_linear(lightness: float, a: float, b: float) -> tuple[float, float, float]:
    # Björn Ottosson's OKLab -> linear sRGB matrices.
    l_ = (lightness + 0.3963377774 * a + 0.2158037573 * b) ** 3
    m_ = (lightness - 0.1055613458 * a - 0.0638541728 * b) ** 3
    s_ = (lightness - 0.0894841775 * a - 1.2914855480 * b) ** 3
    return (
        4.0767416621 * l_ - 3.3077115913 * m_ + 0.2309699292 * s_,
        -1.2684380046 * l_ + 2.6097574011 * m_ - 0.3413193965 * s_,
        -0.0041960863 * l_ - 0.7034186147 * m_ + 1.7076147010 * s_,
    )


def oklch_color(lightness: float, chroma: float, hue: float) -> RGB:
    """The sRGB colour of OKLCh (``hue`` in turns); chroma is reduced until the colour fits sRGB."""
    for _ in range(40):
        rgb = _oklab_to_linear(
            lightness, chroma * math.cos(2 * math.pi * hue), chroma * math.sin(2 * math.pi * hue)
        )
        if all(-1e-4 <= c <= 1 + 1e-4 for c in rgb):
            break
        chroma *= 0.9
    return tuple(round(255 * _srgb(c)) for c in rgb)  # type: ignore[return-value]


def class_color(name: str) -> RGB:
    """The colour of class ``name``: a colour word it contains, grey for background-like names, else a hashed
    OKLCh hue at lightness 0.62-0.78 and chroma 0.15."""
    key = " ".join(name.lower().split())
    if key in NEUTRAL_NAMES:
        return NEUTRAL
    for word in re.findall(r"[a-z]+", key):
        if word in COLOR_WORDS:
            return COLOR_WORDS[word]
    digest = hashlib.sha256(key.encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    lightness = 0.62 + 0.16 * digest[2] / 255
    return oklch_color(lightness, 0.15, hue)


def text_color(background: RGB) -> RGB:
    """Black or white, whichever reads better on ``background`` (WCAG relative luminance)."""
    r, g, b = (
        ((c / 255 + 0.055) / 1.055) ** 2.4 if c / 255 > 0.04045 else c / 255 / 12.92 for c in background
    )
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)


def hex_color(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)
