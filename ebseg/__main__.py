"""``python -m ebseg segment``: segment a few local images in-process, without Ray.

The ``ebseg`` command (``jobs/cli.py``: label, train, eval, submit, query, show, export on Ray) is the
user-facing CLI; this entry point needs only the model library, which makes it the quickest check that
``ebseg/`` and its weights work on a machine, and prints what it found.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ebseg.predictor import Segmenter
from ebseg.vocab import Vocabulary
from ebseg.zoo import describe_model, load_model


def _load_images(paths: list[str]) -> list[tuple[str, np.ndarray]]:
    if paths:
        return [(p, np.asarray(Image.open(p).convert("RGB"))) for p in paths]
    try:
        from skimage import data
    except ImportError:
        raise SystemExit(
            "no IMAGE given and scikit-image (the bundled sample photos) is not installed"
        ) from None
    return [("skimage:astronaut", data.astronaut()), ("skimage:coffee", data.coffee())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ebseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment images and print the classes found")
    seg.add_argument("images", nargs="*", help="image files (default: two sample photos)")
    seg.add_argument("--model", default="tiny", help="preset (tiny/base/large) or checkpoint path/URI")
    seg.add_argument("--vocabulary", default="ade150", help="benchmark name, file, or 'cat,dog,tree'")
    seg.add_argument("--short-side", type=int, default=None, help="default: the model's own (640 for base)")
    seg.add_argument("--device", default=None)
    seg.add_argument("--out", default=None, help="folder to write <name>.png label maps into")
    args = parser.parse_args(argv)

    try:
        vocab = Vocabulary.parse(args.vocabulary)
    except (ValueError, OSError) as exc:
        parser.error(f"--vocabulary: {exc}")
    describe_model(args.model)  # says so when the weights are random
    model = load_model(args.model)
    short_side = "model" if args.short_side is None else args.short_side
    segmenter = Segmenter(model, vocab, short_side=short_side, device=args.device)
    images = _load_images(args.images)
    start = time.perf_counter()
    preds = segmenter.predict([im for _, im in images])
    elapsed = time.perf_counter() - start
    for (name, image), pred in zip(images, preds):
        order = np.argsort(-pred.areas)
        top = [
            f"{vocab.names[c]} {pred.areas[c] / pred.label_map.size:.0%}" for c in order[:5] if pred.areas[c]
        ]
        print(f"{name} {image.shape[1]}x{image.shape[0]}: {', '.join(top)}")
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = Path(name.replace(":", "_")).stem
            dtype = np.uint8 if len(vocab) < 256 else np.uint16
            Image.fromarray(pred.label_map.astype(dtype)).save(out / f"{stem}.png")
    print(f"{len(images)} images in {elapsed:.1f}s on {segmenter.device} ({model.config.name}, {vocab.id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
