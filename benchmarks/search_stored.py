"""Search over a stored output: ``LabelOutput.search`` (embeddings, areas and boxes only) against scoring the
fully decoded proposals (masks included), per image, interleaved.

Usage::

    python benchmarks/search_stored.py OUTPUT [--text "a cat"] [--repeats 5]

OUTPUT is any labelling output with proposals (``ebseg label ... --proposals``). Both paths must rank the
same regions (``tests/pipeline/results/test_query_proposals.py`` checks it bit for bit); this times them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.label.proposal_records import read_proposals
from pipeline.results.query import open_output


def decoded_search(output, text: str) -> list:
    """The path search took before it read only embeddings: every part decoded whole, masks included."""
    found = []
    for uri in output.proposal_files:
        decoded = read_proposals(output.sql("SELECT * FROM read_parquet($1)", [uri]))
        items = ((image_id, proposals) for image_id, (proposals, _) in decoded.items())
        found += output.text_scorer().search(items, text)
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--text", default="a cat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with open_output(args.output) as output:
        images = output.sql("SELECT count(*) FROM proposals WHERE query = 0").column(0)[0].as_py()
        output.search(args.text, limit=1)  # loads the text tower and encodes the text once
        decoded, stored = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            decoded_search(output, args.text)
            decoded.append(time.perf_counter() - started)
            started = time.perf_counter()
            output.search(args.text, limit=10)
            stored.append(time.perf_counter() - started)
    result = {
        "images": images,
        "decoded_ms_per_image": 1000 * statistics.median(decoded) / images,
        "search_ms_per_image": 1000 * statistics.median(stored) / images,
    }
    print(
        f"{images} images, median of {args.repeats}: decoded proposals {result['decoded_ms_per_image']:.2f} "
        f"ms/image, LabelOutput.search {result['search_ms_per_image']:.2f} ms/image "
        f"({result['decoded_ms_per_image'] / result['search_ms_per_image']:.1f}x)"
    )
    return result


if __name__ == "__main__":
    main()
