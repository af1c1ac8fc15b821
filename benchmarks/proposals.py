"""Stored proposals (``ebseg.proposals``): bytes per image and label agreement with a fresh run, per encoding.

For each image: propose with one vocabulary, encode, decode, label with another vocabulary, and compare the
label map with a fresh ``predict`` under that vocabulary. Bytes are after zstd (level 3), as Parquet would
store a binary column. Usage::

    python benchmarks/proposals.py --model demo           # shapes images, the shapes classes
    python benchmarks/proposals.py --model tiny --photos  # skimage photos (random weights: mechanics)
    python benchmarks/proposals.py --speed --model base   # relabel vs label per image, random weights
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import pyarrow as pa
import torch

from ebseg.build import build_ebseg
from ebseg.data.shapes import generate, shapes_vocabulary
from ebseg.predictor import Segmenter
from ebseg.proposals import (
    DEFAULT_ENCODING,
    EMBEDDING_ENCODINGS,
    MASK_ENCODINGS,
    Proposals,
    decode_embeddings,
    decode_masks,
    encode_embeddings,
    encode_masks,
)
from ebseg.vocab import Vocabulary
from ebseg.zoo import load_model


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]


def _zstd_bytes(array: np.ndarray) -> int:
    return len(pa.compress(np.ascontiguousarray(array).tobytes(), codec="zstd", asbytes=True))


def speed(model_name: str, repeats: int, size: tuple[int, int]) -> None:
    """Labelling (forward + labels) vs relabelling (decode stored proposals + labels), interleaved, one
    photo of ``size`` (the issue's case: 640x853, the model input itself; 480x640 is resized to that input
    and its labels back), the ADE-150 vocabulary."""
    from skimage import data
    from skimage.transform import resize

    photo = (resize(data.astronaut(), size) * 255).astype(np.uint8)
    seg = Segmenter(build_ebseg(model_name), Vocabulary.from_benchmark("ade150"), device="cpu", batch_size=1)
    [proposal] = seg.propose([photo])
    masks, embeddings = (
        encode(t, enc)
        for encode, t, enc in zip(
            (encode_masks, encode_embeddings), (proposal.masks, proposal.embeddings), DEFAULT_ENCODING
        )
    )
    seg.predict([photo])  # warm-up
    label_s, relabel_s, grid_s = [], [], []
    grid = tuple(-(-side // 4) for side in proposal.input_size)
    for _ in range(repeats):
        started = time.perf_counter()
        seg.predict([photo])
        label_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        stored = Proposals(
            decode_masks(masks, DEFAULT_ENCODING[0]),
            decode_embeddings(embeddings, DEFAULT_ENCODING[1]),
            proposal.input_size,
        )
        seg.label([stored], [photo.shape[:2]])
        relabel_s.append(time.perf_counter() - started)
        # ``ebseg relabel --resolution grid``: labels on the stride-4 grid of the model input.
        started = time.perf_counter()
        seg.label([stored], [grid])
        grid_s.append(time.perf_counter() - started)
    lab, rel, on_grid = (float(np.median(t)) for t in (label_s, relabel_s, grid_s))
    print(
        f"{model_name}, {size[0]}x{size[1]} photo (input {proposal.input_size}), K=150, "
        f"{torch.get_num_threads()} threads, "
        f"median of {repeats}: label {lab:.2f} s/image, relabel {rel:.3f} s/image, {lab / rel:.0f}x; "
        f"relabel on the grid {on_grid:.3f} s/image, {lab / on_grid:.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--photos", action="store_true", help="skimage photos instead of shapes images")
    parser.add_argument("--count", type=int, default=8, help="shapes images")
    parser.add_argument("--short-side", type=int, default=None)
    parser.add_argument("--speed", action="store_true", help="relabel vs label time per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--photo-size", default="640x853", help="HxW of the --speed photo (the issue's case)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the preset with random weights (base's sizes without its checkpoint; bytes are a bound: "
        "random logits compress worse than trained ones)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.speed:
        height, width = (int(v) for v in args.photo_size.lower().split("x"))
        speed(args.model, args.repeats, (height, width))
        return
    model = build_ebseg(args.model) if args.random_weights else load_model(args.model)
    full = (
        list(shapes_vocabulary().names)
        if args.model == "demo"
        else list(Vocabulary.from_benchmark("ade150").names)
    )
    first = full[: max(2, len(full) // 2)]
    kwargs = {} if args.short_side is None else {"short_side": args.short_side}
    seg = Segmenter(model, first, device="cpu", **kwargs)
    images = (
        _photos() if args.photos else [generate(i, seed=7, size=(240, 320))[0] for i in range(args.count)]
    )
    sizes = [im.shape[:2] for im in images]
    started = time.perf_counter()
    proposals = seg.propose(images)
    propose_s = (time.perf_counter() - started) / len(images)
    seg.vocabulary = full
    started = time.perf_counter()
    fresh = seg.predict(images)
    predict_s = (time.perf_counter() - started) / len(images)
    q = proposals[0].masks.shape[0]
    print(
        f"model {args.model}, {len(images)} images, Q={q}, D={proposals[0].embeddings.shape[-1]}, "
        f"K={len(full)}; propose {propose_s:.2f} s/image, predict {predict_s:.2f} s/image"
    )
    header = ("masks", "embeddings", "KB/image", "bits/mask value", "agreement mean", "min")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (8, 10, 9, 15, 14, 8))))
    for masks_enc, emb_enc in itertools.product(MASK_ENCODINGS, EMBEDDING_ENCODINGS):
        mask_bytes = emb_bytes = values = 0
        decoded = []
        for p in proposals:
            m = encode_masks(p.masks, masks_enc)
            e = encode_embeddings(p.embeddings, emb_enc)
            mask_bytes += _zstd_bytes(m)
            emb_bytes += _zstd_bytes(e)
            values += m.size
            decoded.append(Proposals(decode_masks(m, masks_enc), decode_embeddings(e, emb_enc), p.input_size))
        started = time.perf_counter()
        relabelled = seg.label(decoded, sizes)
        label_s = (time.perf_counter() - started) / len(images)
        agree = [float((a.label_map == b.label_map).mean()) for a, b in zip(fresh, relabelled)]
        kb = (mask_bytes + emb_bytes) / len(images) / 1024
        print(
            f"{masks_enc:>8} {emb_enc:>10} {kb:9.1f} {8 * mask_bytes / values:15.2f} "
            f"{np.mean(agree):14.6f} {min(agree):8.6f}   (label {label_s * 1000:.0f} ms/image)"
        )


if __name__ == "__main__":
    main()
