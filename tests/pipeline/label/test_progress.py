"""The labelling progress line: shards done of those listed, and an ETA only once the total is known."""

from __future__ import annotations

import io

from pipeline.label.progress import Progress


def test_progress_says_listed_so_far_until_the_listing_ends_then_gives_an_eta():
    stream = io.StringIO()
    progress = Progress(total_shards=0, stream=stream, interval=0.0)
    progress.listed(1024, 24, complete=False)
    progress.update(shards=1, images=256)
    assert "25/1024 shards listed so far (24 skipped), 256 images" in progress.line()
    assert "ETA" not in progress.line()  # more shards may come: no total to count down from
    progress.listed(1500, 24, complete=True)
    assert "25/1500 shards (24 skipped)" in progress.line() and ", ETA " in progress.line()
    progress.update(shards=1475)
    assert "ETA" not in progress.line()  # nothing left
    progress.close()
    assert stream.getvalue().splitlines()[-1].startswith("labelling: 1500/1500 shards")
