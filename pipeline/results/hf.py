"""Export a labelling output as a Hugging Face dataset: ``datasets.load_dataset(DEST)`` opens it.

The layout is the one HF semantic-segmentation datasets use (and ``push_to_hub`` writes)::

    DEST/data/train-00000.parquet ...   columns image_id, image, label, source_uri
    DEST/README.md                      the dataset card: features and data files in its YAML header
    DEST/id2label.json                  {"0": "background", "1": "red circle", ...}

``image`` and ``label`` are ``Image`` features (``{"bytes", "path"}`` structs, declared in each Parquet file's
``huggingface`` metadata and in the card), so ``load_dataset("parquet", data_files=...)`` decodes them too.
``label`` is the stored label map PNG byte for byte: class ids, 255 (65535 above 255 classes) = no class, so
255 is the ``ignore_index``. ``image`` is the original file's bytes, or a PNG of its decoded pixels when the
original's EXIF orientation turns it (the label map is of the turned image; a reader that ignores EXIF would
see the two disagree). Only ok images are exported. ``id2label`` is also in the card and in the Parquet
metadata (``ebseg.id2label``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipeline import storage
from pipeline.label.decode import decode_image
from pipeline.label.listing import Shard, input_kind
from pipeline.label.reading import read_shard
from pipeline.results.query import open_output

ID2LABEL_FILE = "id2label.json"
FILE_BYTES = 256 << 20  # a Parquet file is closed past this many image bytes (HF's own shard size scale)
_IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("image", _IMAGE),
        pa.field("label", _IMAGE),
        pa.field("source_uri", pa.string()),
    ]
)
FEATURES = {
    "image_id": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "label": {"_type": "Image"},
    "source_uri": {"dtype": "string", "_type": "Value"},
}


def _originals(
    rows: list[dict[str, Any]], storage_options, image_column: str
) -> Iterator[tuple[dict, bytes]]:
    """``(row, encoded bytes)`` for each row, reading every tar or Parquet source once (rows sorted by
    source), never one pass over a tar per member."""
    wanted: dict[str, dict[str | None, list[dict]]] = {}
    for row in rows:
        wanted.setdefault(row["source_uri"], {}).setdefault(row["member"], []).append(row)
    for source, members in wanted.items():
        kind = "files" if list(members) == [None] else input_kind(source)
        shard = Shard(shard_id="export", kind=kind, uris=(source,))
        for item in read_shard(shard, storage_options=storage_options, image_column=image_column):
            for row in members.pop(item["member"] if kind != "files" else None, []):
                if item["error"] is not None:
                    raise OSError(f"cannot read {source} member {row['member']!r}: {item['error']}")
                yield row, item["data"]
            if not members:
                break
        if members:
            raise FileNotFoundError(f"{source} no longer holds {sorted(map(str, members))}")


def _as_labelled(data: bytes, width: int, height: int, max_pixels: int | None) -> bytes:
    """``data`` itself when it shows the pixels the label map was made of, else a PNG of the decoded image."""
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(0x0112, 1)
        if orientation in (None, 1) and im.size == (width, height):
            return data
    pixels = decode_image(data, **({"max_pixels": max_pixels} if max_pixels else {}))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _card(id2label: Mapping[str, str], output_uri: str) -> str:
    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {
            "features": [
                {"name": "image_id", "dtype": "string"},
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": "image"},
                {"name": "source_uri", "dtype": "string"},
            ]
        },
        "task_categories": ["image-segmentation"],
        "id2label": dict(id2label),
    }
    return (
        "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n"
        f"# Labels of `{output_uri}` (ebseg)\n\nSemantic segmentation labels: `label` pixel values are "
        "class ids (see `id2label.json`); 255 (65535 above 255 classes) = no class, the `ignore_index`.\n"
    )


def export_hf(
    output_uri: str, dest_uri: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write the ok images of ``output_uri`` as a Hugging Face dataset under the directory ``dest_uri``.

    Returns ``{"dest", "images", "files", "classes"}``. Each file is written atomically, the card and
    ``id2label.json`` last.
    """
    fs, root = storage.url_to_fs(str(dest_uri), storage_options)
    with open_output(output_uri, storage_options=storage_options, heavy=True) as out:
        id2label = {str(i): name for i, name in enumerate(out.vocabulary.names)}
        job = out.job
        rows = out.sql(
            "SELECT image_id, source_uri, member, width, height, label_map FROM images WHERE status = 'ok' "
            "ORDER BY source_uri, member, image_id"
        ).to_pylist()
    metadata = {
        b"huggingface": json.dumps({"info": {"features": FEATURES}}).encode(),
        b"ebseg.id2label": json.dumps(id2label).encode(),
    }
    files: list[str] = []
    batch: list[dict[str, Any]] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if not batch:
            return
        table = pa.Table.from_pylist(batch, schema=SCHEMA.with_metadata(metadata))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        path = storage.join(root, "data", f"train-{len(files):05d}.parquet")
        storage.write_bytes_atomic(fs, path, buffer.getvalue())
        files.append(path)
        batch, size = [], 0

    image_column = job.get("image_column", "image")
    for row, data in _originals(rows, storage_options, image_column):
        image = _as_labelled(data, row["width"], row["height"], job.get("max_pixels"))
        name = row["image_id"]
        batch.append(
            {
                "image_id": name,
                "image": {"bytes": image, "path": None},
                "label": {"bytes": row["label_map"], "path": f"{name}.png"},
                "source_uri": row["source_uri"],
            }
        )
        size += len(image) + len(row["label_map"])
        if size >= FILE_BYTES:
            flush()
    flush()
    storage.write_json_atomic(fs, storage.join(root, ID2LABEL_FILE), id2label)
    storage.write_bytes_atomic(fs, storage.join(root, "README.md"), _card(id2label, output_uri).encode())
    return {
        "dest": storage.full_uri(fs, root),
        "images": len(rows),
        "files": len(files),
        "classes": len(id2label),
    }
