"""Printing query results: an aligned text table for people, CSV and JSON for programs.

Cells are made printable the same way in every format: bytes (label-map PNGs) become ``<N bytes>`` in a table
and base64 in CSV / JSON, lists and structs (segments, bboxes) become JSON text in a table or CSV.
"""

from __future__ import annotations

import base64
import csv
import datetime
import json
import math
from typing import Any, TextIO

import pyarrow as pa

FORMATS = ("table", "csv", "json")
MAX_CELL = 48  # characters of a table cell before it is cut with "..."


def _plain(value: Any) -> Any:
    """A JSON-ready copy of one cell."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime.date | datetime.time | datetime.datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _text(value: Any, *, table: bool) -> str:
    if value is None:
        return "" if not table else "NULL"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>" if table else base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict | list | tuple):
        return json.dumps(_plain(value), separators=(",", ":"))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _cut(text: str) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def write_table(result: pa.Table, out: TextIO, *, max_rows: int | None = 100) -> None:
    """Columns aligned under their names, numbers right-aligned; ``max_rows`` rows, then a count."""
    names = result.column_names
    rows = result.slice(0, max_rows).to_pylist() if max_rows is not None else result.to_pylist()
    cells = [[_cut(_text(row[n], table=True)) for n in names] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) for t in result.schema.types]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out.write(line(names) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write(line(row) + "\n")
    shown, total = len(rows), result.num_rows
    more = f"; {total - shown} more not shown (use --format csv or json, or LIMIT)" if shown < total else ""
    out.write(f"({total} row{'s' if total != 1 else ''}{more})\n")


def write_csv(result: pa.Table, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.column_names)
    for row in result.to_pylist():
        writer.writerow([_text(row[n], table=False) for n in result.column_names])


def write_json(result: pa.Table, out: TextIO) -> None:
    """One JSON array of row objects."""
    json.dump([_plain(row) for row in result.to_pylist()], out, indent=1)
    out.write("\n")


def write_result(result: pa.Table, out: TextIO, fmt: str, *, max_rows: int | None = 100) -> None:
    """``max_rows`` applies to the table only: CSV and JSON are for programs and print every row."""
    if fmt == "table":
        write_table(result, out, max_rows=max_rows)
    elif fmt == "csv":
        write_csv(result, out)
    elif fmt == "json":
        write_json(result, out)
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
