"""Label files (8/16-bit PNG, palette PNG, TIFF) and per-class training targets."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ebseg.data import IGNORE_INDEX, decode_label, encode_label, label_bits, semantic_targets
from ebseg.data.labels import encode_stored, to_stored


def png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    img = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def test_eight_bit_round_trip_maps_ignore():
    label = np.array([[0, 1, 254], [IGNORE_INDEX, 7, 0]], dtype=np.int32)
    data = encode_label(label)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "L"
        assert np.asarray(img)[1, 0] == 255
    out = decode_label(data)
    assert out.dtype == np.int32 and (out == label).all()


def test_sixteen_bit_round_trip_for_many_classes():
    label = np.array([[0, 255, 256], [846, IGNORE_INDEX, 65534]], dtype=np.int32)
    data = encode_label(label)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I;16")
        assert np.asarray(img)[1, 1] == 65535
    assert (decode_label(data) == label).all()
    # A dataset with more than 255 classes writes 16-bit files even when an image only holds small ids.
    small = np.array([[1, 2]], dtype=np.int32)
    with Image.open(io.BytesIO(encode_label(small, bits=label_bits(847)))) as img:
        assert img.mode.startswith("I;16")
    assert label_bits(171) == 8 and label_bits(256) == 16


def test_palette_png_and_tiff_read_as_class_ids():
    ids = np.array([[0, 3], [255, 12]], dtype=np.uint8)
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert decode_label(buffer.getvalue()).tolist() == [[0, 3], [IGNORE_INDEX, 12]]
    wide = np.array([[5, 65535], [400, 0]], dtype=np.uint16)
    assert decode_label(png(wide, fmt="TIFF")).tolist() == [[5, IGNORE_INDEX], [400, 0]]


def test_bad_label_files_are_named():
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="img_7: a label file must be a single-channel"):
        decode_label(png(rgb), name="img_7")
    with pytest.raises(ValueError, match="img_8: cannot decode"):
        decode_label(b"not a png", name="img_8")
    with pytest.raises(ValueError, match="does not fit a 8-bit"):
        encode_label(np.array([[300]]), bits=8)
    with pytest.raises(ValueError, match="negative class id -2"):
        encode_label(np.array([[-2]]))


def test_semantic_targets_one_mask_per_class_present():
    label = torch.tensor([[3, 3, IGNORE_INDEX], [0, 7, 3]], dtype=torch.int32)
    classes, masks = semantic_targets(label)
    assert classes.dtype == torch.long and classes.tolist() == [0, 3, 7]
    assert masks.dtype == torch.bool and masks.shape == (3, 2, 3)
    for c, m in zip(classes, masks):
        assert (m == (label == c)).all()
    assert not masks[:, 0, 2].any()  # ignore belongs to no mask
    np_classes, np_masks = semantic_targets(label.numpy())
    assert (np_classes == classes).all() and (np_masks == masks).all()


def test_semantic_targets_all_ignore_and_bad_input():
    classes, masks = semantic_targets(torch.full((4, 5), IGNORE_INDEX))
    assert classes.shape == (0,) and masks.shape == (0, 4, 5)
    with pytest.raises(ValueError, match="negative class id -3"):
        semantic_targets(torch.tensor([[-3, 1]]))
    with pytest.raises(ValueError, match="integer"):
        semantic_targets(torch.zeros(4, 5))


def random_labels(rng, shape, num_classes, *, with_none=False):
    labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
    labels[: shape[0] // 3, : shape[1] // 2] = 1  # a large block, so RLE runs are long as in real maps
    if with_none:
        labels[-2:, -3:] = -1
    return labels


@pytest.mark.parametrize(("num_classes", "depth"), [(3, 8), (255, 8), (256, 16), (847, 16)])
def test_stored_label_maps_round_trip_at_both_depths(num_classes, depth):
    rng = np.random.default_rng(num_classes)
    labels = random_labels(rng, (37, 53), num_classes, with_none=True)
    stored = to_stored(labels, bits=label_bits(num_classes))
    assert stored.dtype == (np.uint8 if depth == 8 else np.uint16)
    assert stored[-1, -1] == (255 if depth == 8 else 65535)
    png = encode_stored(stored, compress_level=1)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (53, 37)
        assert im.mode == ("L" if depth == 8 else "I;16")
    assert np.array_equal(decode_label(png), labels)


def test_label_depth_limits():
    assert label_bits(255) == 8 and label_bits(256) == 16
    with pytest.raises(ValueError, match="16-bit"):
        label_bits(70000)
    with pytest.raises(ValueError, match="uint8/uint16"):
        encode_stored(np.zeros((4, 4), np.int32))


@pytest.mark.parametrize("compress_level", [0, 1, 9])
@pytest.mark.parametrize("num_classes", [150, 847])
def test_png_of_real_photo_maps_reads_back_in_pillow(photos, compress_level, num_classes):
    """Label maps with a photo's structure (quantised colours) decode to the same values, in the same
    Pillow mode, as Pillow's own PNG of them; every row length, odd widths and one-pixel maps included."""
    image = photos[1][:, :-1]  # coffee, 400 x 599
    ids = ((image.astype(np.int64) * 6) // 256) @ np.array([36, 6, 1])
    stored = to_stored(ids % num_classes, bits=label_bits(num_classes))
    for array in (stored, stored[:1], stored[:, :1], stored[:1, :1]):
        ours, pillows = io.BytesIO(encode_stored(array, compress_level=compress_level)), io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(pillows, format="PNG")
        with Image.open(ours) as a, Image.open(pillows) as b:
            assert (a.format, a.mode, a.size) == ("PNG", b.mode, b.size)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            np.testing.assert_array_equal(np.asarray(a), array)
