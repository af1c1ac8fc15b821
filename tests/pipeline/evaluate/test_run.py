"""Evaluation on Ray Data against a direct loop over the same pairs, on local disk and on S3."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from ebseg import checkpoint
from ebseg.build import build_ebseg
from ebseg.config import get_config
from ebseg.data.shapes import SHAPES_CLASSES, shapes_vocabulary, write_shapes
from ebseg.metrics import SegmentationMetric
from ebseg.predictor import Segmenter
from ebseg.vocab import Vocabulary
from ebseg.zoo import SegmenterSettings, load_model
from pipeline import storage
from pipeline.evaluate.job import EvalJob
from pipeline.evaluate.run import ScoreBatch, decode_pairs, metrics_record, run
from pipeline.pairs import iter_pairs

SIZE = 96  # shapes images; the model resizes them to its short side 64 and labels come back at 96
COUNT = 5


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    """A tiny-preset checkpoint with a small inference scale (fast on CPU)."""
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.manual_seed(0)
    checkpoint.save(build_ebseg(get_config("tiny").replace(short_side=64)), str(path))
    return str(path)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shapes") / "val")
    write_shapes(root, count=COUNT, seed=3, size=SIZE, layout="folder")
    return root


def direct_metrics(model_uri: str, data: str, vocabulary: Vocabulary, *, limit=None, batch_size=2) -> dict:
    """The same evaluation without Ray: read pairs in order, predict, accumulate."""
    segmenter = Segmenter(load_model(model_uri), vocabulary, batch_size=batch_size, device="cpu")
    metric = SegmentationMetric(len(vocabulary))
    pairs = list(iter_pairs(data))[:limit]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        for (_, _, label), prediction in zip(chunk, segmenter.predict([image for _, image, _ in chunk])):
            metric.update(prediction.label_map, label)
    return metrics_record(metric, vocabulary)


def assert_same_metrics(result: dict, expected: dict) -> None:
    for key, value in expected.items():
        if key == "per_class":
            for ours, theirs in zip(result[key], value):
                assert (
                    ours["gt_pixels"] == theirs["gt_pixels"] and ours["pred_pixels"] == theirs["pred_pixels"]
                )
                assert ours["iou"] == pytest.approx(theirs["iou"]), ours["name"]
        elif isinstance(value, float):
            assert result[key] == pytest.approx(value), key
        else:
            assert result[key] == value, key


def test_local_folder_metrics_match_a_direct_computation(ray_local, tiny_ckpt, local_data, tmp_path):
    out = str(tmp_path / "eval")
    job = EvalJob(data=local_data, output=out, model=tiny_ckpt, batch_size=2, actors=1)
    result = run(job)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written == result
    assert result["images"] == COUNT and result["pixels"] == COUNT * SIZE * SIZE - result_ignored(local_data)
    assert [c["name"] for c in result["per_class"]] == list(SHAPES_CLASSES)  # the data's vocabulary.json
    assert result["vocabulary_id"] == shapes_vocabulary().id and result["model_id"].startswith("tiny:sha256-")
    assert result["seen_mIoU"] is None  # no shapes class is a COCO-Stuff class: undefined, written as null
    assert result["unseen_mIoU"] == pytest.approx(result["mIoU"])
    expected = direct_metrics(tiny_ckpt, local_data, shapes_vocabulary())
    assert expected["mIoU"] is not None and 0 < expected["classes_evaluated"] <= len(SHAPES_CLASSES)
    assert_same_metrics(result, expected)


def result_ignored(data: str) -> int:
    """Ignored label pixels in the set (they count nowhere)."""
    return sum(int((label == -1).sum()) for _, _, label in iter_pairs(data))


def test_s3_data_model_and_output_with_a_limit(ray_local, s3_server, tiny_ckpt):
    bucket = s3_server.bucket("eval")
    data, model, out = f"s3://{bucket}/val", f"s3://{bucket}/models/tiny.pt", f"s3://{bucket}/runs/e1"
    write_shapes(data, count=COUNT, seed=4, size=SIZE, layout="folder")
    s3_server.filesystem().put_file(tiny_ckpt, model.removeprefix("s3://"))
    vocabulary = Vocabulary(list(SHAPES_CLASSES), name="shapes-explicit")
    result = run(EvalJob(data=data, output=out, model=model, vocabulary=vocabulary, batch_size=2, limit=3))
    _, path = storage.url_to_fs(f"{out}/metrics.json")
    assert storage.read_json(s3_server.filesystem(), path) == result
    assert result["images"] == 3 and result["limit"] == 3 and result["vocabulary"] == "shapes-explicit"
    assert_same_metrics(result, direct_metrics(tiny_ckpt, data, vocabulary, limit=3))


def test_score_batch_without_ray(tiny_ckpt, local_data):
    """The actor's callable on a hand-made batch gives the direct confusion matrix, sparse."""
    pairs = list(iter_pairs(local_data))[:2]
    fs, root = storage.url_to_fs(local_data)
    batch = {
        "image_id": np.array([i for i, _, _ in pairs], dtype=object),
        "image": np.array([fs.cat_file(f"{root}/images/{i}.png") for i, _, _ in pairs], dtype=object),
        "label": np.array([fs.cat_file(f"{root}/annotations/{i}.png") for i, _, _ in pairs], dtype=object),
    }
    decoded = decode_pairs(batch)
    assert np.array_equal(decoded["label"][1], pairs[1][2])
    vocabulary = shapes_vocabulary()
    table = ScoreBatch(SegmenterSettings(tiny_ckpt, vocabulary, batch_size=2))(decoded).to_pylist()
    [row] = table
    k = len(vocabulary)
    dense = np.zeros(k * k, np.int64)
    dense[row["cells"]] = row["counts"]
    metric = SegmentationMetric(k)
    segmenter = Segmenter(load_model(tiny_ckpt), vocabulary, device="cpu")
    for (_, _, label), prediction in zip(pairs, segmenter.predict([image for _, image, _ in pairs])):
        metric.update(prediction.label_map, label)
    assert row["images"] == 2 and row["image_ids"] == [p[0] for p in pairs]
    assert np.array_equal(dense.reshape(k, k), metric.confusion)


def test_errors_name_the_problem(ray_local, tiny_ckpt, local_data, tmp_path):
    bare = tmp_path / "bare"
    write_shapes(str(bare), count=2, seed=0, size=SIZE)
    (bare / "vocabulary.json").unlink()
    with pytest.raises(ValueError, match=r"vocabulary\.json does not exist"):
        run(EvalJob(data=str(bare), output=str(tmp_path / "o1"), model=tiny_ckpt))
    # A vocabulary smaller than the label values: the failing image is named.
    with pytest.raises(Exception, match=r"\d{6}: label holds class id"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(EvalJob(data=local_data, output=str(tmp_path / "o2"), model=tiny_ckpt, vocabulary="cat,dog"))
    assert not (tmp_path / "o2" / "metrics.json").exists()
    for bad in ({"batch_size": 0}, {"limit": 0}, {"actors": True}, {"amp_dtype": "fp8"}):
        with pytest.raises(ValueError, match=r"eval\.\w+: "):  # the field named, as the CLI names it
            EvalJob(data=local_data, output=str(tmp_path), **bad)
