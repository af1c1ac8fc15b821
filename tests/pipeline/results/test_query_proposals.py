"""An output labelled with ``--proposals``: the ``proposals`` view, ``LabelOutput.search`` for class names
the labelling vocabulary left out, and ``show`` drawing a text's region."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.label.proposal_records import NoProposalsError, read_proposals
from pipeline.results.query import open_output
from pipeline.results.show import render_overlay
from tests.pipeline.results.searchable_support import COUNT, LEFT_OUT, file_name

# `searchable` (tests/conftest.py, one labelling per session): (output with proposals, output without,
# image file name -> classes present).


def test_proposals_view_has_a_row_per_image_and_query_with_usable_embeddings(searchable):
    out, _, _ = searchable
    with open_output(out) as output:
        assert output.has_proposals
        rows = output.sql(
            "SELECT count(*) AS n, count(DISTINCT image_id) AS images, max(query) + 1 AS q, "
            "min(area) AS lo, max(area) AS hi, min(len(emb_d)) AS d FROM proposals"
        ).to_pylist()[0]
        assert rows["images"] == COUNT and rows["n"] == COUNT * rows["q"]
        assert 0.0 <= rows["lo"] <= rows["hi"] <= 1.0 and rows["hi"] > 0
        # DuckDB's list functions work on the embeddings as they come (FLOAT[]).
        # (B is a unit vector for every query; D is zero for a region too small for CLIP's feature grid.)
        sims = output.sql("SELECT list_cosine_similarity(emb_b, emb_b) AS s FROM proposals")
        assert np.allclose(sims.column("s").to_numpy(), 1.0, atol=1e-3)
        top = output.sql(
            "SELECT image_id, query FROM proposals ORDER BY list_cosine_similarity(emb_b, $1) DESC LIMIT 3",
            [output.sql("SELECT emb_b FROM proposals LIMIT 1").column(0)[0].as_py()],
        )
        assert top.num_rows == 3
        boxes = output.sql("SELECT bbox, width, height FROM proposals WHERE area > 0").to_pylist()
        for row in boxes:
            x, y, w, h = row["bbox"]
            assert 0 <= x < x + w <= row["width"] and 0 <= y < y + h <= row["height"]


@pytest.mark.parametrize("text", LEFT_OUT)
def test_search_ranks_images_holding_a_left_out_class_first(searchable, text):
    out, _, truth = searchable
    assert 0 < sum(text in classes for classes in truth.values()) < COUNT
    with open_output(out) as output:
        assert not output.sql("SELECT * FROM segments WHERE label = $1", [text]).num_rows
        found = output.search(text, limit=5, format="arrow").to_pylist()
        everything = output.search(text, limit=None, format="arrow").to_pylist()
        # Each hit's area and box are its region's row in the proposals view.
        for r in found:
            [row] = output.sql(
                'SELECT area, bbox FROM proposals WHERE image_id = $1 AND "query" = $2',
                [r["image_id"], r["query"]],
            ).to_pylist()
            assert row["bbox"] == r["bbox"] and row["area"] == pytest.approx(r["area"])
    assert len(found) == 5 and len(everything) == COUNT
    assert [r["image_id"] for r in everything[:5]] == [r["image_id"] for r in found]
    assert [r["score"] for r in everything] == sorted((r["score"] for r in everything), reverse=True)
    precision = np.mean([text in truth[file_name(r["source_uri"])] for r in found])
    assert precision >= 0.8, found
    for r in found:
        assert 0 < r["area"] <= 1 and 0 <= r["score"] <= 1 and len(r["bbox"]) == 4


@pytest.mark.parametrize("min_area", [0.0, 0.05])
def test_search_without_masks_ranks_as_the_decoded_proposals_do(searchable, min_area):
    # LabelOutput.search reads embeddings, areas and boxes only; the decoded proposals (masks included,
    # TextScorer.search over read_proposals) must give the same regions, scores and areas, bit for bit.
    out, _, _ = searchable
    with open_output(out) as output:
        found = output.search("yellow star", min_area=min_area, limit=None, format="arrow").to_pylist()
        decoded = {}
        for uri in output.proposal_files:
            decoded.update(read_proposals(output.sql("SELECT * FROM read_parquet($1)", [uri])))
        items = [(image_id, proposals) for image_id, (proposals, _) in decoded.items()]
        ranked = output.text_scorer().search(items, "yellow star", min_area=min_area)
    assert found and [(r["image_id"], r["query"]) for r in found] == [(k, r.query) for k, r in ranked]
    assert [r["score"] for r in found] == [np.float32(r.score) for _, r in ranked]
    assert [r["area"] for r in found] == [np.float32(r.area) for _, r in ranked]


def test_min_area_drops_small_regions(searchable):
    out, _, _ = searchable
    with open_output(out) as output:
        large = output.search("cyan cross", min_area=0.2, limit=None, format="arrow").to_pylist()
        assert all(r["area"] >= 0.2 for r in large)
        assert not output.search("cyan cross", min_area=1.0, limit=None, format="arrow").num_rows


def test_show_draws_the_region_of_a_text(searchable, tmp_path):
    out, _, _ = searchable
    with open_output(out) as output:
        best = output.search("yellow star", limit=1, format="arrow").to_pylist()[0]
    drawn = render_overlay(out, best["image_id"], str(tmp_path / "star.png"), text="yellow star")
    assert drawn["classes"] == ["yellow star"] and drawn["score"] == pytest.approx(best["score"])
    assert 0 < drawn["area"] <= 1
    picture = np.asarray(Image.open(tmp_path / "star.png").convert("RGB"))
    assert picture.shape[0] == drawn["canvas"][1] and picture.shape[1] == drawn["canvas"][0]


def test_an_output_without_proposals_is_refused_with_the_flag_named(searchable):
    _, plain, _ = searchable
    with open_output(plain) as output:
        assert not output.has_proposals
        with pytest.raises(NoProposalsError, match="--proposals"):
            output.search("yellow star")
