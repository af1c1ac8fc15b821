"""The report page's HTML: one self-contained document (inline CSS, inline SVG charts, data-URI thumbnails;
no script, no external reference) drawn from ``pipeline.results.report.ReportData``.

Every value from the output (class names, paths, error messages) is HTML-escaped: they come from user data.
Class colours are the overlays' (``pipeline.results.palette``), so a chart bar and a mask agree.
"""

from __future__ import annotations

from html import escape
from typing import Any

from pipeline.results.palette import class_color, hex_color

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;margin:0;
background:#f6f8fa}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.sub{color:#59636e;margin:0 0 18px;word-break:break-all}
section{background:#fff;border:1px solid #d1d9e0;border-radius:8px;padding:16px 18px;margin:0 0 16px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{flex:1 1 140px;background:#fff;border:1px solid #d1d9e0;border-radius:8px;padding:12px 14px}
.card b{display:block;font-size:24px}.card span{color:#59636e}
.bad b{color:#cf222e}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef1f4;vertical-align:top}
th{color:#59636e;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px;word-break:break-all}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px;
border:1px solid #0003}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.cls h3{font-size:14px;margin:8px 0 6px}
figure{margin:0 0 8px}figure img{display:block;max-width:100%;border-radius:4px;border:1px solid #d1d9e0}
figcaption{font-size:12px;color:#59636e;word-break:break-all}
.missing{height:120px;display:flex;align-items:center;justify-content:center;background:#eef1f4;
border-radius:4px;font-size:12px;color:#59636e;padding:6px;text-align:center}
.note{color:#59636e;font-size:12px}
"""


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "".join(
        f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in pairs if v is not None
    )


def _swatch(label: str) -> str:
    return f'<span class="swatch" style="background:{hex_color(class_color(label))}"></span>'


def _identity(data) -> str:
    job, summary = data.job, data.summary or {}
    pairs = [
        ("model", f"{job.get('model')} ({job.get('model_id')})"),
        (
            "vocabulary",
            f"{job.get('vocabulary')} ({len(data.vocabulary)} classes, {job.get('vocabulary_id')})",
        ),
        ("run id", job.get("run_id")),
        ("input", job.get("input")),
        ("output", job.get("output") or data.uri),
        ("started", job.get("created_at")),
        ("finished", summary.get("finished_at", "not finished (no summary.json yet)")),
        ("device", f"{job.get('device')}, {job.get('actors')} actor(s), batch {job.get('batch_size')}"),
        ("versions", f"ebseg {job.get('ebseg_version')}, Ray {job.get('ray_version')}"),
    ]
    if job.get("kind") == "relabel":  # no forward pass: labels from the source's stored proposals
        pairs[2:3] = [
            pairs[2],
            ("relabelled from", f"{job.get('source')} (run {job.get('source_run_id')})"),
            ("resolution", job.get("resolution")),
        ]
        pairs[-2] = (
            "device",
            f"CPU, {job.get('actors')} actor(s), stored proposals ({job.get('proposals_encoding')})",
        )
    return f"<section><h2>Run</h2><table>{_rows(pairs)}</table></section>"


def _cards(data) -> str:
    counts, summary = data.counts, data.summary or {}
    rate = summary.get("images_per_s")
    cards = [
        ("images", _num(counts["images"]), ""),
        ("labelled", _num(counts["ok"]), ""),
        ("errors", _num(counts["errors"]), " bad" if counts["errors"] else ""),
        ("segments", _num(counts["segments"]), ""),
        ("images/s", _num(rate, 2) if rate else "n/a", ""),
    ]
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card{extra}"><b>{value}</b><span>{name}</span></div>'
            for name, value, extra in cards
        )
        + "</div>"
    )


def _hbar(items: list[tuple[str, float, str, str]], width: int = 760) -> str:
    """A horizontal bar chart as SVG: rows of (label, value, colour, text shown after the bar)."""
    if not items:
        return '<p class="note">nothing to show</p>'
    top = max(v for _, v, _, _ in items) or 1.0
    row, left = 22, 170
    bars = []
    for i, (label, value, color, text) in enumerate(items):
        y = i * row
        length = max(1.0, (width - left - 230) * value / top)  # room for the text after the longest bar
        bars.append(
            f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{left}" y="{y + 4}" width="{length:.1f}" height="14" rx="2" fill="{color}"/>'
            f'<text x="{left + length + 6:.1f}" y="{y + 15}" fill="#59636e">{escape(text)}</text>'
        )
    height = row * len(items) + 4
    return (
        f'<svg role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-size="12" font-family="system-ui,sans-serif">{"".join(bars)}</svg>'
    )


def _throughput(data) -> str:
    summary = data.summary or {}
    wall, busy = summary.get("wall_s") or {}, summary.get("stage_busy_s") or {}
    stages = [(name, float(seconds), "#6e7781", f"{seconds:.2f} s") for name, seconds in busy.items()]
    pairs = [
        ("wall time", f"{wall['total']:.1f} s (setup {wall.get('setup', 0):.1f} s)" if wall else None),
        ("shards", f"{summary.get('shards_written')} written, {summary.get('shards_skipped')} already done"
         if summary else None),
        ("per image", "p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max:.0f} ms".format(**data.elapsed_ms)
         if len(data.elapsed_ms) == 3 else None),
    ]  # fmt: skip
    return (
        f"<section><h2>Throughput</h2><table>{_rows(pairs)}</table>"
        f'<h3 style="font-size:14px">Busy time per stage (summed over workers)</h3>{_hbar(stages)}</section>'
    )


def _errors(data) -> str:
    if not data.errors:
        return "<section><h2>Errors</h2><p>No image failed.</p></section>"
    body = []
    for e in data.errors:
        examples = "".join(
            f"<li><code>{escape(x['source'])}</code> ({escape(x['image_id'][:12])}): "
            f"{escape(x['error'] or '')}</li>"
            for x in e["examples"]
        )
        body.append(
            f"<tr><td><b>{escape(e['reason'])}</b></td><td class=num>{_num(e['count'])}</td>"
            f"<td><ul style='margin:0;padding-left:18px'>{examples}</ul></td></tr>"
        )
    return (
        "<section><h2>Errors by reason</h2><table><tr><th>reason</th><th>images</th><th>examples</th></tr>"
        + "".join(body)
        + "</table></section>"
    )


def _classes(data) -> str:
    items = [
        (c["label"], float(c["images"]), hex_color(class_color(c["label"])),
         f"{c['images']:,} images, mean area {100 * c['mean_area']:.1f}%")
        for c in data.classes
    ]  # fmt: skip
    rows = "".join(
        f"<tr><td>{_swatch(c['label'])}<span class=label>{escape(c['label'])}</span></td>"
        f"<td class=num data-images>{c['images']}</td><td class=num>{100 * c['mean_area']:.1f}%</td>"
        f"<td class=num>{_num(c['pixels'])}</td></tr>"
        for c in data.classes
    )
    more = (
        f'<p class="note">and {data.classes_left_out} less frequent classes</p>'
        if data.classes_left_out
        else ""
    )
    absent = len(data.vocabulary) - len(data.classes) - data.classes_left_out
    note = f'<p class="note">{absent} classes of the vocabulary appear in no image.</p>' if absent > 0 else ""
    return (
        f"<section id=classes><h2>Classes: images per class</h2>{_hbar(items)}{more}{note}"
        "<table class=classes><tr><th>class</th><th>images</th><th>mean area</th><th>pixels</th></tr>"
        f"{rows}</table></section>"
    )


def _histogram(data) -> str:
    counts = data.histogram
    if not any(counts):
        return ""
    width, height, bottom = 560, 160, 24
    step = width / len(counts)
    top = max(counts)
    bars = []
    for i, n in enumerate(counts):
        h = (height - bottom - 6) * n / top
        bars.append(
            f'<rect x="{i * step + 1:.1f}" y="{height - bottom - h:.1f}" width="{step - 2:.1f}" '
            f'height="{h:.1f}" fill="#0969da"><title>{i / len(counts):.2f}-{(i + 1) / len(counts):.2f}: '
            f"{n} segments</title></rect>"
        )
    ticks = "".join(
        f'<text x="{x * width:.0f}" y="{height - 6}" text-anchor="{a}">{x:.0%}</text>'
        for x, a in ((0, "start"), (0.5, "middle"), (1, "end"))
    )
    return (
        "<section><h2>Area fraction of segments</h2>"
        f'<svg role="img" width="{width}" height="{height}" font-size="11" fill="#59636e">'
        f'{"".join(bars)}{ticks}</svg><p class="note">How much of its image each segment covers '
        "(one segment = one class in one image).</p></section>"
    )


def _figure(thumb) -> str:
    caption = ", ".join(f"{escape(label)} {100 * f:.0f}%" for label, f in thumb.classes[:4])
    if thumb.data_uri is None:
        picture = f'<div class="missing">original not readable: {escape(thumb.problem or "")}</div>'
    else:
        picture = f'<img src="{thumb.data_uri}" alt="{escape(thumb.image_id)}" loading="lazy">'
    return (
        f"<figure>{picture}<figcaption><code>{escape(thumb.source)}</code><br>{caption}</figcaption></figure>"
    )


def _gallery(data) -> str:
    if not data.gallery:
        return ""
    blocks = "".join(
        f'<div class="cls"><h3>{_swatch(label)}{escape(label)}</h3>'
        f"{''.join(_figure(t) for t in thumbs)}</div>"
        for label, thumbs in data.gallery
    )
    return f'<section><h2>Examples per class</h2><div class="gallery">{blocks}</div></section>'


def render(data) -> str:
    """The page of ``data`` (a ``pipeline.results.report.ReportData``) as one HTML string."""
    title = f"ebseg report: {data.uri}"
    parts = [_cards(data), _identity(data), _throughput(data), _errors(data), _classes(data),
             _histogram(data), _gallery(data)]  # fmt: skip
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>ebseg labelling report</h1><p class="sub">{escape(data.uri)}</p>{"".join(parts)}'
        "</main></body></html>\n"
    )
