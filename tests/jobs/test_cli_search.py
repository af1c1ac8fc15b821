"""``ebseg search`` and ``ebseg show --text`` from the command line."""

from __future__ import annotations

import json

from jobs.cli import main
from tests.pipeline.results.searchable_support import file_name


def test_search_prints_ranked_images_as_json_and_table(searchable, ray_local, capsys):
    out, _, truth = searchable
    assert main(["search", out, "yellow star", "--limit", "5", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and set(rows[0]) == {"image_id", "query", "score", "area", "bbox", "source_uri"}
    assert sum("yellow star" in truth[file_name(r["source_uri"])] for r in rows) >= 4
    assert main(["search", out, "yellow star", "--limit", "3"]) == 0
    table = capsys.readouterr().out
    assert "image_id" in table and "score" in table and rows[0]["image_id"] in table
    # --actors: scored by CPU actors on Ray (here the session's), the same images in the same order.
    assert main(["search", out, "yellow star", "--limit", "5", "--format", "json", "--actors", "2"]) == 0
    spread = json.loads(capsys.readouterr().out)
    assert [(r["image_id"], r["query"], r["bbox"]) for r in spread] == [
        (r["image_id"], r["query"], r["bbox"]) for r in rows
    ]


def test_show_text_draws_the_best_region_and_refusals_are_one_line(searchable, tmp_path, capsys):
    out, plain, _ = searchable
    assert main(["search", out, "cyan cross", "--limit", "1", "--format", "json"]) == 0
    [best] = json.loads(capsys.readouterr().out)
    drawn = tmp_path / "region.png"
    assert main(["show", out, best["image_id"], "--out", str(drawn), "--text", "cyan cross"]) == 0
    assert drawn.exists() and "'cyan cross': score" in capsys.readouterr().out
    assert main(["search", plain, "yellow star"]) == 1
    err = capsys.readouterr().err
    assert "--proposals" in err and len(err.strip().splitlines()) == 1
    assert main(["search", out, "   "]) == 1
    assert "empty" in capsys.readouterr().err
    for bad in (["--min-area", "1.5"], ["--limit", "0"]):
        try:
            main(["search", out, "star", *bad])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{bad} accepted")
