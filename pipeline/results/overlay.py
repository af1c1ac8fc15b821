"""Draw a labelled image: class colours blended over the original, class outlines, and a legend beside it.

Colours come from ``pipeline.results.palette`` (by class name: the same name is the same colour in every
output). The legend sits in a panel to the right of the picture, never over it; with ``side_by_side`` the
original is shown to the left of the overlay. ``read_labelled`` reads one image's label map from an open
labelling output (``pipeline.results.query``) and reads and decodes the original from its ``source_uri`` /
``member`` exactly as the pipeline did (``pipeline.label.reading``, ``pipeline.label.decode``, EXIF
orientation applied); ``pipeline.results.show`` writes it as a PNG (``ebseg show``), and
``LabelOutput.overlay`` returns it as a PIL image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.label.decode import decode_image
from pipeline.label.listing import Shard, input_kind
from pipeline.label.reading import read_shard
from pipeline.results.palette import RGB, class_color

SWATCH = 14  # legend swatch side, pixels
PAD = 6
GAP = 6  # between the original and the overlay
PANEL = (255, 255, 255)  # legend and margins: white, with dark text
TEXT = (20, 20, 20)


def boundary(label_map: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels with a 4-neighbour of another class (the image border is not a boundary)."""
    edge = np.zeros(label_map.shape, dtype=bool)
    vertical = label_map[1:, :] != label_map[:-1, :]
    horizontal = label_map[:, 1:] != label_map[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def present_classes(label_map: np.ndarray, no_class: int | None = None) -> list[tuple[int, int]]:
    """``(class_id, pixels)`` of the classes drawn in ``label_map``, largest area first (ties by id)."""
    drawn = label_map[label_map >= 0]
    if no_class is not None:
        drawn = drawn[drawn != no_class]
    ids, areas = np.unique(drawn, return_counts=True)
    return sorted(zip(ids.tolist(), areas.tolist(), strict=True), key=lambda t: (-t[1], t[0]))


def class_name(names: Sequence[str], class_id: int) -> str:
    return names[class_id] if class_id < len(names) else str(class_id)


def blend(
    image: np.ndarray,
    label_map: np.ndarray,
    names: Sequence[str],
    *,
    alpha: float = 0.5,
    no_class: int | None = None,
) -> np.ndarray:
    """uint8 [H, W, 3] ``image`` with ``label_map`` (int [H, W] class ids) drawn over it, same size.

    Inside a class region a pixel becomes ``round((1 - alpha) * pixel + alpha * class_color(name))``; the
    region's boundary pixels take the class colour as is. Negative ids and ``no_class`` are not drawn.
    """
    image = np.asarray(image)
    label_map = np.asarray(label_map)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if label_map.shape != image.shape[:2]:
        raise ValueError(f"label_map shape {label_map.shape} differs from the image's {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    drawn = label_map >= 0
    if no_class is not None:
        drawn &= label_map != no_class
    out = image.astype(np.float64)
    colors = np.zeros(image.shape, dtype=np.float64)
    for class_id, _ in present_classes(label_map, no_class):
        colors[label_map == class_id] = class_color(class_name(names, class_id))
    out[drawn] = (1.0 - alpha) * out[drawn] + alpha * colors[drawn]
    edge = boundary(label_map) & drawn
    out[edge] = colors[edge]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def legend_panel(entries: Sequence[tuple[RGB, str]], height: int) -> Image.Image:
    """A white panel at least ``height`` tall listing ``(colour, name)`` rows: a swatch with a dark outline,
    then the name in dark text."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), name, font=font) for _, name in entries]
    row = max(SWATCH, *(b[3] for b in boxes)) + PAD
    width = PAD + SWATCH + PAD + max(b[2] for b in boxes) + PAD
    panel = Image.new("RGB", (width, max(height, PAD + row * len(entries))), PANEL)
    draw = ImageDraw.Draw(panel)
    for i, (color, name) in enumerate(entries):
        top = PAD + i * row
        draw.rectangle((PAD, top, PAD + SWATCH - 1, top + SWATCH - 1), fill=color, outline=(60, 60, 60))
        draw.text((PAD + SWATCH + PAD, top), name, fill=TEXT, font=font)
    return panel


def draw_overlay(
    image: np.ndarray,
    label_map: np.ndarray,
    names: Sequence[str],
    *,
    alpha: float = 0.5,
    no_class: int | None = None,
    side_by_side: bool = False,
) -> np.ndarray:
    """uint8 [H', W', 3]: ``blend(image, label_map, names)`` with the legend in a panel to its right
    (classes present only, largest area first) and, with ``side_by_side``, the original to its left.

    The picture's pixels are never covered: the overlay occupies ``[0:H, x0:x0 + W]`` with ``x0 = 0``, or
    ``W + GAP`` side by side; the canvas is white elsewhere. Without any class there is no legend panel.
    """
    overlay = blend(image, label_map, names, alpha=alpha, no_class=no_class)
    height, width = overlay.shape[:2]
    pictures = [np.asarray(image), overlay] if side_by_side else [overlay]
    entries = [
        (class_color(class_name(names, c)), class_name(names, c))
        for c, _ in present_classes(label_map, no_class)
    ]
    panel = legend_panel(entries, height) if entries else None
    total = len(pictures) * width + (len(pictures) - 1) * GAP + (panel.width if panel else 0)
    canvas = Image.new("RGB", (total, max(height, panel.height if panel else 0)), PANEL)
    for i, picture in enumerate(pictures):
        canvas.paste(Image.fromarray(picture), (i * (width + GAP), 0))
    if panel is not None:
        canvas.paste(panel, (total - panel.width, 0))
    return np.asarray(canvas)


def draw_region(
    image: np.ndarray, mask: np.ndarray, text: str, *, alpha: float = 0.5, side_by_side: bool = False
) -> np.ndarray:
    """uint8 [H', W', 3]: ``image`` with a found region (bool [H, W], e.g. ``pipeline.results.search.
    region_mask``) tinted and outlined in the colour of ``text`` and ``text`` in the legend, drawn as
    ``draw_overlay`` draws a class (``ebseg show OUTPUT IMAGE --text TEXT``)."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool [H, W], got {mask.dtype} {mask.shape}")
    label_map = np.where(mask, 0, -1).astype(np.int32)  # one class, the text; elsewhere nothing drawn
    return draw_overlay(image, label_map, [text], alpha=alpha, side_by_side=side_by_side)


def read_source(
    source_uri: str,
    member: str | None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    image_column: str = "image",
) -> bytes:
    """The encoded bytes of one input image, read the way the pipeline read it (``read_shard``)."""
    kind = "files" if member is None else input_kind(source_uri)
    if kind not in ("files", "tar", "parquet"):
        raise ValueError(f"cannot tell how to read member {member!r} of {source_uri}")
    shard = Shard(shard_id="overlay", kind=kind, uris=(source_uri,))
    for row in read_shard(shard, storage_options=storage_options, image_column=image_column):
        if row["member"] == member:
            if row["error"] is not None:
                raise OSError(f"cannot read {source_uri} member {member!r}: {row['error']}")
            return row["data"]
    raise FileNotFoundError(f"{source_uri} has no member {member!r}")


def read_labelled(out, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 [H, W, 3], label_map int32 [H, W])`` of ``image_id`` in the open output ``out``
    (a ``LabelOutput``): the original read and decoded as the pipeline did. KeyError for an id not in the
    committed shards, ValueError for an image with error status."""
    label_map = out.label_map(image_id)  # raises for unknown ids and error rows
    ((source_uri, member),) = out.con.execute(
        "SELECT source_uri, member FROM images WHERE image_id = ?", [image_id]
    ).fetchall()
    job = out.job
    data = read_source(
        source_uri, member, storage_options=out.storage_options, image_column=job.get("image_column", "image")
    )
    image = decode_image(data, **({"max_pixels": job["max_pixels"]} if job.get("max_pixels") else {}))
    if image.shape[:2] != label_map.shape:
        raise ValueError(
            f"image {image_id!r}: {source_uri} decodes to {image.shape[:2]}, "
            f"its label map is {label_map.shape}"
        )
    return image, label_map
