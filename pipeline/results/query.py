"""Query a labelling output with DuckDB: ``images`` and ``segments`` views over its committed shards, and
``proposals`` over its stored proposals when it has them (``ebseg label --proposals``; a relabelled output
reads those of the output it was relabelled from, for its committed shards).

Only the Parquet files named by ``_manifest/*.json`` are read (``docs/schema.md``: a retried task or an
interrupted run can leave complete part files that no manifest lists), in either layout: schema version 2
(``files``: the part files of a shard) or 1 (``file``: one file per shard), through
``pipeline.layout.committed_files``. Object stores are read through the fsspec filesystem
registered on the DuckDB connection, so S3 settings come from the environment (as s3fs reads them) or
``storage_options``, and no DuckDB extension is downloaded.

    with open_output("s3://bucket/out") as out:
        out.images_with("cat", min_area_fraction=0.1)
        out.sql("SELECT label, count(*) FROM segments GROUP BY label")
        out.search("a red umbrella", limit=5)  # needs proposals
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from ebseg.vocab import Vocabulary
from pipeline import storage
from pipeline.label.proposal_records import (
    NoProposalsError,
    ProposalsInfo,
    read_proposals,
    stored_proposals,
)
from pipeline.layout import (
    IMAGES_SCHEMA,
    JOB_FILE,
    PROPOSALS_FILE,
    SUMMARY_FILE,
    VOCABULARY_FILE,
    committed_parts,
    committed_shards,
    decode_label_map,
    rle_to_mask,
)

# The light image columns (every column but the two heavy ones), in the table's order.
LIGHT_COLUMNS = tuple(n for n in IMAGES_SCHEMA.names if n not in ("label_map", "segments"))
SEGMENT_COLUMNS = ("class_id", "label", "area", "area_fraction", "score", "bbox", "rle")
_RAW = "_ebseg_images_raw"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class LabelOutput:
    """A DuckDB connection over one labelling output (use :func:`open_output`).

    Views: ``images`` (one row per image: the light columns of the ``images`` table plus ``num_segments``;
    ``label_map`` and ``segments`` too when opened with ``heavy=True``) and ``segments`` (one row per image
    and class present: ``image_id`` and the segment struct's fields); with stored proposals also
    ``proposals`` (one row per image and mask query: ``image_id``, ``query``, ``area``, ``bbox``, ``height``,
    ``width``, and the embeddings ``emb_a``, ``emb_b``, ``emb_d`` as ``FLOAT[]``). ``con`` is the connection.
    """

    def __init__(self, uri: str, *, storage_options: Mapping[str, Any] | None = None, heavy: bool = False):
        self.uri = str(uri)
        self.storage_options = dict(storage_options) if storage_options else None
        fs, root = storage.url_to_fs(self.uri, storage_options)
        fs.invalidate_cache(root)
        if not fs.exists(storage.join(root, JOB_FILE)):
            raise FileNotFoundError(f"{self.uri} is not a labelling output: it has no job.json")
        self._vocabulary = Vocabulary.from_dict(storage.read_json(fs, storage.join(root, VOCABULARY_FILE)))
        images, proposals = committed_parts(fs, root)
        self.files = [storage.full_uri(fs, p) for p in images]
        self.proposal_files = [storage.full_uri(fs, p) for p in proposals]
        filesystems = [fs]
        if not proposals and images and fs.exists(storage.join(root, PROPOSALS_FILE)):
            self.proposal_files, elsewhere = self._proposals_elsewhere(fs, root)
            filesystems.append(elsewhere)
        self._scorer = None
        self.con = duckdb.connect()
        try:
            # One per protocol: DuckDB knows a filesystem by its protocol's name.
            for registered in {str(f.protocol): f for f in filesystems if f}.values():
                if not storage.is_local(registered):
                    self.con.register_filesystem(registered)
            self._create_views(heavy=heavy)
        except BaseException:
            self.con.close()
            raise

    def _proposals_elsewhere(self, fs, root: str) -> tuple[list[str], Any]:
        """A relabelled output's proposals are its source's (``ProposalsInfo.stored_in``): the URIs of
        those of its committed shards and the filesystem they are on; none (and None) when the source no
        longer holds them (``proposals_info`` then says why)."""
        try:
            stored = stored_proposals(fs, root, self.storage_options)
        except NoProposalsError:
            return [], None
        parts = stored.shard_parts(committed_shards(fs, root))
        files = [storage.join(stored.root, name) for shard in sorted(parts) for name in parts[shard]]
        return [storage.full_uri(stored.fs, f) for f in files], stored.fs

    def _create_views(self, *, heavy: bool) -> None:
        if self.files:
            listing = ", ".join(_quote(f) for f in self.files)
            self.con.execute(f"CREATE VIEW {_RAW} AS SELECT * FROM read_parquet([{listing}])")
        else:  # no committed shard yet: the same columns, no rows
            self.con.register(_RAW, IMAGES_SCHEMA.empty_table())
        columns = [*LIGHT_COLUMNS, *(("label_map", "segments") if heavy else ())]
        self.con.execute(
            f"CREATE VIEW images AS SELECT {', '.join(columns)}, "
            f"coalesce(len(segments), 0) AS num_segments FROM {_RAW}"
        )
        fields = ", ".join(f"s.{name} AS {name}" for name in SEGMENT_COLUMNS)
        self.con.execute(
            f"CREATE VIEW segments AS SELECT image_id, {fields} "
            f"FROM (SELECT image_id, unnest(segments) AS s FROM {_RAW} WHERE segments IS NOT NULL)"
        )
        if self.proposal_files:
            listing = ", ".join(_quote(f) for f in self.proposal_files)
            # Parallel unnests zip: row q of every per-query list. float16 embeddings read as FLOAT.
            self.con.execute(
                "CREATE VIEW proposals AS SELECT image_id, unnest(range(queries)) AS query, "
                "unnest(areas) AS area, unnest(boxes) AS bbox, height, width, "
                "unnest(emb_a)::FLOAT[] AS emb_a, unnest(emb_b)::FLOAT[] AS emb_b, "
                f"unnest(emb_d)::FLOAT[] AS emb_d FROM read_parquet([{listing}])"
            )

    # ------------------------------------------------------------------------------------------- queries

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    def sql(self, query: str, params: list[Any] | None = None) -> pa.Table:
        """Run ``query`` (over ``images``, ``segments`` or any Parquet file); its rows as an Arrow table."""
        relation = self.con.sql(query, params=params)
        return pa.table({}) if relation is None else relation.to_arrow_table()

    def class_id(self, label: str) -> int:
        """The class id of ``label``; ValueError listing the vocabulary if it has no such class."""
        names = list(self._vocabulary.names)
        if label not in names:
            raise ValueError(f"unknown label {label!r}; the output's vocabulary is {names}")
        return names.index(label)

    def images_with(self, label: str, *, min_area_fraction: float = 0.0, min_area: int = 0) -> list[str]:
        """Ids (sorted) of the images in which ``label`` covers at least ``min_area_fraction`` of the pixels
        and at least ``min_area`` pixels."""
        rows = self.con.execute(
            "SELECT DISTINCT image_id FROM segments WHERE class_id = ? AND area_fraction >= ? AND area >= ? "
            "ORDER BY image_id",
            [self.class_id(label), float(min_area_fraction), int(min_area)],
        ).fetchall()
        return [r[0] for r in rows]

    def class_histogram(self) -> list[tuple[str, int, int]]:
        """``(label, images, pixels)`` for every class present in some image, most pixels first."""
        rows = self.con.execute(
            "SELECT label, count(DISTINCT image_id), sum(area) FROM segments GROUP BY label "
            "ORDER BY 3 DESC, 1"
        ).fetchall()
        return [(label, int(images), int(pixels)) for label, images, pixels in rows]

    def _image(self, image_id: str, *columns: str) -> tuple:
        rows = self.con.execute(
            f"SELECT status, error, {', '.join(columns)} FROM {_RAW} WHERE image_id = ?", [image_id]
        ).fetchall()
        if not rows:
            raise KeyError(f"no image {image_id!r} in the committed shards of {self.uri}")
        status, error, *values = rows[0]
        if status != "ok":
            raise ValueError(f"image {image_id!r} in {self.uri} has no labels: {error}")
        return tuple(values)

    def mask(self, image_id: str, label: str) -> np.ndarray:
        """bool [height, width]: the pixels of ``image_id`` labelled ``label`` (all False if absent)."""
        class_id = self.class_id(label)
        height, width = self._image(image_id, "height", "width")
        rows = self.con.execute(
            "SELECT rle FROM segments WHERE image_id = ? AND class_id = ?", [image_id, class_id]
        ).fetchall()
        if not rows:
            return np.zeros((height, width), dtype=bool)
        return rle_to_mask(rows[0][0], height, width)

    def label_map(self, image_id: str) -> np.ndarray:
        """int32 [height, width] class ids of ``image_id`` (-1 = no class), decoded from its PNG."""
        (data,) = self._image(image_id, "label_map")
        return decode_label_map(data)

    # ------------------------------------------------------------------------------------------- Python API

    def _read_json(self, name: str) -> Any:
        fs, root = storage.url_to_fs(self.uri, self.storage_options)
        path = storage.join(root, name)
        return storage.read_json(fs, path) if fs.exists(path) else None

    @property
    def job(self) -> dict[str, Any]:
        """``OUT/job.json``: the run's model, vocabulary, input, settings and run id."""
        return dict(self._read_json(JOB_FILE) or {})

    @property
    def summary(self) -> dict[str, Any] | None:
        """``OUT/summary.json`` of the last finished run (counts, errors by reason, times), or None."""
        return self._read_json(SUMMARY_FILE)

    def _rows(self, view: str, where: str | None, params, columns, limit, format: str):
        listing = ", ".join(columns) if columns else "*"
        query = f"SELECT {listing} FROM {view}" + (f" WHERE {where}" if where else "")
        query += f" ORDER BY image_id{', class_id' if view == 'segments' else ''}"
        query += f" LIMIT {int(limit)}" if limit is not None else ""
        table = self.sql(query, list(params) if params else None)
        if format == "pandas":
            return table.to_pandas()
        if format == "arrow":
            return table
        raise ValueError(f"format must be 'pandas' or 'arrow', got {format!r}")

    def images(
        self,
        where: str | None = None,
        params: list[Any] | None = None,
        *,
        columns: list[str] | None = None,
        limit: int | None = None,
        format: str = "pandas",
    ):
        """Rows of the ``images`` view (``where``: an SQL condition, ``$1``... bound from ``params``), ordered
        by ``image_id``, as a pandas DataFrame or (``format="arrow"``) a pyarrow Table."""
        return self._rows("images", where, params, columns, limit, format)

    def segments(
        self,
        where: str | None = None,
        params: list[Any] | None = None,
        *,
        columns: list[str] | None = None,
        limit: int | None = None,
        format: str = "pandas",
    ):
        """Rows of the ``segments`` view (one per image and class present), like :meth:`images`:
        ``out.segments("label = $1 AND area_fraction > 0.1", ["cat"])``."""
        return self._rows("segments", where, params, columns, limit, format)

    @property
    def has_proposals(self) -> bool:
        """True when the output has proposals (labelled with ``--proposals``, or relabelled from such an
        output that still holds them)."""
        return bool(self.proposal_files)

    @property
    def proposals_info(self) -> ProposalsInfo:
        """``OUT/proposals.json``; NoProposalsError when the output has none, or when it was relabelled
        from an output that no longer holds them."""
        fs, root = storage.url_to_fs(self.uri, self.storage_options)
        return stored_proposals(fs, root, self.storage_options).info

    def text_scorer(self):
        """The ``TextScorer`` of this output's model and vocabulary (loaded once; texts are cached)."""
        if self._scorer is None:
            from ebseg.zoo import load_text_tower
            from pipeline.results.search import TextScorer

            self._scorer = TextScorer(load_text_tower(self.proposals_info.model), self.vocabulary)
        return self._scorer

    def image_proposals(self, image_id: str):
        """(``Proposals``, original (height, width)) of one image; KeyError when it has none."""
        table = self.sql(
            "SELECT * FROM read_parquet($1) WHERE image_id = $2", [self.proposal_files, image_id]
        )
        if not table.num_rows:
            raise KeyError(f"no proposals for image {image_id!r} in {self.uri}")
        return read_proposals(table)[image_id]

    def search(
        self,
        text: str,
        *,
        min_area: float = 0.0,
        limit: int | None = 10,
        format: str = "pandas",
        actors: int | None = None,
    ):
        """Images ranked by their best region for ``text`` (``pipeline.results.search``), best first:
        ``image_id``, ``query``, ``score``, ``area`` (fraction of the image), ``bbox`` ([x, y, w, h] at
        the original size), ``source_uri``. min_area: ignore regions smaller than this fraction.
        NoProposalsError when the output has no proposals. Only the parts' embeddings and stored areas and
        boxes are read (``SEARCH_COLUMNS``): no mask is decoded. actors: score the parts on that many CPU
        actors on Ray (``search_on_ray``: the same hits, scores equal to float32 rounding), else one part
        at a time in this process."""
        from pipeline.results.search import best_first, hits_table, rank_part, search_on_ray

        if actors is not None:
            model = self.proposals_info.model  # NoProposalsError before Ray starts
            found = search_on_ray(
                self.proposal_files, model, self.vocabulary.names, text, actors=actors,
                min_area=min_area, limit=limit, storage_options=self.storage_options,
            )  # fmt: skip
        else:
            scorer, found = self.text_scorer(), []
            for uri in self.proposal_files:
                hits = rank_part(scorer, uri, text, min_area, self.storage_options)
                found = best_first([*found, *hits], limit)
        ids = [hit.image_id for hit in found]
        sources = dict(
            self.con.execute(
                "SELECT image_id, source_uri FROM images WHERE list_contains($1, image_id)", [ids]
            ).fetchall()
        )
        table = hits_table(found).append_column(
            "source_uri", pa.array([sources.get(i) for i in ids], pa.string())
        )
        if format == "pandas":
            return table.to_pandas()
        if format == "arrow":
            return table
        raise ValueError(f"format must be 'pandas' or 'arrow', got {format!r}")

    def overlay(self, image_id: str, *, alpha: float = 0.5, side_by_side: bool = True):
        """``image_id`` drawn with its classes (the original beside it, the legend to the right) as a PIL
        image, which Jupyter shows inline."""
        from PIL import Image

        from pipeline.results.overlay import draw_overlay, read_labelled

        image, label_map = read_labelled(self, image_id)
        drawn = draw_overlay(image, label_map, self.vocabulary.names, alpha=alpha, side_by_side=side_by_side)
        return Image.fromarray(drawn)

    # ------------------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> LabelOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_output(
    uri: str, *, storage_options: Mapping[str, Any] | None = None, heavy: bool = False
) -> LabelOutput:
    """Open the labelling output at ``uri`` (a local path or fsspec URI, e.g. ``s3://bucket/out``).

    FileNotFoundError when ``uri`` holds no ``job.json``; an output without committed shards has empty views.
    """
    return LabelOutput(uri, storage_options=storage_options, heavy=heavy)
