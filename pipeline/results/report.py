"""``ebseg report``: one static HTML page about a labelling output as a whole.

What the page holds is collected here, through the output's DuckDB views (``pipeline.results.query``), and
drawn by ``pipeline.results.report_html``: the run's identity (``job.json``, ``summary.json``), throughput and
stage times, errors by reason with example rows, images per class and mean area, the distribution of segment
area fractions, and a gallery of overlay thumbnails sampled per class.

The page's size does not grow with the run: every table is an aggregate or bounded (``Limits``), and the
gallery samples a few images per class by a hash of the image id (stable from one report to the next), so a
million-image run gets a page of the same size as a ten-image one. Everything is inline (CSS, SVG charts,
JPEG thumbnails as data URIs): the page opens from a file or a bucket with no server and no network.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipeline import storage
from pipeline.results.overlay import blend, read_labelled
from pipeline.results.query import LabelOutput, open_output
from pipeline.results.report_html import render

REPORT_FILE = "report.html"


@dataclass(frozen=True)
class Limits:
    """What bounds the page's size."""

    classes: int = 60  # rows of the class chart (most frequent first; the rest are counted)
    reasons: int = 20  # error reasons listed
    examples: int = 3  # example rows per error reason
    gallery_classes: int = 24  # classes with gallery thumbnails (most frequent first)
    per_class: int = 3  # thumbnails per class
    thumbnail: int = 200  # long side of a thumbnail, pixels
    bins: int = 20  # area-fraction histogram bins over [0, 1]


@dataclass
class Thumbnail:
    image_id: str
    source: str
    classes: list[tuple[str, float]]  # (label, area fraction), largest first
    data_uri: str | None  # None when the original could not be read (its error is in ``problem``)
    problem: str | None = None


@dataclass
class ReportData:
    """Everything the page shows; ``report_html.render`` turns it into HTML."""

    uri: str
    job: dict[str, Any]
    summary: dict[str, Any] | None
    vocabulary: list[str]
    counts: dict[str, int]  # images, ok, errors, segments
    errors: list[dict[str, Any]]  # reason, count, examples: [{image_id, source, error}]
    classes: list[dict[str, Any]]  # label, class_id, images, mean_area, pixels; most images first
    classes_left_out: int
    histogram: list[int]  # segments per area-fraction bin
    elapsed_ms: dict[str, float]  # p50, p95, max of per-image elapsed_ms
    gallery: list[tuple[str, list[Thumbnail]]] = field(default_factory=list)  # (label, thumbnails)


def _source(row: Mapping[str, Any]) -> str:
    uri = row.get("source_uri") or ""
    return f"{uri} [{row['member']}]" if row.get("member") and not uri.endswith(str(row["member"])) else uri


def _errors(out: LabelOutput, limits: Limits) -> list[dict[str, Any]]:
    reasons = out.sql(
        "SELECT split_part(error, ':', 1) AS reason, count(*) AS n FROM images WHERE status <> 'ok' "
        f"GROUP BY 1 ORDER BY n DESC, reason LIMIT {limits.reasons}"
    ).to_pylist()
    found = []
    for r in reasons:
        examples = out.sql(
            "SELECT image_id, source_uri, member, error FROM images WHERE status <> 'ok' "
            f"AND split_part(error, ':', 1) = $1 ORDER BY md5(image_id) LIMIT {limits.examples}",
            [r["reason"]],
        ).to_pylist()
        rows = [{"image_id": e["image_id"], "source": _source(e), "error": e["error"]} for e in examples]
        found.append({"reason": r["reason"] or "unknown", "count": int(r["n"]), "examples": rows})
    return found


def _classes(out: LabelOutput, limits: Limits) -> tuple[list[dict[str, Any]], int]:
    rows = out.sql(
        "SELECT label, class_id, count(DISTINCT image_id) AS images, avg(area_fraction) AS mean_area, "
        "sum(area) AS pixels FROM segments GROUP BY label, class_id ORDER BY images DESC, pixels DESC, label"
    ).to_pylist()
    shown = [
        {**r, "images": int(r["images"]), "pixels": int(r["pixels"]), "mean_area": float(r["mean_area"])}
        for r in rows[: limits.classes]
    ]
    return shown, max(0, len(rows) - limits.classes)


def _histogram(out: LabelOutput, bins: int) -> list[int]:
    rows = out.sql(
        f"SELECT least(CAST(floor(area_fraction * {bins}) AS INTEGER), {bins - 1}) AS bin, count(*) AS n "
        "FROM segments GROUP BY 1"
    ).to_pylist()
    counts = [0] * bins
    for r in rows:
        counts[max(0, int(r["bin"]))] += int(r["n"])
    return counts


def _elapsed(out: LabelOutput) -> dict[str, float]:
    row = out.sql(
        "SELECT quantile_cont(elapsed_ms, 0.5) AS p50, quantile_cont(elapsed_ms, 0.95) AS p95, "
        "max(elapsed_ms) AS max FROM images WHERE status = 'ok'"
    ).to_pylist()[0]
    return {k: float(v) for k, v in row.items() if v is not None}


def _thumbnail(out: LabelOutput, row: Mapping[str, Any], size: int) -> Thumbnail:
    names = list(out.vocabulary.names)
    classes = out.sql(
        "SELECT label, area_fraction FROM segments WHERE image_id = $1 ORDER BY area DESC",
        [row["image_id"]],
    ).to_pylist()
    thumb = Thumbnail(
        row["image_id"], _source(row), [(c["label"], float(c["area_fraction"])) for c in classes], None
    )
    try:
        image, label_map = read_labelled(out, row["image_id"])
    except (OSError, ValueError, KeyError) as e:  # the original moved or is unreadable: say so in place
        thumb.problem = f"{type(e).__name__}: {e}"
        return thumb
    picture = Image.fromarray(blend(image, label_map, names))
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    thumb.data_uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return thumb


def _gallery(out: LabelOutput, classes: list[dict[str, Any]], limits: Limits) -> list[tuple[str, list]]:
    """Up to ``per_class`` images for each of the most frequent classes, chosen by a hash of the image id
    among the images where the class covers at least 1% (then any), preferring images no other class has
    shown yet; each image is drawn once."""
    chosen = [c["class_id"] for c in classes[: limits.gallery_classes]]
    if not chosen:
        return []
    candidates = 4 * limits.per_class  # a few spare per class, so classes that share images can differ
    rows = out.sql(
        "SELECT class_id, image_id, source_uri, member FROM (SELECT s.class_id, s.image_id, i.source_uri, "
        "i.member, row_number() OVER (PARTITION BY s.class_id ORDER BY s.area_fraction < 0.01, "
        "md5(s.image_id)) AS k FROM segments s JOIN images i USING (image_id) "
        f"WHERE s.class_id IN ({', '.join(str(int(c)) for c in chosen)})) "
        f"WHERE k <= {candidates} ORDER BY class_id, k"
    ).to_pylist()
    by_class: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_class.setdefault(row["class_id"], []).append(row)
    drawn: dict[str, Thumbnail] = {}
    gallery = []
    for c in classes[: limits.gallery_classes]:
        options = by_class.get(c["class_id"], [])
        fresh = [r for r in options if r["image_id"] not in drawn]
        picked = (fresh + [r for r in options if r["image_id"] in drawn])[: limits.per_class]
        for row in picked:
            if row["image_id"] not in drawn:
                drawn[row["image_id"]] = _thumbnail(out, row, limits.thumbnail)
        gallery.append((c["label"], [drawn[r["image_id"]] for r in picked]))
    return gallery


def collect(out: LabelOutput, limits: Limits | None = None) -> ReportData:
    """What the report of the open output ``out`` shows (aggregates and bounded samples only)."""
    limits = limits or Limits()
    counts = out.sql(
        "SELECT count(*) AS images, count(*) FILTER (WHERE status = 'ok') AS ok, "
        "count(*) FILTER (WHERE status <> 'ok') AS errors, coalesce(sum(num_segments), 0) AS segments "
        "FROM images"
    ).to_pylist()[0]
    classes, left_out = _classes(out, limits)
    return ReportData(
        uri=out.uri,
        job=out.job,
        summary=out.summary,
        vocabulary=list(out.vocabulary.names),
        counts={k: int(v) for k, v in counts.items()},
        errors=_errors(out, limits),
        classes=classes,
        classes_left_out=left_out,
        histogram=_histogram(out, limits.bins),
        elapsed_ms=_elapsed(out) if counts["ok"] else {},
        gallery=_gallery(out, classes, limits),
    )


def write_report(
    output_uri: str,
    dest: str | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    limits: Limits | None = None,
) -> str:
    """Write the report of the labelling output at ``output_uri`` to ``dest`` (default
    ``OUTPUT/report.html``), atomically; return its full URI."""
    with open_output(output_uri, storage_options=storage_options) as out:
        page = render(collect(out, limits))
    if dest is None:
        fs, root = storage.url_to_fs(output_uri, storage_options)
        path = storage.join(root, REPORT_FILE)
    else:
        fs, path = storage.url_to_fs(dest, storage_options)
    storage.write_bytes_atomic(fs, path, page.encode("utf-8"))
    return storage.full_uri(fs, path)
