"""Post-processing time per image: the full K x H x W product (before) vs only the classes that can win (now).

Usage::

    python benchmarks/postprocess.py --model demo --vocabularies ade150 ade847 --size 480x640 --repeats 5

For each vocabulary the model runs once on ``skimage.data.astronaut()`` resized to --size (the photo's
original size); the class weights [Q, K] and mask logits [Q, h, w] that ``Segmenter`` hands to its
post-processing are captured, then both implementations run on them, interleaved (old, new, old, new,
...), on --threads torch threads. Reported: the median, min and all times of each, the speed-up of the
medians, and whether label maps, areas and scores agree (labels and areas exactly). The "before"
implementation is the slow reference of ``tests/ebseg/test_postprocess.py``: the code this replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.model_throughput import cpu_model
from ebseg.postprocess import semantic_labels
from ebseg.predictor import Segmenter
from ebseg.vocab import Vocabulary
from ebseg.zoo import load_model
from tests.ebseg.test_postprocess import reference_labels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="tiny or demo (or any --model value of ebseg)")
    p.add_argument("--vocabularies", nargs="+", default=["ade150", "ade847"])
    p.add_argument("--size", default="480x640", help="HxW of the original photo")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each implementation (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one JSON line per vocabulary")
    return p.parse_args(argv)


def capture(model, vocabulary: str, image: np.ndarray):
    """(weights [Q, K], masks [Q, h, w], size) as ``Segmenter.predict`` hands them to its labeller's
    ``_postprocess``."""
    segmenter = Segmenter(model, Vocabulary.from_benchmark(vocabulary), device="cpu")
    captured = []
    segmenter.labeller._postprocess = lambda w, m, size, *_: captured.append((w, m.rows(0, m.shape[1]), size))
    segmenter.predict([image])
    return captured[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    from skimage import data

    height, width = (int(v) for v in args.size.split("x"))
    image = np.asarray(Image.fromarray(data.astronaut()).resize((width, height), Image.BILINEAR))
    torch.manual_seed(0)
    model = load_model(args.model)
    for vocabulary in args.vocabularies:
        weights, masks, size = capture(model, vocabulary, image)
        torch.set_num_threads(args.threads)
        times = {"old": [], "new": []}
        with torch.inference_mode():
            for _ in range(args.repeats):
                start = time.perf_counter()
                old = reference_labels(weights, masks, size)
                times["old"].append(time.perf_counter() - start)
                start = time.perf_counter()
                new = semantic_labels(weights, masks, size)
                times["new"].append(time.perf_counter() - start)
        result = {
            "model": args.model,
            "vocabulary": vocabulary,
            "classes": weights.shape[1],
            "queries": weights.shape[0],
            "size": f"{size[0]}x{size[1]}",
            "mask_size": f"{masks.shape[1]}x{masks.shape[2]}",
            "threads": args.threads,
            "old_median_s": statistics.median(times["old"]),
            "new_median_s": statistics.median(times["new"]),
            "old_min_s": min(times["old"]),
            "new_min_s": min(times["new"]),
            "speedup": statistics.median(times["old"]) / statistics.median(times["new"]),
            "labels_equal": bool(np.array_equal(old[0], new[0].numpy())),
            "areas_equal": bool(np.array_equal(old[2], new[2].numpy())),
            "scores_max_rel_diff": float(
                np.max(np.abs(old[1] - new[1].numpy()) / np.maximum(np.abs(old[1]), 1e-12))
            ),
            "old_s": [round(t, 4) for t in times["old"]],
            "new_s": [round(t, 4) for t in times["new"]],
            "cpu": cpu_model(),
            "load_avg_1min": os.getloadavg()[0],
            "torch": torch.__version__,
        }
        if args.json:
            print(json.dumps(result))
        else:
            r = result
            print(
                f"{args.model} {vocabulary} K={r['classes']} Q={r['queries']} {r['size']} "
                f"threads={args.threads}: "
                f"old {r['old_median_s']:.3f} s, new {r['new_median_s']:.3f} s (medians of {args.repeats}), "
                f"x{r['speedup']:.1f}; labels equal {r['labels_equal']}, areas equal {r['areas_equal']}, "
                f"scores max rel diff {r['scores_max_rel_diff']:.1e}; load {r['load_avg_1min']:.1f}"
            )


if __name__ == "__main__":
    main()
