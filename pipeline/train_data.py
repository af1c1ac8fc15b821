"""Training pairs (image, label map) from storage, and the Ray Data augmentation stage.

A training set lives at any fsspec URI (local path, ``s3://``, ``gs://``; ``memory://`` too, which the driver
reads since Ray's workers cannot see it) in one of two layouts:

- folder (detectron2): ``images/`` and ``annotations/`` matched by relative path without extension; images
  jpg/jpeg/png/webp/bmp/tif, annotations 8-bit PNG (255 = ignore) or 16-bit PNG/TIFF (65535 = ignore);
- Parquet: ``*.parquet`` files anywhere under the URI with columns ``image_id`` (string), ``image`` and
  ``label`` (the encoded files' bytes), as :func:`ebseg.data.shapes.write_shapes` writes them.

The driver only lists files (and, for Parquet, reads footers); pixels are read and decoded by Ray tasks.
Augmentation is deterministic per (seed, epoch, image_id), so a resumed run sees the same crops and colours.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from ebseg.data.labels import decode_label
from ebseg.data.transforms import AugmentConfig, augment, augment_config
from pipeline.storage import full_uri, url_to_fs

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
LABEL_EXTENSIONS = frozenset({".png", ".tif", ".tiff"})
COLUMNS = ("image_id", "image", "label")
PAIR_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("label", pa.binary())])


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


def decode_pair(
    image_bytes: bytes, label_bytes: bytes, *, image_id: str = "pair"
) -> tuple[np.ndarray, np.ndarray]:
    """Encoded image and label files -> image uint8 [H, W, 3] RGB and label int32 [H, W] (-1 = ignore).

    The image's EXIF orientation is applied, as detectron2's reader does; the label must then have its size.
    """
    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            image = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except Exception as e:  # Pillow raises several unrelated types for corrupt files
        raise ValueError(f"{image_id}: cannot decode the image ({type(e).__name__}: {e})") from e
    label = decode_label(label_bytes, name=image_id)
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"{image_id}: image is {image.shape[0]}x{image.shape[1]} but its label is "
            f"{label.shape[0]}x{label.shape[1]} (height x width)"
        )
    return image, label


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


def _parquet_dataset(listing: PairListing, storage_options: Mapping[str, Any] | None):
    import ray

    files = [{"file": f} for f in listing.files]
    if _process_local(listing.uri, storage_options):  # tests: the driver reads, workers could not
        return ray.data.from_arrow(list(read_parquet_file({"file": [f["file"] for f in files]})))
    files_ds = ray.data.from_items(files, override_num_blocks=len(files))
    options = {"storage_options": storage_options}
    return files_ds.map_batches(read_parquet_file, batch_size=1, fn_kwargs=options)


def _folder_dataset(
    uri: str, rows: Sequence[dict], storage_options: Mapping[str, Any] | None, batch_size: int = 32
):
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
        return _parquet_dataset(listing, storage_options).sort("image_id")
    rows = [{"image_id": i, "image_uri": a, "label_uri": b} for i, a, b in listing.pairs]
    ds = _folder_dataset(uri, rows, storage_options)
    ds.context.execution_options.preserve_order = True  # this dataset's own context: rows stay sorted
    return ds


def pair_rng(seed: int, epoch: int, image_id: str) -> np.random.Generator:
    """The augmentation randomness of one pair in one epoch; independent of row order and of workers."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int(epoch), int.from_bytes(digest[:8], "little")])


class AugmentBatch:
    """``map_batches`` callable: rows {image_id, image, label (bytes)[, epoch]} -> training rows
    {"image_id": str, "epoch": int64, "image": uint8 [3, S, S], "label": int32 [S, S]}, S = crop size.

    The epoch of a row is its ``epoch`` column when the batch has one, else the constructor's ``epoch``;
    each row is augmented with :func:`pair_rng` (seed, epoch, image_id), so the output does not depend on
    batching, order or worker, and a resumed run repeats it exactly.
    """

    def __init__(self, config: AugmentConfig | str, seed: int, epoch: int | None = None) -> None:
        self.config = augment_config(config)
        self.seed = int(seed)
        self.epoch = epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        if "epoch" in batch:
            epochs = [int(e) for e in batch["epoch"]]
        elif self.epoch is not None:
            epochs = [int(self.epoch)] * len(ids)
        else:
            raise ValueError("AugmentBatch needs an 'epoch' column or an epoch argument")
        images, labels = [], []
        for image_id, epoch, image_bytes, label_bytes in zip(ids, epochs, batch["image"], batch["label"]):
            image, label = decode_pair(image_bytes, label_bytes, image_id=image_id)
            image, label = augment(image, label, self.config, pair_rng(self.seed, epoch, image_id))
            images.append(image)
            labels.append(label)
        size = self.config.crop_size
        return {
            "image_id": np.asarray(ids, dtype=object),
            "epoch": np.asarray(epochs, dtype=np.int64),
            "image": np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8),
            "label": np.stack(labels) if labels else np.zeros((0, size, size), np.int32),
        }


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch (32 bits, as Ray wants)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def build_train_dataset(
    uri: str,
    *,
    augment: AugmentConfig | str,
    seed: int,
    epoch: int = 0,
    epochs: int = 1,
    storage_options: Mapping[str, Any] | None = None,
    shuffle: bool = True,
    ordered: bool = True,
    batch_size: int = 16,
    concurrency: int | tuple[int, int] | None = None,
):
    """The augmented training rows of epochs ``epoch .. epoch + epochs - 1``: :class:`AugmentBatch` rows
    {image_id, epoch, image uint8 [3, S, S], label int32 [S, S]}, every pair once per epoch.

    Each epoch is shuffled with :func:`epoch_seed` (seed, epoch): in the folder layout the driver permutes the
    file list (epochs follow one another); for Parquet each epoch's rows go through Ray's ``random_shuffle``
    with that seed and the epochs are unioned (their rows interleave). ``ordered=True`` sets the dataset's
    ``preserve_order``, so every run yields the same rows in the same order, at some cost in throughput;
    with False the order follows task completion. Augmentation never depends on the order (see
    :class:`AugmentBatch`). ``concurrency``: augmentation actors, a fixed count or (min, max); None lets Ray
    autoscale the pool.
    """
    import ray

    config = augment_config(augment)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    listing = list_pairs(uri, storage_options=storage_options)
    epoch_range = range(epoch, epoch + epochs)
    if listing.layout == "folder":
        ds = _folder_epochs(listing, epoch_range, seed=seed, shuffle=shuffle, storage_options=storage_options)
    else:
        parts = []
        for e in epoch_range:
            part = _parquet_dataset(listing, storage_options)
            if shuffle:
                part = part.random_shuffle(seed=epoch_seed(seed, e))
            parts.append(part.map_batches(_with_epoch, fn_kwargs={"epoch": e}, batch_format="pyarrow"))
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if concurrency is None:
        compute = None
    elif isinstance(concurrency, int):
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    else:
        compute = ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    ds = ds.map_batches(
        AugmentBatch,
        fn_constructor_kwargs={"config": config, "seed": seed},
        batch_size=batch_size,
        compute=compute,
    )
    ds.context.execution_options.preserve_order = ordered  # this dataset's own context copy
    return ds


def _folder_epochs(
    listing: PairListing,
    epochs: range,
    *,
    seed: int,
    shuffle: bool,
    storage_options: Mapping[str, Any] | None,
):
    rows = []
    for e in epochs:
        order = np.arange(listing.count)
        if shuffle:
            order = np.random.default_rng(epoch_seed(seed, e)).permutation(listing.count)
        pairs = (listing.pairs[k] for k in order)
        rows += [{"image_id": i, "image_uri": a, "label_uri": b, "epoch": e} for i, a, b in pairs]
    return _folder_dataset(listing.uri, rows, storage_options)


def _with_epoch(batch: pa.Table, *, epoch: int) -> pa.Table:
    return batch.append_column("epoch", pa.array(np.full(batch.num_rows, epoch, np.int64)))
