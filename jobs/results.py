"""The output commands, ``ebseg query`` / ``search`` / ``show`` / ``export`` / ``report``, over a labelling
output (local or a URI)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from jobs.console import CommandError
from jobs.specs import storage_options_from_flags
from jobs.tables import write_result


def _options(args: argparse.Namespace) -> dict[str, Any] | None:
    return storage_options_from_flags(args.storage_options) if args.storage_options else None


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from pipeline.results.query import open_output

    with open_output(args.output, storage_options=_options(args)) as out:
        try:
            result = out.sql(args.sql)
        except duckdb.Error as e:
            raise CommandError(f"query failed: {e}") from e
    write_result(result, sys.stdout, args.format, max_rows=args.max_rows)
    return 0


def _resolve_image_id(output: str, name: str, options: dict[str, Any] | None) -> str:
    """An image id from what a user has at hand: the id, a unique prefix of it, or the input's file name
    (``000003.png``, a full ``source_uri``, or a tar / Parquet member)."""
    from pipeline.results.query import open_output

    sql = (
        "SELECT image_id, source_uri, member FROM images WHERE image_id = $1 OR starts_with(image_id, $1) "
        "OR source_uri = $1 OR ends_with(source_uri, '/' || $1) OR member = $1 ORDER BY image_id LIMIT 5"
    )
    with open_output(output, storage_options=options) as out:
        rows = out.sql(sql, [name]).to_pylist()
    exact = [r["image_id"] for r in rows if r["image_id"] == name]
    if exact or len(rows) == 1:
        return exact[0] if exact else rows[0]["image_id"]
    if not rows:
        listing = f'ebseg query {output} "SELECT image_id, source_uri FROM images"'
        raise CommandError(f"no image {name!r} in {output} (list them: {listing})")
    found = ", ".join(f"{r['image_id']} ({r['member'] or r['source_uri']})" for r in rows)
    raise CommandError(f"{name!r} matches several images: {found}; give the full image_id")


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.results.show import render_overlay

    options = _options(args)
    image_id = _resolve_image_id(args.output, args.image_id, options)
    drawn = render_overlay(
        args.output,
        image_id,
        args.out,
        storage_options=options,
        alpha=args.alpha,
        side_by_side=args.side_by_side,
        text=args.text,
    )
    if args.text is not None and drawn["score"] is None:
        classes = f"no region for {args.text!r}"
    elif args.text is not None:
        classes = f"{args.text!r}: score {drawn['score']:.3f}, {100 * drawn['area']:.1f} % of the image"
    else:
        classes = ", ".join(drawn["classes"]) or "no class"
    layout = "original | overlay | legend" if args.side_by_side else "overlay | legend"
    width, height = drawn["canvas"]
    print(
        f"wrote {args.out} ({drawn['width']}x{drawn['height']} image; {width}x{height}: {layout}): {classes}"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from pipeline.results.query import open_output

    if not args.text.strip():
        raise CommandError("search: TEXT is empty")
    with open_output(args.output, storage_options=_options(args)) as out, contextlib.ExitStack() as stack:
        # Ray only when asked (a small output is searched faster without it) and when there is work: an
        # output without proposals is refused by search() before it needs Ray.
        if args.actors is not None and out.has_proposals:
            from jobs.runs import ray_session

            stack.enter_context(ray_session(args))
        result = out.search(
            args.text, min_area=args.min_area, limit=args.limit, format="arrow", actors=args.actors
        )
    write_result(result, sys.stdout, args.format, max_rows=None)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.results.export import export_coco, export_png
    from pipeline.results.hf import export_hf

    exporter = {"coco": export_coco, "png": export_png, "hf": export_hf}[args.format]
    result = exporter(args.output, args.dest, storage_options=_options(args))
    print(json.dumps(result, default=str))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.results.report import write_report

    path = write_report(args.output, args.out, storage_options=_options(args))
    print(f"report: {path}")
    return 0
