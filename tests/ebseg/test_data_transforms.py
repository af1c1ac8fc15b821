"""Training augmentation: shapes, image/label alignment, flips, padding, determinism, fidelity rules."""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ebseg.data import IGNORE_INDEX, AugmentConfig, augment, augment_config
from ebseg.data.transforms import (
    AUGMENT_PRESETS,
    crop_box,
    hsv_to_rgb,
    resize_label,
    resized_shape,
    rgb_to_hsv,
)

# Eight well-separated colours; a label map painted with them can be read back from the image.
PALETTE = np.array(
    [[230, 25, 25], [25, 200, 40], [30, 40, 220], [240, 220, 30], [200, 40, 200], [30, 210, 210], [0, 0, 0],
     [255, 255, 255]],
    dtype=np.uint8,
)  # fmt: skip


def blocks(h: int, w: int, seed: int, cell: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A label map of random rectangular blocks and the image that paints each class in its PALETTE colour."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, len(PALETTE), size=(-(-h // cell), -(-w // cell)))
    label = np.kron(coarse, np.ones((cell, cell), dtype=np.int64))[:h, :w].astype(np.int32)
    return PALETTE[label], label


def no_jitter(config: AugmentConfig) -> AugmentConfig:
    return dataclasses.replace(config, color=None)


def test_reference_preset_is_the_papers_recipe():
    config = augment_config("reference")
    assert config.short_sides == tuple(range(320, 961, 64))
    assert (config.max_size, config.crop_size, config.single_category_max_area) == (2560, 640, 1.0)
    assert config.color is not None
    jitter = config.color
    assert (jitter.brightness_delta, jitter.contrast, jitter.saturation, jitter.hue_delta) == (
        32.0, (0.5, 1.5), (0.5, 1.5), 18
    )  # fmt: skip
    assert (config.flip_prob, config.pad_value) == (0.5, 128)
    assert augment_config("small").crop_size == 256
    assert set(AUGMENT_PRESETS) == {"reference", "small"}
    with pytest.raises(ValueError, match="unknown augmentation preset 'huge'"):
        augment_config("huge")
    with pytest.raises(ValueError, match="single_category_max_area"):
        AugmentConfig(single_category_max_area=0.0)


@pytest.mark.parametrize("preset", ["reference", "small"])
def test_output_shapes_dtypes_and_label_values(photos, preset):
    config = augment_config(preset)
    size = config.crop_size
    for i, photo in enumerate([*photos, photos[0][:40, :70]]):  # the last one is far smaller than the crop
        label = (photo[..., 0].astype(np.int32) // 64) + 3 * (photo[..., 1] > 128)  # ids 0..6
        label[:5] = IGNORE_INDEX
        image, out = augment(photo, label, config, np.random.default_rng(i))
        assert image.shape == (3, size, size) and image.dtype == np.uint8
        assert out.shape == (size, size) and out.dtype == np.int32
        assert set(np.unique(out)) <= set(np.unique(label)) | {IGNORE_INDEX}


def test_padding_fills_image_128_and_label_ignore():
    image, label = blocks(30, 50, seed=0)  # resized to 192 x 320, inside a 256 crop
    config = dataclasses.replace(no_jitter(augment_config("small")), short_sides=(192,), flip_prob=0.0)
    out_image, out_label = augment(image, label, config, np.random.default_rng(0))
    assert (out_label[192:] == IGNORE_INDEX).all() and (out_image[:, 192:] == 128).all()
    assert (out_label[:192] != IGNORE_INDEX).all()  # the crop spans the full width, no right padding
    assert resized_shape(30, 50, short_side=192, max_size=1024) == (192, 320)


@pytest.mark.parametrize("preset", ["reference", "small"])
def test_image_and_label_stay_aligned(preset):
    config = no_jitter(augment_config(preset))
    for seed in range(6):
        h, w = (300, 420) if seed % 2 else (500, 260)
        image, label = blocks(h, w, seed=seed)
        out_image, out_label = augment(image, label, config, np.random.default_rng(seed))
        # Away from class boundaries (which bilinear resizing blends), each pixel shows its class's colour.
        valid = out_label != IGNORE_INDEX
        interior = valid.copy()
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                shifted = np.roll(np.roll(out_label, dy, axis=0), dx, axis=1)
                interior &= shifted == out_label
        assert interior.sum() > 0.5 * valid.sum()
        expected = PALETTE[out_label[interior]].astype(int)
        got = out_image.transpose(1, 2, 0)[interior].astype(int)
        assert np.abs(got - expected).max() <= 2


def test_flip_mirrors_the_valid_region():
    image, label = blocks(200, 330, seed=3)
    base = dataclasses.replace(augment_config("small"), flip_prob=0.0)
    flipped = dataclasses.replace(base, flip_prob=1.0)
    for seed in range(4):
        a_img, a_lab = augment(image, label, base, np.random.default_rng(seed))
        b_img, b_lab = augment(image, label, flipped, np.random.default_rng(seed))
        rows, cols = np.nonzero(a_lab != IGNORE_INDEX)
        h, w = rows.max() + 1, cols.max() + 1
        assert (b_lab[:h, :w] == a_lab[:h, :w][:, ::-1]).all()
        assert (b_img[:, :h, :w] == a_img[:, :h, :w][:, :, ::-1]).all()
        assert (b_lab[h:] == IGNORE_INDEX).all() and (b_lab[:, w:] == IGNORE_INDEX).all()


def test_deterministic_for_a_generator_seed(photos):
    config = augment_config("reference")
    label = photos[1][..., 2].astype(np.int32) // 32
    first = augment(photos[1], label, config, np.random.default_rng(7))
    again = augment(photos[1], label, config, np.random.default_rng(7))
    other = augment(photos[1], label, config, np.random.default_rng(8))
    assert all((a == b).all() for a, b in zip(first, again))
    assert not (first[0] == other[0]).all()


def test_sixteen_bit_label_ids_survive():
    rng = np.random.default_rng(0)
    coarse = rng.choice([0, 254, 255, 256, 999, 65534, 70000], size=(8, 8)).astype(np.int32)
    label = np.kron(coarse, np.ones((40, 40), dtype=np.int32))
    image = rng.integers(0, 256, size=(*label.shape, 3), dtype=np.uint8)
    seen: set[int] = set()
    for seed in range(5):
        _, out = augment(image, label, augment_config("small"), np.random.default_rng(seed))
        values = set(np.unique(out).tolist())
        assert values <= {*coarse.ravel().tolist(), IGNORE_INDEX}
        seen |= values
    assert {999, 65534, 70000} <= seen


def test_label_resize_matches_torch_nearest():
    # detectron2 resizes non-uint8 label maps with torch's legacy "nearest"; ours must pick the same pixels.
    rng = np.random.default_rng(1)
    label = rng.integers(0, 500, size=(37, 53)).astype(np.int32)
    for h, w in [(74, 106), (20, 29), (91, 17), (37, 53), (641, 960)]:
        expected = F.interpolate(torch.from_numpy(label)[None, None].double(), (h, w), mode="nearest")
        assert (resize_label(label, h, w) == expected[0, 0].long().numpy()).all(), (h, w)


def test_resized_shape_follows_resize_shortest_edge():
    assert resized_shape(480, 640, short_side=320, max_size=2560) == (320, 427)
    assert resized_shape(640, 480, short_side=960, max_size=2560) == (1280, 960)
    assert resized_shape(100, 3000, short_side=960, max_size=2560) == (85, 2560)  # long side capped


def test_category_area_constraint_prefers_mixed_crops():
    label = np.zeros((120, 120), dtype=np.int32)
    label[:20, :20] = 1  # a small second class in one corner; everything else class 0
    free = AugmentConfig(short_sides=(120,), crop_size=30)
    constrained = dataclasses.replace(free, single_category_max_area=0.95)

    def mixed(config: AugmentConfig, seed: int) -> bool:
        y0, x0, ch, cw = crop_box(label, config, np.random.default_rng(seed))
        assert (ch, cw) == (30, 30)
        return len(np.unique(label[y0 : y0 + ch, x0 : x0 + cw])) > 1

    n_free = sum(mixed(free, s) for s in range(200))
    n_constrained = sum(mixed(constrained, s) for s in range(200))
    assert n_constrained > 2 * n_free  # ten tries find the corner far more often than one


# Reference values from opencv-python-headless 5.0 (cv2.cvtColor, 8-bit, vectorised path); the third to fifth
# HSV inputs are the ones whose RGB depends on OpenCV fusing its multiply-adds.
OPENCV_RGB2HSV = [
    ([255, 0, 0], [0, 255, 255]), ([12, 200, 37], [64, 240, 200]), ([90, 91, 250], [120, 163, 250]),
    ([250, 250, 249], [30, 1, 250]), ([0, 0, 0], [0, 0, 0]), ([130, 20, 140], [148, 219, 140]),
    ([255, 128, 0], [15, 255, 255]), ([33, 33, 34], [120, 8, 34]),
]  # fmt: skip
OPENCV_HSV2RGB = [
    ([0, 1, 8], [8, 7, 7]), ([1, 90, 85], [85, 56, 55]), ([1, 102, 75], [75, 45, 44]),
    ([1, 120, 255], [255, 138, 134]), ([97, 200, 130], [28, 106, 130]), ([150, 255, 255], [255, 0, 254]),
    ([179, 37, 201], [201, 171, 172]), ([60, 0, 77], [77, 77, 77]),
]  # fmt: skip


def test_hsv_matches_opencv():
    rgb, hsv = (np.array(column, dtype=np.uint8) for column in zip(*OPENCV_RGB2HSV))
    assert rgb_to_hsv(rgb).tolist() == hsv.tolist()
    hsv, rgb = (np.array(column, dtype=np.uint8) for column in zip(*OPENCV_HSV2RGB))
    assert hsv_to_rgb(hsv).tolist() == rgb.tolist()


def test_hsv_agrees_with_colorsys():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(4000, 3), dtype=np.uint8)
    hsv = rgb_to_hsv(rgb)
    assert hsv[:, 0].max() < 180
    for (r, g, b), (h, s, v) in zip(rgb[:300].astype(float) / 255, hsv[:300].astype(float)):
        ch, cs, cv = colorsys.rgb_to_hsv(r, g, b)
        assert abs(v - 255 * cv) <= 0.5 and abs(s - 255 * cs) <= 1
        if cs > 0.1:  # hue is ill-conditioned for near-grey colours
            assert min(abs(2 * h - 360 * ch), 360 - abs(2 * h - 360 * ch)) <= 2
    back = hsv_to_rgb(hsv).astype(int)
    assert np.abs(back - rgb.astype(int)).max() <= 8  # 8-bit HSV has 180 hues: a lossy round trip


def test_colour_jitter_changes_pixels_not_labels():
    image, label = blocks(256, 256, seed=5)
    config = dataclasses.replace(augment_config("small"), short_sides=(256,), flip_prob=0.0)
    changed = 0
    for seed in range(8):
        out_image, out_label = augment(image, label, config, np.random.default_rng(seed))
        assert (out_label == label).all()  # same size, crop at 0,0, no flip: geometry untouched
        changed += int((out_image.transpose(1, 2, 0) != image).any())
    assert changed >= 6  # each of the four steps fires with p=1/2: few draws leave the image as it was


def test_bad_inputs_are_named():
    image = np.zeros((10, 12, 3), np.uint8)
    config = augment_config("small")
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image is 10x12 but label is 10x11"):
        augment(image, np.zeros((10, 11), np.int32), config, rng)
    with pytest.raises(ValueError, match="image must be uint8"):
        augment(image.astype(np.float32), np.zeros((10, 12), np.int32), config, rng)
    with pytest.raises(ValueError, match="label must be an integer"):
        augment(image, np.zeros((10, 12), np.float32), config, rng)


def test_image_resize_is_pillow_bilinear():
    image, label = blocks(100, 150, seed=2)
    config = AugmentConfig(short_sides=(64,), crop_size=200, color=None, flip_prob=0.0)
    out, _ = augment(image, label, config, np.random.default_rng(0))
    expected = np.asarray(Image.fromarray(image).resize((96, 64), Image.Resampling.BILINEAR))
    assert (out.transpose(1, 2, 0)[:64, :96] == expected).all()
