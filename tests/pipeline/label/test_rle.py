"""One-pass masks of every class: pycocotools' RLE strings byte for byte, the same areas and boxes."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ebseg.data.shapes import generate
from pipeline.label.records import to_storage
from pipeline.label.rle import class_masks


def pycocotools_masks(labels: np.ndarray) -> dict[int, tuple[str, int, list[int]]]:
    """class id -> (RLE string, area, box) through one binary mask per class."""
    no_class = np.iinfo(labels.dtype).max
    out = {}
    for class_id in np.unique(labels):
        if class_id == no_class:
            continue
        rle = mask_utils.encode(np.asfortranarray(labels == class_id, dtype=np.uint8))
        box = mask_utils.toBbox(rle).astype(int).tolist()
        out[int(class_id)] = (rle["counts"].decode("ascii"), int(mask_utils.area(rle)), box)
    return out


def assert_same_as_pycocotools(labels: np.ndarray) -> int:
    masks = class_masks(labels)
    ours = {
        int(c): (rle, int(area), box.tolist())
        for c, rle, area, box in zip(masks.class_ids, masks.rles, masks.areas, masks.boxes)
    }
    expected = pycocotools_masks(labels)
    assert list(ours) == sorted(expected)
    for class_id, (rle, area, box) in expected.items():
        assert ours[class_id] == (rle, area, box), class_id
    return len(expected)


def photo_labels(image: np.ndarray, levels: int, num_classes: int) -> np.ndarray:
    """A label map with the structure of a real photo: colours quantised to ``levels`` per channel."""
    q = (image.astype(np.int64) * levels) // 256
    ids = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    return to_storage(ids % num_classes, num_classes)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_shapes_label_maps(index):
    _, labels = generate(index, size=(96, 128))
    labels[:5, :7] = -1  # some pixels of no class
    assert assert_same_as_pycocotools(to_storage(labels, 20)) > 1


@pytest.mark.parametrize(("levels", "num_classes"), [(4, 150), (8, 847)])
def test_real_photos_with_many_classes(photos, levels, num_classes):
    """Astronaut and coffee: over 100 classes in 16-bit maps at K=847, long and short runs, runs that
    wrap from one column to the next."""
    for image in photos[:2]:
        labels = photo_labels(image, levels, num_classes)
        assert labels.dtype == (np.uint8 if num_classes <= 255 else np.uint16)
        assert assert_same_as_pycocotools(labels) > (20 if levels == 4 else 100)


@pytest.mark.parametrize(
    "labels",
    [
        np.zeros((1, 1), np.uint8),
        np.full((3, 4), 255, np.uint8),  # no class anywhere
        np.array([[7, 255, 7, 7, 2]], np.uint8),  # one row: every run wraps into the next column
        np.array([[1], [1], [255], [3]], np.uint16).repeat(1, 1),
        np.eye(9, dtype=np.uint16) * 300,  # a class ending on the last pixel, large negative differences
        np.pad(np.ones((300, 200), np.uint8), ((0, 1), (0, 0)), constant_values=4),  # counts over 2**15
    ],
)
def test_edge_cases(labels):
    assert_same_as_pycocotools(labels)
