"""Text search over stored proposals (``pipeline.results.search``): precision at 5 and 10 per shape class.

The demo model proposes shapes images while labelling with a vocabulary that leaves some classes out; each
shape class name is then searched for, images ranked by their best region's score, and an image counts as
relevant when its ground truth holds the class; AP (average precision over the whole ranking) tells
rankings apart where P@5 and P@10 saturate. Three rankings: the balanced score against the output's
vocabulary (what ``ebseg search`` uses), the balanced score against background alone, and the plain cosine
similarity between embedding D (mask-pooled CLIP features) and the text embedding (max over non-empty
queries). Also: the median IoU of the best region (at the original size) with the class's region in a
relabelling with the full list, over the top 5. Usage::

    python benchmarks/search.py --count 60
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from ebseg.data.shapes import SHAPES_CLASSES, generate
from ebseg.predictor import Segmenter
from ebseg.proposals import Proposals
from ebseg.zoo import load_model, load_text_tower
from pipeline.results.search import TextScorer, region_mask


def cosine_scores(scorer: TextScorer, proposals: Proposals, text: str) -> float:
    """The best cosine similarity of a non-empty query's embedding D with the text's embedding."""
    d = F.normalize(proposals.embeddings[2], dim=-1)
    cos = d @ scorer.text_embedding(text)
    nonempty = proposals.regions().flatten(1).any(1)
    return float(cos[nonempty].max()) if bool(nonempty.any()) else -1.0


def precision(ranked: list[int], truth: np.ndarray, k: int) -> float:
    return float(truth[ranked[:k]].mean())


def average_precision(ranked: list[int], truth: np.ndarray) -> float:
    """Mean of the precision at each relevant image's rank (1.0: every relevant image first)."""
    hits = truth[ranked]
    return float((np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits].mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60, help="shapes images")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--left-out", default="yellow star,cyan cross", help="classes the labelling omits")
    args = parser.parse_args(argv)

    names = list(SHAPES_CLASSES)
    left_out = [n.strip() for n in args.left_out.split(",") if n.strip()]
    model = load_model("demo")
    segmenter = Segmenter(model, [n for n in names if n not in left_out], device="cpu")
    data = [generate(i, seed=args.seed, size=args.size) for i in range(args.count)]
    start = time.perf_counter()
    proposals = segmenter.propose([image for image, _ in data])
    propose_s = time.perf_counter() - start
    relabelled = Segmenter(model, names, device="cpu").label(proposals, [label.shape for _, label in data])

    tower = load_text_tower("demo")
    # Scoring is a few [Q, K] operations per image: one thread, as a search task would run (more threads
    # only add overhead to ops this small, and a lot of it on a loaded machine).
    torch.set_num_threads(1)
    scorers = {"balanced": TextScorer(tower, segmenter.vocabulary), "background only": TextScorer(tower)}
    print(f"{args.count} shapes images, {args.size} px, labelled without {left_out}")
    print(f"propose: {propose_s:.1f} s")
    print("| class | in vocabulary | images with it | method | P@5 | P@10 | AP | top-5 median IoU |")
    print("|---|---|---|---|---|---|---|---|")
    results: dict = {}
    score_s, scored = 0.0, 0
    for k, text in enumerate(names[1:], start=1):
        truth = np.array([bool((label == k).any()) for _, label in data])
        rankings = {}
        for method, scorer in scorers.items():
            scorer.text_embedding(text)  # encoded once per search, not per image: timed apart
            start = time.perf_counter()
            regions = [scorer.best_region(p, text) for p in proposals]
            score_s, scored = score_s + time.perf_counter() - start, scored + len(proposals)
            order = sorted(range(len(regions)), key=lambda i: -(regions[i].score if regions[i] else -1.0))
            ious = []
            for i in order[:5]:
                if regions[i] is None:  # no non-empty region at all
                    continue
                found = region_mask(proposals[i], regions[i].query, data[i][1].shape)
                mine = relabelled[i].label_map == k
                ious.append((found & mine).sum() / max((found | mine).sum(), 1))
            rankings[method] = (order, float(np.median(ious)) if ious else float("nan"))
        cosine = [cosine_scores(scorers["balanced"], p, text) for p in proposals]
        rankings["cosine D"] = (sorted(range(len(cosine)), key=lambda i: -cosine[i]), float("nan"))
        for method, (order, iou) in rankings.items():
            p5, p10 = precision(order, truth, 5), precision(order, truth, 10)
            ap = average_precision(order, truth)
            results[(text, method)] = (p5, p10, ap)
            iou_text = "" if np.isnan(iou) else f"{iou:.2f}"
            in_vocab = "no" if text in left_out else "yes"
            row = [text, in_vocab, str(int(truth.sum())), method, f"{p5:.1f}", f"{p10:.1f}", f"{ap:.2f}"]
            row.append(iou_text)
            print(f"| {' | '.join(row)} |")
    for method in (*scorers, "cosine D"):
        mean5 = np.mean([v[0] for (t, m), v in results.items() if m == method])
        mean10 = np.mean([v[1] for (t, m), v in results.items() if m == method])
        mean_ap = np.mean([v[2] for (t, m), v in results.items() if m == method])
        print(f"mean {method}: P@5 {mean5:.2f}  P@10 {mean10:.2f}  AP {mean_ap:.2f}")
    print(f"best_region: {1000 * score_s / scored:.2f} ms per image and text (text embeddings cached)")
    return results


if __name__ == "__main__":
    main()
