"""A synthetic segmentation set: coloured shapes on textured backgrounds, every pixel labelled.

Each class is one shape drawn in a characteristic colour family (hue jittered, saturation, brightness and
shading varied), so a model has to use both colour and outline. Scenes hold 3-7 shapes of random size,
position and rotation, drawn in order so later shapes occlude earlier ones; shapes may run off the border.
The rest is class 0, "background": a low-saturation texture (smooth noise, stripes or checks). Image ``index``
of a set with seed ``seed`` is a pure function of the pair, so any slice of a set can be regenerated alone.

Write a set in the detectron2 layout or as Parquet (see :func:`write_shapes`)::

    python -m ebseg.data.shapes /tmp/shapes --count 2000 --seed 0 --size 256 --layout folder
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from ebseg.data.labels import encode_label
from ebseg.vocab import Vocabulary

SHAPES_CLASSES: tuple[str, ...] = (
    "background",
    "red circle",
    "blue square",
    "green triangle",
    "yellow star",
    "purple ring",
    "cyan cross",
)

# Per shape class: (outline, hue in degrees, hue jitter, saturation range, brightness range).
_STYLES: dict[int, tuple[str, float, float, tuple[float, float], tuple[float, float]]] = {
    1: ("circle", 0.0, 8.0, (0.65, 1.0), (0.55, 0.95)),
    2: ("square", 225.0, 10.0, (0.6, 1.0), (0.5, 0.95)),
    3: ("triangle", 120.0, 12.0, (0.55, 1.0), (0.45, 0.9)),
    4: ("star", 54.0, 6.0, (0.7, 1.0), (0.8, 1.0)),
    5: ("ring", 285.0, 10.0, (0.5, 0.9), (0.5, 0.9)),
    6: ("cross", 185.0, 8.0, (0.6, 1.0), (0.6, 1.0)),
}

DEFAULT_SIZE = 256
MIN_SHAPES, MAX_SHAPES = 3, 7
RADIUS_RANGE = (0.1, 0.28)  # circumradius as a fraction of the short side


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape; ``radius`` is the circumradius in pixels, ``angle`` a rotation in radians."""

    class_id: int
    center: tuple[float, float]  # (x, y) in pixels
    radius: float
    angle: float
    color: tuple[int, int, int]  # base RGB before shading
    light: tuple[float, float]  # shading gradient (x, y), brightness change per radius


@dataclass(frozen=True)
class Scene:
    """Everything :func:`render` needs; a pure function of (seed, index)."""

    height: int
    width: int
    texture: str  # "noise" | "stripes" | "checks"
    background: tuple[int, int, int]  # mean RGB of the texture
    shapes: tuple[ShapeSpec, ...]  # in drawing order: later ones on top
    noise_seed: int  # the texture's and the pixel noise's randomness


def shapes_vocabulary() -> Vocabulary:
    return Vocabulary(list(SHAPES_CLASSES), name="shapes")


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16 px, got {size!r}")
    return int(h), int(w)


def _hsv_color(rng: np.random.Generator, hue: float, jitter: float, sat, val) -> tuple[int, int, int]:
    h = ((hue + rng.uniform(-jitter, jitter)) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val))
    return round(r * 255), round(g * 255), round(b * 255)


def scene(index: int, *, seed: int = 0, size: int | Sequence[int] = DEFAULT_SIZE) -> Scene:
    """The layout of image ``index`` of the set ``seed``."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    h, w = _size_hw(size)
    rng = np.random.default_rng([seed, index])
    texture = ("noise", "stripes", "checks")[int(rng.integers(3))]
    background = _hsv_color(rng, rng.uniform(0, 360), 0.0, (0.0, 0.22), (0.3, 0.8))
    n = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
    classes = rng.integers(1, len(SHAPES_CLASSES), size=n)
    # Every run of len(classes) - 1 consecutive images holds every shape class at least once.
    classes[rng.integers(n)] = 1 + index % (len(SHAPES_CLASSES) - 1)
    short = min(h, w)
    shapes = []
    for class_id in classes:
        outline, hue, jitter, sat, val = _STYLES[int(class_id)]
        del outline
        strength = rng.uniform(0.0, 0.25)
        direction = rng.uniform(0, 2 * math.pi)
        shapes.append(
            ShapeSpec(
                class_id=int(class_id),
                center=(float(rng.uniform(0, w)), float(rng.uniform(0, h))),
                radius=float(short * rng.uniform(*RADIUS_RANGE)),
                angle=float(rng.uniform(0, 2 * math.pi)),
                color=_hsv_color(rng, hue, jitter, sat, val),
                light=(strength * math.cos(direction), strength * math.sin(direction)),
            )
        )
    return Scene(h, w, texture, background, tuple(shapes), int(rng.integers(2**31)))


def _polygon(spec: ShapeSpec, radii: Sequence[float], offset: float = 0.0) -> list[tuple[float, float]]:
    cx, cy = spec.center
    k = len(radii)
    return [
        (cx + r * spec.radius * math.cos(spec.angle + offset + 2 * math.pi * i / k),
         cy + r * spec.radius * math.sin(spec.angle + offset + 2 * math.pi * i / k))
        for i, r in enumerate(radii)
    ]  # fmt: skip


def _cross(spec: ShapeSpec) -> list[tuple[float, float]]:
    # A plus sign: arms of half-width a reaching to the circumradius along the axes.
    a, r = 0.32, 1.0 / math.hypot(1.0, 0.32)
    corners = [
        (a, r),
        (a, a),
        (r, a),
        (r, -a),
        (a, -a),
        (a, -r),
        (-a, -r),
        (-a, -a),
        (-r, -a),
        (-r, a),
        (-a, a),
        (-a, r),
    ]
    c, s = math.cos(spec.angle), math.sin(spec.angle)
    cx, cy = spec.center
    return [(cx + spec.radius * (x * c - y * s), cy + spec.radius * (x * s + y * c)) for x, y in corners]


def shape_mask(spec: ShapeSpec, height: int, width: int) -> np.ndarray:
    """bool [H, W]: the pixels ``spec`` covers (before any later shape occludes it)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    outline = _STYLES[spec.class_id][0]
    cx, cy = spec.center
    r = spec.radius
    if outline in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
        if outline == "ring":
            inner = 0.55 * r
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif outline == "square":
        draw.polygon(_polygon(spec, [1.0] * 4, math.pi / 4), fill=1)
    elif outline == "triangle":
        draw.polygon(_polygon(spec, [1.0] * 3), fill=1)
    elif outline == "star":
        draw.polygon(_polygon(spec, [1.0, 0.45] * 5), fill=1)
    else:
        draw.polygon(_cross(spec), fill=1)
    return np.asarray(canvas, dtype=bool)


def _texture(scene_: Scene, rng: np.random.Generator) -> np.ndarray:
    """float32 [H, W] multiplicative texture around 1."""
    h, w = scene_.height, scene_.width
    if scene_.texture == "noise":
        cells = int(rng.integers(3, 12))
        coarse = rng.uniform(0.6, 1.4, size=(cells, cells)).astype(np.float32)
        return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(6, max(8.0, min(h, w) / 4))
    u = xx * math.cos(theta) + yy * math.sin(theta)
    contrast = rng.uniform(0.12, 0.35)
    if scene_.texture == "stripes":
        return 1.0 + contrast * np.sin(2 * math.pi * u / period).astype(np.float32)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    checks = (np.floor(u / period) + np.floor(v / period)) % 2
    return (1.0 - contrast + 2 * contrast * checks).astype(np.float32)


def render(scene_: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 [H, W, 3] and label int32 [H, W] of a scene."""
    h, w = scene_.height, scene_.width
    rng = np.random.default_rng(scene_.noise_seed)
    image = np.asarray(scene_.background, np.float32) * _texture(scene_, rng)[..., None]
    label = np.zeros((h, w), dtype=np.int32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for spec in scene_.shapes:
        mask = shape_mask(spec, h, w)
        cx, cy = spec.center
        shade = 1.0 + (spec.light[0] * (xx[mask] - cx) + spec.light[1] * (yy[mask] - cy)) / spec.radius
        image[mask] = np.asarray(spec.color, np.float32) * shade[:, None]
        label[mask] = spec.class_id
    image += rng.normal(0.0, 4.0, size=image.shape).astype(np.float32)  # sensor-like pixel noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def generate(
    index: int, *, seed: int = 0, size: int | Sequence[int] = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the set ``seed``: image uint8 [H, W, 3] RGB and label int32 [H, W] (ids into
    ``SHAPES_CLASSES``, no ignore pixels). ``size`` is one side or (height, width)."""
    return render(scene(index, seed=seed, size=size))


# ------------------------------------------------------------------------------------------------ writing


def image_id(index: int) -> str:
    return f"{index:06d}"


def _encode_image(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buffer, format="PNG")
    else:
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_shapes(
    uri: str,
    *,
    count: int,
    seed: int = 0,
    size: int | Sequence[int] = DEFAULT_SIZE,
    layout: str = "folder",
    storage_options: dict | None = None,
    start: int = 0,
    image_format: str = "png",
    rows_per_file: int = 256,
) -> dict:
    """Write images ``start .. start + count - 1`` of the set ``seed`` under ``uri`` (any fsspec URI).

    ``layout="folder"``: the detectron2 layout, ``images/<id>.png`` (or ``.jpg``) and
    ``annotations/<id>.png`` (8-bit, 255 = ignore). ``layout="parquet"``: ``part-<first index>.parquet`` files
    of up to ``rows_per_file`` rows with columns ``image_id`` (string), ``image`` and ``label`` (encoded file
    bytes). Either way ``vocabulary.json`` at the root holds the set's :class:`~ebseg.vocab.Vocabulary`.
    Returns a summary dict.
    """
    if layout not in ("folder", "parquet"):
        raise ValueError(f"layout must be 'folder' or 'parquet', got {layout!r}")
    image_format = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if count < 1 or start < 0 or rows_per_file < 1:
        raise ValueError(
            f"need count >= 1, start >= 0, rows_per_file >= 1 (got {count}, {start}, {rows_per_file})"
        )
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)

    def pair(index: int) -> tuple[bytes, bytes]:
        image, label = generate(index, seed=seed, size=size)
        return _encode_image(image, image_format), encode_label(label, bits=8)

    files = []
    indices = range(start, start + count)
    if layout == "folder":
        for sub in ("images", "annotations"):
            fs.makedirs(f"{root}/{sub}", exist_ok=True)
        for index in indices:
            image_bytes, label_bytes = pair(index)
            fs.pipe_file(f"{root}/images/{image_id(index)}.{image_format}", image_bytes)
            fs.pipe_file(f"{root}/annotations/{image_id(index)}.png", label_bytes)
            files += [f"images/{image_id(index)}.{image_format}", f"annotations/{image_id(index)}.png"]
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for first in range(start, start + count, rows_per_file):
            chunk = range(first, min(first + rows_per_file, start + count))
            pairs = [pair(i) for i in chunk]
            table = pa.table(
                {
                    "image_id": pa.array([image_id(i) for i in chunk], pa.string()),
                    "image": pa.array([p[0] for p in pairs], pa.binary()),
                    "label": pa.array([p[1] for p in pairs], pa.binary()),
                }
            )
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            name = f"part-{image_id(first)}.parquet"
            fs.pipe_file(f"{root}/{name}", buffer.getvalue())  # one PUT: readers never see half a file
            files.append(name)
    fs.pipe_file(f"{root}/vocabulary.json", shapes_vocabulary().to_json().encode("utf-8"))
    return {"uri": uri, "layout": layout, "count": count, "start": start, "seed": seed, "files": len(files)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ebseg.data.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory or URI (s3://bucket/prefix, ...)")
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="the set's seed (default 0)")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"image side in px (default {DEFAULT_SIZE})"
    )
    parser.add_argument("--layout", choices=("folder", "parquet"), default="folder")
    parser.add_argument("--start", type=int, default=0, help="index of the first image (default 0)")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--rows-per-file", type=int, default=256, help="Parquet rows per file (default 256)")
    args = parser.parse_args(argv)
    summary = write_shapes(
        args.out,
        count=args.count,
        seed=args.seed,
        size=args.size,
        layout=args.layout,
        start=args.start,
        image_format=args.image_format,
        rows_per_file=args.rows_per_file,
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
