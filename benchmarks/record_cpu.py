"""CPU time per image outside the model, stage by stage, before and after the issue-12 changes.

Usage::

    python benchmarks/record_cpu.py --sizes 1024x768 4000x3000 --repeats 7 [--json]

Inputs: ``skimage.data.coffee()`` resized to each WxH and saved as a JPEG (quality 90) in a temporary
folder; its label map is the demo model's on that photo with the ADE-150 vocabulary, at the original size
(computed once, untimed). Stages, each timed per image on one thread, before and after, interleaved
(before, after, before, after, ...), median of --repeats:

- read: the JPEG file's bytes from local disk (the same code before and after);
- decode: full decode (before) / draft-mode decode for JPEGs over twice the model input (after);
- resize: PIL bilinear to the model input (640 short side, long side at most 2560) of what decode gave;
- input prep: the uint8 copy and [3, h, w] view ``Segmenter`` makes of its input;
- png: the label map as a PNG, Pillow at compress_level 1 (before) / ``ebseg.data.labels.encode_stored``;
- segments: pycocotools per class (before) / ``pipeline.label.records.segments`` (after);
- parquet: ``records_table`` + ``parquet_bytes`` of --rows records, divided by --rows (the same code).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.model_throughput import cpu_model
from ebseg.data.labels import encode_stored
from ebseg.predictor import Segmenter
from ebseg.resize import resize_image, resized_shape
from ebseg.vocab import Vocabulary
from ebseg.zoo import load_model
from pipeline.label import records
from pipeline.label.decode import DecodeImages, _decode, decode_image

SHORT_SIDE, MAX_LONG_SIDE = 640, 2560
PROVENANCE = records.Provenance("demo", "ade150", "bench")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["1024x768", "4000x3000"], help="WxH of the JPEGs")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", type=int, default=16, help="records per Parquet file")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared machine, every stage "
        "being single-threaded)",
    )
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def segments_before(labels: np.ndarray, scores: np.ndarray, names) -> list[dict]:
    """The segments encoder this replaced: one binary mask and one pycocotools call per class."""
    height, width = labels.shape
    counts = np.bincount(labels.ravel(), minlength=len(names))
    out = []
    for class_id in np.flatnonzero(counts):
        if class_id == np.iinfo(labels.dtype).max:
            continue
        mask = labels == class_id
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        x, y = int(cols[0]), int(rows[0])
        area = int(counts[class_id])
        out.append(
            {
                "class_id": int(class_id),
                "label": names[class_id],
                "area": area,
                "area_fraction": area / (height * width),
                "score": float(scores[class_id]),
                "bbox": [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1],
                "rle": rle["counts"].decode("ascii"),
            }
        )
    return out


def png_before(stored: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def stages(path: str, labels: np.ndarray, scores: np.ndarray, names, after: bool, rows: int, clock) -> dict:
    """Run every stage once; -> {stage: ms}."""
    ms, t = {}, clock()

    def lap(name):
        nonlocal t
        now = clock()
        ms[name] = (now - t) * 1000
        t = now

    with open(path, "rb") as f:
        data = f.read()
    lap("read")
    if after:
        step = DecodeImages(SHORT_SIDE, MAX_LONG_SIDE)
        image, height, width = _decode(data, 1 << 40, step._model_shape)
    else:
        image = decode_image(data, max_pixels=1 << 40)
        height, width = image.shape[:2]
    lap("decode")
    image = resize_image(image, resized_shape(height, width, SHORT_SIDE, MAX_LONG_SIDE))
    lap("resize")
    torch.from_numpy(np.array(image)).permute(2, 0, 1)
    lap("input_prep")
    png = encode_stored(labels, compress_level=1) if after else png_before(labels)
    lap("png")
    segs = records.segments(labels, scores, names) if after else segments_before(labels, scores, names)
    lap("segments")
    row = {
        "image_id": "x", "source_uri": path, "shard_id": "s", "member": None, "width": width,
        "height": height, "status": "ok", "error": None, "label_map": png, "segments": segs,
        "model_id": "demo", "vocabulary_id": "ade150", "run_id": "bench", "elapsed_ms": 1.0,
    }  # fmt: skip
    t = clock()
    records.parquet_bytes(records.records_table([row] * rows))
    ms["parquet"] = (clock() - t) * 1000 / rows
    ms["total"] = sum(ms.values())
    return ms


def main(argv=None) -> None:
    args = parse_args(argv)
    from skimage import data

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocabulary = Vocabulary.from_benchmark("ade150")
    segmenter = Segmenter(load_model("demo"), vocabulary, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            photo = np.asarray(Image.fromarray(data.coffee()).resize((width, height), Image.BILINEAR))
            path = os.path.join(tmp, f"{size}.jpg")
            Image.fromarray(photo).save(path, quality=90)
            [prediction] = segmenter.predict([photo])
            labels = records.to_storage(prediction.label_map, len(vocabulary))
            times = {"before": [], "after": []}
            for _ in range(args.repeats):
                for when in ("before", "after"):
                    times[when].append(
                        stages(
                            path,
                            labels,
                            prediction.scores,
                            vocabulary.names,
                            when == "after",
                            args.rows,
                            clock,
                        )
                    )
            result = {
                "size": size,
                "classes_present": int((prediction.areas > 0).sum()),
                "repeats": args.repeats,
            }
            for when, runs in times.items():
                result[when] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
            result.update(cpu=cpu_model(), load_avg_1min=os.getloadavg()[0], file_bytes=os.path.getsize(path))
            if args.json:
                print(json.dumps(result))
                continue
            print(
                f"{size} JPEG ({result['file_bytes']} bytes), {result['classes_present']} classes, "
                f"median of {args.repeats} (ms), load {result['load_avg_1min']:.1f}, {result['cpu']}"
            )
            for stage in result["before"]:
                before, after = result["before"][stage], result["after"][stage]
                print(f"  {stage:<11} before {before:8.2f}  after {after:8.2f}")


if __name__ == "__main__":
    main()
