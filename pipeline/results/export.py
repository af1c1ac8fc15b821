"""Export a labelling output (``docs/schema.md``) to formats other tools read: COCO JSON and HF label PNGs.

Both read the committed shards only (through :func:`pipeline.results.query.open_output`) and export the ``ok``
images; error rows are left out (they have no labels).

- :func:`export_coco`: one COCO-style annotation file, one annotation per segment (COCO compressed RLE).
  **Category ids are ``class_id + 1``**: COCO allows 0 but many tools (pycocotools' evaluation among them
  in places, detectron2's mappers) treat id 0 as absent/background, so ids start at 1. Each category also
  carries ``ebseg_class_id`` (the value in the label maps).
- :func:`export_png`: the Hugging Face semantic-segmentation layout: one label-map PNG per image plus
  ``id2label.json``. Here **pixel values are class ids unshifted** (``id2label["0"]`` is class 0), exactly
  as stored: 8-bit PNG for at most 255 classes with 255 = no class, 16-bit otherwise with 65535 = no class
  (the model assigns every pixel, so "no class" does not occur in model output). Use 255 as HF's
  ``ignore_index``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from typing import Any

from pipeline import storage
from pipeline.results.query import open_output

COCO_FILE = "annotations.json"
ID2LABEL_FILE = "id2label.json"
INDEX_FILE = "images.csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(image_id: str) -> str:
    """A file-name-safe form of ``image_id`` (ids are hex already; anything else becomes ``_``)."""
    name = _UNSAFE.sub("_", image_id).lstrip(".")
    if not name:
        raise ValueError(f"image_id {image_id!r} has no usable characters for a file name")
    return name


def _ok_images(out, *columns: str) -> list[dict[str, Any]]:
    listing = ", ".join(("image_id", "source_uri", "member", "width", "height", *columns))
    return out.sql(f"SELECT {listing} FROM images WHERE status = 'ok' ORDER BY image_id").to_pylist()


def _coco_path(root: str) -> str:
    """``root`` itself when it names a ``.json`` file, else ``root/annotations.json``."""
    return root if root.lower().endswith(".json") else storage.join(root, COCO_FILE)


def export_coco(
    output_uri: str, dest_uri: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write the ok images of ``output_uri`` as one COCO annotation JSON at ``dest_uri``.

    ``dest_uri`` ending in ``.json`` is the file itself; otherwise it is a directory and the file is
    ``dest_uri/annotations.json``. The file is written atomically. Images get ids 1..N in ``image_id``
    order, ``file_name`` = ``source_uri`` (plus ``ebseg_image_id`` and, for tar/Parquet inputs,
    ``ebseg_member``); categories are the vocabulary with ``id = class_id + 1``; annotations carry
    ``segmentation = {"size": [h, w], "counts": rle}``, ``area``, ``bbox [x, y, w, h]``, ``score``,
    ``iscrowd = 0``. Returns ``{"path", "images", "annotations", "categories"}``.
    """
    with open_output(output_uri, storage_options=storage_options) as out:
        names = list(out.vocabulary.names)
        rows = _ok_images(out)
        segments = out.sql(
            "SELECT s.image_id, s.class_id, s.area, s.bbox, s.score, s.rle FROM segments s "
            "JOIN images i USING (image_id) WHERE i.status = 'ok' ORDER BY s.image_id, s.class_id"
        ).to_pylist()
    images, coco_id = [], {}
    for index, row in enumerate(rows, start=1):
        coco_id[row["image_id"]] = (index, row["height"], row["width"])
        image = {"id": index, "file_name": row["source_uri"], "width": row["width"], "height": row["height"]}
        image["ebseg_image_id"] = row["image_id"]
        if row["member"] is not None:
            image["ebseg_member"] = row["member"]
        images.append(image)
    annotations = []
    for number, seg in enumerate(segments, start=1):
        image_id, height, width = coco_id[seg["image_id"]]
        annotations.append(
            {
                "id": number,
                "image_id": image_id,
                "category_id": int(seg["class_id"]) + 1,
                "segmentation": {"size": [height, width], "counts": seg["rle"]},
                "area": int(seg["area"]),
                "bbox": [int(v) for v in seg["bbox"]],
                "score": float(seg["score"]),
                "iscrowd": 0,
            }
        )
    categories = [{"id": i + 1, "name": name, "ebseg_class_id": i} for i, name in enumerate(names)]
    document = {
        "info": {"description": f"ebseg labelling output {output_uri}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    fs, root = storage.url_to_fs(str(dest_uri), storage_options)
    path = _coco_path(root)
    storage.write_json_atomic(fs, path, document)
    return {
        "path": storage.full_uri(fs, path),
        "images": len(images),
        "annotations": len(annotations),
        "categories": len(categories),
    }


def export_png(
    output_uri: str, dest_uri: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write the ok images of ``output_uri`` as HF-style label PNGs under the directory ``dest_uri``.

    Layout: ``dest/<safe image_id>.png`` (the stored label-map PNG, byte for byte: uint8 or uint16 class
    ids, 255/65535 = no class), ``dest/images.csv`` (columns ``image_id, source_uri, member, png``; ``png``
    relative to ``dest``) and ``dest/id2label.json`` (``{"0": name0, ...}``, string keys). Each file is
    written atomically; the index and id2label last. Returns ``{"dest", "images", "classes"}``.
    """
    fs, root = storage.url_to_fs(str(dest_uri), storage_options)
    with open_output(output_uri, storage_options=storage_options, heavy=True) as out:
        names = list(out.vocabulary.names)
        rows = _ok_images(out, "label_map")
    index = io.StringIO()
    writer = csv.writer(index, lineterminator="\n")
    writer.writerow(["image_id", "source_uri", "member", "png"])
    seen: dict[str, str] = {}
    for row in rows:
        name = f"{safe_name(row['image_id'])}.png"
        if name in seen:  # two ids that only differ in unsafe characters
            raise ValueError(f"image ids {seen[name]!r} and {row['image_id']!r} map to the same file {name}")
        seen[name] = row["image_id"]
        storage.write_bytes_atomic(fs, storage.join(root, name), row["label_map"])
        writer.writerow([row["image_id"], row["source_uri"], row["member"] or "", name])
    storage.write_bytes_atomic(fs, storage.join(root, INDEX_FILE), index.getvalue().encode())
    storage.write_json_atomic(fs, storage.join(root, ID2LABEL_FILE), {str(i): n for i, n in enumerate(names)})
    return {"dest": storage.full_uri(fs, root), "images": len(rows), "classes": len(names)}
