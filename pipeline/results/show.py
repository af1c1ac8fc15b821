"""``ebseg show``: one labelled image drawn (``pipeline.results.overlay``) and written as a PNG: its classes,
or (``--text``) its best region for a free text."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.results.overlay import class_name, draw_overlay, draw_region, present_classes, read_labelled
from pipeline.results.query import open_output
from pipeline.results.search import region_mask


def render_overlay(
    output_uri: str,
    image_id: str,
    dest: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    alpha: float = 0.5,
    side_by_side: bool = True,
    text: str | None = None,
) -> dict[str, Any]:
    """Draw image ``image_id`` of the labelling output at ``output_uri`` (``draw_overlay``: legend beside it,
    the original to its left unless ``side_by_side`` is False) and write it as a PNG to ``dest``.

    Returns ``{"image_id", "dest", "width", "height", "canvas", "classes"}`` (width, height: the image's;
    canvas: ``[width, height]`` of the PNG; classes: names drawn, largest area first). KeyError for an id not
    in the committed shards, ValueError for an image with error status.

    text: draw the image's best region for this free text instead of its classes (``ebseg show --text``;
    needs stored proposals, ``pipeline.results.search``); the result then also has ``score`` and ``area``
    (None when no region matches: nothing is drawn).
    """
    found: dict[str, Any] = {}
    with open_output(output_uri, storage_options=storage_options) as out:
        image, label_map = read_labelled(out, image_id)
        names = list(out.vocabulary.names)
        if text is not None:
            proposals, size = out.image_proposals(image_id)
            region = out.text_scorer().best_region(proposals, text)
            mask = np.zeros(size, bool) if region is None else region_mask(proposals, region.query, size)
            found = {"score": region and region.score, "area": region and float(mask.mean())}
    if text is None:
        drawn = draw_overlay(image, label_map, names, alpha=alpha, side_by_side=side_by_side)
        classes = [class_name(names, c) for c, _ in present_classes(label_map)]
    else:
        drawn = draw_region(image, mask, text, alpha=alpha, side_by_side=side_by_side)
        classes = [text] if mask.any() else []
    buffer = io.BytesIO()
    Image.fromarray(drawn).save(buffer, format="PNG")
    dest_fs, dest_path = storage.url_to_fs(dest, storage_options)
    storage.write_bytes_atomic(dest_fs, dest_path, buffer.getvalue())
    return {
        "image_id": image_id,
        "dest": dest,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "canvas": [int(drawn.shape[1]), int(drawn.shape[0])],
        "classes": classes,
        **found,
    }
