"""The model stage on hand-made batches, without Ray: results at the original size, errors as rows."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ebseg import checkpoint
from ebseg.build import build_ebseg
from ebseg.config import get_config
from ebseg.predictor import Segmenter, resize_image, resized_shape
from ebseg.vocab import Vocabulary
from ebseg.zoo import SegmenterSettings
from pipeline.label.parts import PartWriter
from pipeline.label.records import Provenance
from pipeline.label.segment import SegmentImages
from pipeline.layout import decode_label_map

SHORT_SIDE = 64
VOCAB = Vocabulary(["person", "coffee cup", "grass", "sky"])


def save_tiny(path, *, seed=0, short_side=SHORT_SIDE) -> str:
    """A tiny-preset checkpoint whose inference scale is ``short_side`` (fast on CPU)."""
    torch.manual_seed(seed)
    checkpoint.save(build_ebseg(get_config("tiny").replace(short_side=short_side)), str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def stage(tiny_ckpt):
    return SegmentImages(SegmenterSettings(tiny_ckpt, VOCAB, batch_size=2))


def decoded_batch(images, *, errors=None):
    """What DecodeImages hands the model stage: images resized to the model input, original sizes."""
    n = len(images)
    column = np.empty(n, dtype=object)
    heights, widths, statuses, messages = [], [], [], []
    for i, image in enumerate(images):
        error = (errors or {}).get(i)
        if error or image is None:
            column[i], h, w = np.zeros((0, 0, 3), np.uint8), 0, 0
        elif image.ndim == 3 and min(image.shape[:2]) > 0:
            h, w = image.shape[:2]
            column[i] = resize_image(image, resized_shape(h, w, SHORT_SIDE, 2560))
        else:  # odd arrays go through as they are
            column[i], (h, w) = image, image.shape[:2]
        heights.append(h)
        widths.append(w)
        statuses.append("error" if error else "ok")
        messages.append(error)
    return {
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "source_uri": np.array([f"/in/{i}.png" for i in range(n)], dtype=object),
        "shard_id": np.array(["files-000000-abc"] * n, dtype=object),
        "member": np.array([None] * n, dtype=object),
        "shard_size": np.full(n, n),
        "row_index": np.arange(n),
        "width": np.array(widths, np.int32),
        "height": np.array(heights, np.int32),
        "status": np.array(statuses, dtype=object),
        "error": np.array(messages, dtype=object),
        "image": column,
        "decode_ms": np.ones(n, np.float32),
    }


def test_results_come_at_the_original_size_and_match_the_segmenter(stage, tiny_ckpt, photos):
    batch = decoded_batch([photos[0], None, photos[2]], errors={1: "decode: not an image"})
    out = stage(batch)
    assert "image" not in out and list(out["status"]) == ["ok", "error", "ok"]
    assert out["error"][1] == "decode: not an image"  # error rows pass through untouched
    assert out["labels"][1].shape == (0, 0) and out["model_ms"][1] == 0
    assert out["scores"].shape == (3, len(VOCAB)) and out["scores"].dtype == np.float32
    assert np.array_equal(out["decode_ms"], batch["decode_ms"])

    # The same result as the Segmenter given the original images, at their own size.
    reference = Segmenter(checkpoint.load(tiny_ckpt), VOCAB)
    for i in (0, 2):
        assert out["labels"][i].dtype == np.uint8 and out["labels"][i].shape == photos[i].shape[:2]
        assert out["model_ms"][i] > 0
        [expected] = reference.predict([photos[i]])
        assert np.array_equal(out["labels"][i], expected.label_map)
        assert np.allclose(out["scores"][i], expected.scores, atol=1e-5)


def test_odd_images_become_model_error_rows(stage, photos):
    gray = photos[2][:, :, 0]  # 2-D: not an (H, W, 3) image
    out = stage(decoded_batch([gray, photos[1], np.zeros((0, 4, 3), np.uint8)]))
    assert list(out["status"]) == ["error", "ok", "error"]
    assert out["error"][0].startswith("model: expected an (H, W, 3) uint8 image")
    assert out["error"][2].startswith("model: ")
    assert out["labels"][1].shape == photos[1].shape[:2]


def test_a_failure_inside_the_model_fails_only_its_image(stage, photos, monkeypatch):
    real = stage.segmenter.predict
    bad_width = resized_shape(*photos[1].shape[:2], SHORT_SIDE, 2560)[1]

    def predict(images, **kwargs):
        if any(im.shape[1] == bad_width for im in images):
            raise RuntimeError("odd size")
        return real(images, **kwargs)

    monkeypatch.setattr(stage.segmenter, "predict", predict)
    out = stage(decoded_batch([photos[0], photos[1], photos[2]]))
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["error"][1] == "model: RuntimeError: odd size"
    assert out["labels"][0].shape == photos[0].shape[:2] and out["labels"][2].shape == photos[2].shape[:2]


def test_encode_in_actor_writes_parts_and_returns_their_metadata(tiny_ckpt, photos, tmp_path):
    writer = PartWriter(str(tmp_path), names=VOCAB.names, provenance=Provenance("m", VOCAB.id, "run-1"))
    stage = SegmentImages(SegmenterSettings(tiny_ckpt, VOCAB), write_with=writer)
    parts = stage(decoded_batch([photos[1], None], errors={1: "read: gone"}))
    assert isinstance(parts, pa.Table) and parts.num_rows == 1  # one shard in the block: one part file
    [part] = parts.to_pylist()
    assert (part["rows"], part["ranges"], part["model_images"], part["forwards"]) == (2, [0, 2], 1, 1.0)
    row, bad = pq.read_table(tmp_path / part["file"]).to_pylist()
    assert row["status"] == "ok" and row["run_id"] == "run-1" and row["vocabulary_id"] == VOCAB.id
    assert decode_label_map(row["label_map"]).shape == photos[1].shape[:2]
    assert bad["error"] == "read: gone" and bad["label_map"] is None


def test_mixed_aspect_ratios_run_in_full_batches_with_one_at_a_time_results(tiny_ckpt, photos):
    # Real photos cut to three aspect ratios, interleaved as a shard of mixed photos comes.
    shapes = [(120, 160), (160, 120), (120, 160), (128, 128), (120, 160), (160, 120), (120, 160), (128, 128)]
    images = [photos[i % len(photos)][:h, :w].copy() for i, (h, w) in enumerate(shapes)]
    stage = SegmentImages(SegmenterSettings(tiny_ckpt, VOCAB, batch_size=4))
    batches = stage.batches(shapes)
    assert sorted(i for b in batches for i in b) == list(range(len(shapes)))
    assert all(len({stage.segmenter.padded_shape(*shapes[i]) for i in b}) == 1 for b in batches)
    out = stage(decoded_batch(images))
    # Three padded shapes (4 + 2 + 2 images): three forward passes, where batches of 4 rows in input order
    # would have taken six; the shares add up to the passes.
    assert len(batches) == 3 and out["forward_share"].sum() == pytest.approx(3.0)
    for i in (0, 1, 3, 6):  # each padded shape, and the last of the full batch
        one = stage(decoded_batch([images[i]]))  # a block of one image: a forward pass of its own
        assert one["forward_share"][0] == 1.0
        assert np.array_equal(out["labels"][i], one["labels"][0])
        assert np.allclose(out["scores"][i], one["scores"][0], rtol=1e-4, atol=1e-5)


def test_large_vocabularies_give_16_bit_labels(tiny_ckpt, photos):
    vocabulary = Vocabulary([f"class {i}" for i in range(256)])
    stage = SegmentImages(SegmenterSettings(tiny_ckpt, vocabulary, batch_size=1))
    out = stage(decoded_batch([photos[2]]))
    assert out["labels"][0].dtype == np.uint16 and out["labels"][0].max() < 256
    assert out["scores"].shape == (1, 256)


def test_random_presets_are_the_same_in_every_actor():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # actors load silently: the driver said "random weights" once
        a = SegmentImages(SegmenterSettings("tiny", VOCAB)).segmenter.model.state_dict()
        torch.manual_seed(123)  # whatever the process's RNG state was
        b = SegmentImages(SegmenterSettings("tiny", VOCAB)).segmenter.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_raw_rows_are_decoded_in_the_actor_in_chunks_with_the_same_results(tiny_ckpt, photos, monkeypatch):
    """Blocks of encoded bytes (``ReadShards``) give the rows a decode stage and then the model would:
    decoded a chunk ahead on a thread, errors as rows, order kept across chunks."""
    import io

    from PIL import Image

    from pipeline.label import segment
    from pipeline.label.decode import DecodeImages

    monkeypatch.setattr(segment, "DECODE_ROWS", 2)  # three chunks for five rows
    images = [photos[0][:90, :120], photos[1][:70, :50], None, photos[2][:64, :64], photos[0][:40, :100]]
    data = []
    for image in images:
        buf = io.BytesIO()
        if image is not None:
            Image.fromarray(image).save(buf, "PNG")
        data.append(buf.getvalue() if image is not None else b"junk")
    n = len(images)
    raw = {
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "source_uri": np.array([f"/in/{i}.png" for i in range(n)], dtype=object),
        "shard_id": np.array(["files-000000-abc"] * n, dtype=object),
        "member": np.array([None] * n, dtype=object),
        "shard_size": np.full(n, n),
        "row_index": np.arange(n),
        "data": np.array(data, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }
    decode = DecodeImages(SHORT_SIDE, 2560)
    settings = SegmenterSettings(tiny_ckpt, VOCAB, batch_size=2)
    in_actor = SegmentImages(settings, decode=decode)(raw)
    separate = SegmentImages(settings)(decode(raw))
    assert list(in_actor["image_id"]) == list(separate["image_id"]) == list(raw["image_id"])
    assert list(in_actor["status"]) == ["ok", "ok", "error", "ok", "ok"]
    assert in_actor["error"][2].startswith("decode:")
    assert "data" not in in_actor and "image" not in in_actor
    for a, b in zip(in_actor["labels"], separate["labels"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(in_actor["scores"], separate["scores"])
    assert in_actor["labels"][0].shape == (90, 120)
