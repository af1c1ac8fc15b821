"""Draw a labelled image: class colours blended over the original, class outlines and a legend.

``render_overlay`` reads one image's label map from a labelling output (``pipeline.results.query``), reads
and decodes the original from its ``source_uri`` / ``member`` exactly as the pipeline did
(``pipeline.label.reading``, ``pipeline.label.decode``, EXIF orientation applied) and writes a PNG of the
same size.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline import storage
from pipeline.label.decode import decode_image
from pipeline.label.listing import Shard, input_kind
from pipeline.label.reading import read_shard
from pipeline.results.query import open_output

SWATCH = 10  # legend swatch side, pixels
PAD = 3
LEGEND_BACKGROUND = (0, 0, 0)
LEGEND_TEXT = (255, 255, 255)


def class_color(class_id: int) -> tuple[int, int, int]:
    """A fixed RGB colour for ``class_id``: hues spaced by the golden ratio, so neighbouring ids differ."""
    hue = (class_id * 0.618033988749895) % 1.0
    saturation = 0.85 if class_id % 2 == 0 else 0.6
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


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


def _legend(canvas: Image.Image, entries: list[tuple[tuple[int, int, int], str]]) -> None:
    """Draw ``(colour, name)`` rows in the top-left corner of ``canvas`` (clipped to the image)."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(canvas)
    boxes = [draw.textbbox((0, 0), name, font=font) for _, name in entries]
    row = max(SWATCH, *(b[3] for b in boxes)) + PAD
    width = PAD + SWATCH + PAD + max(b[2] for b in boxes) + PAD
    draw.rectangle((0, 0, width - 1, PAD + row * len(entries) - 1), fill=LEGEND_BACKGROUND)
    for i, (color, name) in enumerate(entries):
        top = PAD + i * row
        draw.rectangle((PAD, top, PAD + SWATCH - 1, top + SWATCH - 1), fill=color)
        draw.text((PAD + SWATCH + PAD, top), name, fill=LEGEND_TEXT, font=font)


def draw_overlay(
    image: np.ndarray,
    label_map: np.ndarray,
    names: Sequence[str],
    *,
    alpha: float = 0.5,
    no_class: int | None = None,
) -> np.ndarray:
    """uint8 [H, W, 3] ``image`` with ``label_map`` (int [H, W] class ids) drawn over it -> uint8 [H, W, 3].

    Inside a class region a pixel becomes ``round((1 - alpha) * pixel + alpha * class_color(id))``; the
    region's boundary pixels take the class colour as is; a legend (swatch + ``names[id]``, classes present
    only, largest area first) sits in the top-left corner. Negative ids and ``no_class`` are not drawn.
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
    ids, areas = np.unique(label_map[drawn], return_counts=True)
    out = image.astype(np.float64)
    colors = np.zeros(image.shape, dtype=np.float64)
    for class_id in ids:
        colors[label_map == class_id] = class_color(int(class_id))
    out[drawn] = (1.0 - alpha) * out[drawn] + alpha * colors[drawn]
    edge = boundary(label_map) & drawn
    out[edge] = colors[edge]
    result = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if len(ids) == 0:
        return result
    order = sorted(zip(areas.tolist(), ids.tolist(), strict=True), key=lambda t: (-t[0], t[1]))
    entries = [(class_color(c), names[c] if c < len(names) else str(c)) for _, c in order]
    canvas = Image.fromarray(result)
    _legend(canvas, entries)
    return np.asarray(canvas)


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


def render_overlay(
    output_uri: str,
    image_id: str,
    dest: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    alpha: float = 0.5,
) -> dict[str, Any]:
    """Draw image ``image_id`` of the labelling output at ``output_uri`` and write it as a PNG to ``dest``.

    Returns ``{"image_id", "dest", "width", "height", "classes"}`` (``classes``: names drawn, largest area
    first). KeyError for an id not in the committed shards, ValueError for an image with error status.
    """
    with open_output(output_uri, storage_options=storage_options) as out:
        label_map = out.label_map(image_id)  # raises for unknown ids and error rows
        source_uri, member = out.con.execute(
            "SELECT source_uri, member FROM images WHERE image_id = ?", [image_id]
        ).fetchone()
        names = list(out.vocabulary.names)
        fs, root = storage.url_to_fs(output_uri, storage_options)
        job = storage.read_json(fs, storage.join(root, "job.json"))
    job = job if isinstance(job, Mapping) else {}
    data = read_source(
        source_uri, member, storage_options=storage_options, image_column=job.get("image_column", "image")
    )
    image = decode_image(data, **({"max_pixels": job["max_pixels"]} if job.get("max_pixels") else {}))
    if image.shape[:2] != label_map.shape:
        raise ValueError(
            f"image {image_id!r}: {source_uri} decodes to {image.shape[:2]}, "
            f"its label map is {label_map.shape}"
        )
    drawn = draw_overlay(image, label_map, names, alpha=alpha)
    buffer = io.BytesIO()
    Image.fromarray(drawn).save(buffer, format="PNG")
    dest_fs, dest_path = storage.url_to_fs(dest, storage_options)
    storage.write_bytes_atomic(dest_fs, dest_path, buffer.getvalue())
    ids, areas = np.unique(label_map[label_map >= 0], return_counts=True)
    order = sorted(zip(areas.tolist(), ids.tolist(), strict=True), key=lambda t: (-t[0], t[1]))
    return {
        "image_id": image_id,
        "dest": dest,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "classes": [names[c] if c < len(names) else str(c) for _, c in order],
    }
