"""Image/label pair sets from storage, for training and evaluation.

A training set lives at any fsspec URI (local path, ``s3://``, ``gs://``; ``memory://`` too, which the driver
reads since Ray's workers cannot see it) in one of two layouts:

- folder (detectron2): ``images/`` and ``annotations/`` matched by relative path without extension; images
  jpg/jpeg/png/webp/bmp/tif, annotations 8-bit PNG (255 = ignore) or 16-bit PNG/TIFF (65535 = ignore);
- Parquet: ``*.parquet`` files anywhere under the URI with columns ``image_id`` (string), ``image`` and
  ``label`` (the encoded files' bytes), as :func:`ebseg.data.shapes.write_shapes` writes them.

The driver only lists files (and, for Parquet, reads footers); pixels are read and decoded by Ray tasks.
A set may carry ``vocabulary.json`` at its root (``ebseg.data.shapes.write_shapes`` writes one): label value
i is class i of that vocabulary.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from ebseg.data.labels import IGNORE_INDEX, decode_label
from ebseg.vocab import Vocabulary
from pipeline import storage
from pipeline.storage import full_uri, url_to_fs

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
LABEL_EXTENSIONS = frozenset({".png", ".tif", ".tiff"})
COLUMNS = ("image_id", "image", "label")
PAIR_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("label", pa.binary())])
VOCABULARY_FILE = "vocabulary.json"


def pairs_vocabulary(
    data: str, vocabulary: str | Vocabulary | None, storage_options: Mapping[str, Any] | None = None
) -> Vocabulary:
    """The vocabulary whose class i is label value i of the set at ``data``: ``vocabulary`` when given (a
    ``Vocabulary.parse`` value), else the set's own ``vocabulary.json``; ValueError naming the fix."""
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    if vocabulary is not None:
        return Vocabulary.parse(vocabulary)
    fs, root = url_to_fs(data, storage_options)
    path = storage.join(root, VOCABULARY_FILE)
    if not fs.exists(path):
        raise ValueError(
            f"no vocabulary given and {full_uri(fs, path)} does not exist: name the vocabulary whose class i "
            "is label value i (--vocabulary: a benchmark, a file or 'cat,dog,...')"
        )
    try:
        return Vocabulary.from_dict(storage.read_json(fs, path))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{full_uri(fs, path)}: not a vocabulary file ({e})") from e


@dataclass(frozen=True)
class PairListing:
    """What a training set holds, found by listing only.

    ``pairs`` (folder layout): (image_id, image URI, label URI), sorted by image_id. ``files`` (Parquet
    layout): the Parquet file URIs, sorted. ``count``: number of pairs.
    """

    uri: str
    layout: str  # "folder" | "parquet"
    count: int
    pairs: tuple[tuple[str, str, str], ...] = ()
    files: tuple[str, ...] = ()


def list_pairs(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> PairListing:
    """List the training set at ``uri``; raises ``ValueError`` naming the URI or file on a bad layout."""
    fs, root = url_to_fs(uri, storage_options)
    images_dir, labels_dir = f"{root}/images", f"{root}/annotations"
    has_images, has_labels = fs.isdir(images_dir), fs.isdir(labels_dir)
    if has_images or has_labels:
        if not (has_images and has_labels):
            found, missing = ("images/", "annotations/") if has_images else ("annotations/", "images/")
            raise ValueError(
                f"{uri}: found {found} but no {missing} beside it (the folder layout needs both)"
            )
        return _list_folder(uri, fs, images_dir, labels_dir)
    if fs.isfile(root) and root.endswith(".parquet"):
        files = [root]
    else:
        files = sorted(p for p in fs.find(root) if p.endswith(".parquet")) if fs.isdir(root) else []
    if not files:
        raise ValueError(
            f"{uri}: no training data found: expected images/ and annotations/ folders or .parquet files"
        )
    import pyarrow.parquet as pq

    count = 0
    for path in files:
        with fs.open(path, "rb") as f:
            metadata = pq.ParquetFile(f).metadata
        missing = [c for c in COLUMNS if c not in metadata.schema.names]
        if missing:
            raise ValueError(
                f"{full_uri(fs, path)}: Parquet file lacks column(s) {missing}; "
                f"training Parquet needs {list(COLUMNS)}, found {metadata.schema.names}"
            )
        count += metadata.num_rows
    if count == 0:
        raise ValueError(f"{uri}: empty training set (the Parquet files hold no rows)")
    return PairListing(uri, "parquet", count, files=tuple(full_uri(fs, p) for p in files))


def _by_stem(fs, directory: str, extensions: frozenset[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted(fs.find(directory)):
        relative = PurePosixPath(path[len(directory) + 1 :])
        if relative.suffix.lower() not in extensions or relative.name.startswith("."):
            continue
        stem = str(relative.with_suffix(""))
        if stem in out:
            raise ValueError(f"two {what} files for image id {stem!r}: {out[stem]} and {full_uri(fs, path)}")
        out[stem] = full_uri(fs, path)
    return out


def _list_folder(uri: str, fs, images_dir: str, labels_dir: str) -> PairListing:
    images = _by_stem(fs, images_dir, IMAGE_EXTENSIONS, "image")
    labels = _by_stem(fs, labels_dir, LABEL_EXTENSIONS, "annotation")
    if not images and not labels:
        raise ValueError(f"{uri}: empty training set (no image files in images/, no labels in annotations/)")
    lonely_images = sorted(set(images) - set(labels))
    lonely_labels = sorted(set(labels) - set(images))
    if lonely_images or lonely_labels:
        problems = [f"image without annotation: {images[s]}" for s in lonely_images[:5]]
        problems += [f"annotation without image: {labels[s]}" for s in lonely_labels[:5]]
        more = len(lonely_images) + len(lonely_labels) - len(problems)
        tail = f"; and {more} more" if more > 0 else ""
        raise ValueError(f"{uri}: images/ and annotations/ do not match: " + "; ".join(problems) + tail)
    pairs = tuple((stem, images[stem], labels[stem]) for stem in sorted(images))
    return PairListing(uri, "folder", len(pairs), pairs=pairs)


# ------------------------------------------------------------------------------------------------ decoding


# Why a pair cannot train: the ``reason`` of a :class:`PairError` (training skips and counts them by reason).
PAIR_PROBLEMS = ("unreadable", "size_mismatch", "class_out_of_range", "all_ignore")


class PairError(ValueError):
    """One image/label pair that cannot train; ``reason`` is one of :data:`PAIR_PROBLEMS`."""

    def __init__(self, image_id: str, reason: str, message: str) -> None:
        super().__init__(f"{image_id}: {message}")
        self.image_id, self.reason = image_id, reason


def decode_pair(
    image_bytes: bytes, label_bytes: bytes, *, image_id: str = "pair"
) -> tuple[np.ndarray, np.ndarray]:
    """Encoded image and label files -> image uint8 [H, W, 3] RGB and label int32 [H, W] (-1 = ignore).

    The image's EXIF orientation is applied, as detectron2's reader does; the label must then have its size.
    Raises :class:`PairError` ("unreadable" or "size_mismatch").
    """
    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            image = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except Exception as e:  # Pillow raises several unrelated types for corrupt files
        raise PairError(image_id, "unreadable", f"cannot decode the image ({type(e).__name__}: {e})") from e
    try:
        label = decode_label(label_bytes, name=image_id)
    except ValueError as e:
        raise PairError(image_id, "unreadable", str(e).removeprefix(f"{image_id}: ")) from e
    if label.shape != image.shape[:2]:
        raise PairError(
            image_id,
            "size_mismatch",
            f"image is {image.shape[0]}x{image.shape[1]} but its label is "
            f"{label.shape[0]}x{label.shape[1]} (height x width)",
        )
    return image, label


def check_label(label: np.ndarray, num_classes: int, *, image_id: str = "pair") -> None:
    """Raise :class:`PairError` when a label [H, W] (-1 = ignore) cannot train a ``num_classes`` model:
    a class id outside 0..num_classes-1 ("class_out_of_range"), or no labelled pixel ("all_ignore")."""
    labelled = label[label != IGNORE_INDEX]
    if labelled.size == 0:
        raise PairError(image_id, "all_ignore", "every pixel of the label is ignore (nothing to learn)")
    high, low = int(labelled.max()), int(labelled.min())
    if high >= num_classes or low < 0:
        bad = high if high >= num_classes else low
        raise PairError(
            image_id,
            "class_out_of_range",
            f"label holds class id {bad}, outside the vocabulary's 0..{num_classes - 1}",
        )


def iter_pairs(
    uri: str, *, storage_options: Mapping[str, Any] | None = None
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(image_id, image uint8 [H, W, 3], label int32 [H, W]) for every pair, sorted by image_id; no Ray."""
    listing = list_pairs(uri, storage_options=storage_options)
    if listing.layout == "folder":
        for image_id, image_uri, label_uri in listing.pairs:
            image_bytes, label_bytes = _read_all([image_uri, label_uri], storage_options)
            yield image_id, *decode_pair(image_bytes, label_bytes, image_id=image_id)
        return
    yield from _iter_parquet_sorted(listing, storage_options)


def _read_all(uris: Sequence[str], storage_options: Mapping[str, Any] | None) -> list[bytes]:
    """The bytes of every URI, fetched concurrently (object stores answer each GET slowly but in parallel)."""

    def read(uri: str) -> bytes:
        fs, path = url_to_fs(uri, storage_options)
        try:
            return fs.cat_file(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{uri}: file listed in the training set is gone") from e

    if len(uris) <= 1:
        return [read(u) for u in uris]
    with ThreadPoolExecutor(max_workers=min(16, len(uris))) as pool:
        return list(pool.map(read, uris))


def _iter_parquet_sorted(
    listing: PairListing, storage_options: Mapping[str, Any] | None
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    import pyarrow.parquet as pq

    # Index (image_id -> file, row group, row) from the id column alone, then read row groups on demand,
    # keeping the last one: files written in id order are read once.
    index: dict[str, tuple[int, int, int]] = {}
    for f_i, uri in enumerate(listing.files):
        fs, path = url_to_fs(uri, storage_options)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            for g in range(parquet.num_row_groups):
                ids = parquet.read_row_group(g, columns=["image_id"]).column(0).to_pylist()
                for r, image_id in enumerate(ids):
                    if image_id in index:
                        raise ValueError(
                            f"image id {image_id!r} appears twice: "
                            f"{listing.files[index[image_id][0]]} and {uri}"
                        )
                    index[image_id] = (f_i, g, r)
    cached_key, cached = None, None
    for image_id in sorted(index):
        f_i, g, r = index[image_id]
        if cached_key != (f_i, g):
            fs, path = url_to_fs(listing.files[f_i], storage_options)
            with fs.open(path, "rb") as f:
                cached = pq.ParquetFile(f).read_row_group(g, columns=list(COLUMNS))
            cached_key = (f_i, g)
        row = cached.slice(r, 1).to_pylist()[0]
        yield image_id, *decode_pair(row["image"], row["label"], image_id=image_id)


# ------------------------------------------------------------------------------------------------ Ray Data


def read_folder_batch(
    batch: dict[str, np.ndarray], *, storage_options: Mapping[str, Any] | None = None
) -> pa.Table:
    """map_batches: rows {image_id, image_uri, label_uri[, epoch]} -> {image_id, image, label[, epoch]}."""
    n = len(batch["image_id"])
    data = _read_all(
        [str(u) for u in batch["image_uri"]] + [str(u) for u in batch["label_uri"]], storage_options
    )
    columns = {
        "image_id": pa.array([str(i) for i in batch["image_id"]], pa.string()),
        "image": pa.array(data[:n], pa.binary()),
        "label": pa.array(data[n:], pa.binary()),
    }
    if "epoch" in batch:
        columns["epoch"] = pa.array(np.asarray(batch["epoch"], np.int64))
    return pa.table(columns)


def read_parquet_file(batch: dict[str, np.ndarray], *, storage_options: Mapping[str, Any] | None = None):
    """map_batches generator: rows {file} -> the files' {image_id, image, label} rows, a row group a batch."""
    import pyarrow.parquet as pq

    for uri in batch["file"]:
        fs, path = url_to_fs(str(uri), storage_options)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            for g in range(parquet.num_row_groups):
                table = parquet.read_row_group(g, columns=list(COLUMNS))
                yield table.select(list(COLUMNS)).cast(PAIR_SCHEMA)


def _process_local(uri: str, storage_options: Mapping[str, Any] | None) -> bool:
    """Whether the store lives in this process only (``memory://``), out of reach of Ray's workers."""
    protocol = url_to_fs(uri, storage_options)[0].protocol
    return "memory" in ((protocol,) if isinstance(protocol, str) else protocol)


def parquet_dataset(listing: PairListing, storage_options: Mapping[str, Any] | None):
    """A Ray Dataset of the listed Parquet files' rows {image_id, image, label} (tasks read the files)."""
    import ray

    files = [{"file": f} for f in listing.files]
    if _process_local(listing.uri, storage_options):  # tests: the driver reads, workers could not
        return ray.data.from_arrow(list(read_parquet_file({"file": [f["file"] for f in files]})))
    files_ds = ray.data.from_items(files, override_num_blocks=len(files))
    options = {"storage_options": storage_options}
    return files_ds.map_batches(read_parquet_file, batch_size=1, fn_kwargs=options)


def folder_dataset(
    uri: str, rows: Sequence[dict], storage_options: Mapping[str, Any] | None, batch_size: int = 32
):
    """A Ray Dataset of rows {image_id, image, label, ...} from rows naming ``image_uri`` / ``label_uri``
    (tasks read the files; other columns pass through)."""
    import ray

    if _process_local(uri, storage_options):  # tests: the driver reads, workers could not
        return ray.data.from_arrow(read_folder_batch({k: [r[k] for r in rows] for k in rows[0]}))
    refs = ray.data.from_items(list(rows), override_num_blocks=max(1, min(len(rows) // batch_size, 1000)))
    return refs.map_batches(
        read_folder_batch, batch_size=batch_size, fn_kwargs={"storage_options": storage_options}
    )


def read_pairs(uri: str, *, storage_options: Mapping[str, Any] | None = None):
    """A Ray Dataset of rows {"image_id": str, "image": bytes, "label": bytes} (encoded files), sorted by
    image_id. The driver lists files only; Ray tasks read the bytes."""
    listing = list_pairs(uri, storage_options=storage_options)
    if listing.layout == "parquet":
        return parquet_dataset(listing, storage_options).sort("image_id")
    rows = [{"image_id": i, "image_uri": a, "label_uri": b} for i, a, b in listing.pairs]
    ds = folder_dataset(uri, rows, storage_options)
    ds.context.execution_options.preserve_order = True  # this dataset's own context: rows stay sorted
    return ds
