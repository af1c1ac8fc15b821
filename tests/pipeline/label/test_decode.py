"""Decode stage: odd and hostile inputs made here, real photos from skimage, and one run on local Ray."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ebseg.resize import resize_image, resized_shape
from pipeline.label.decode import BACKGROUND, DecodeError, DecodeImages, decode_image


def encode(image: Image.Image | np.ndarray, fmt: str, **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels and holds no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((96, 64)))  # 64 high, 96 wide


def reason(data, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kwargs)
    assert str(info.value).startswith(f"{info.value.code}: ")
    return info.value.code


def test_rgb_formats_round_trip(photo):
    assert np.array_equal(decode_image(encode(photo, "PNG")), photo)
    jpeg = decode_image(encode(photo, "JPEG", quality=95))
    assert jpeg.shape == photo.shape and jpeg.dtype == np.uint8
    assert np.abs(jpeg.astype(int) - photo).mean() < 4


def test_exif_orientation_turns_the_image_upright(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be turned 90 degrees clockwise to display
    data = encode(photo, "JPEG", quality=95, exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = decode_image(data)
    assert stored.shape == (64, 96, 3) and out.shape == (96, 64, 3)
    assert np.array_equal(out, np.rot90(stored, k=-1))
    # The decode stage reports the upright size as the original.
    batch = raw_batch([data])
    decoded = DecodeImages(None)(batch)
    assert (decoded["width"][0], decoded["height"][0]) == (64, 96)


def test_grayscale_modes(photo):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    out = decode_image(encode(gray, "PNG"))
    assert out.shape == (*gray.shape, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))

    bits = Image.fromarray(gray > 128)  # mode "1"
    assert bits.mode == "1"
    out = decode_image(encode(bits, "PNG"))
    assert set(np.unique(out)) <= {0, 255} and np.array_equal(out[..., 0] == 255, gray > 128)

    deep = np.array([[0, 257 * 100, 65535, 128]], dtype=np.uint16)  # 16-bit PNG
    out = decode_image(encode(deep, "PNG"))
    assert out[0, :, 0].tolist() == [0, 100, 255, 0] and out.dtype == np.uint8

    wide = Image.fromarray(np.array([[0, 257 * 7, 70000, -5]], dtype=np.int32), mode="I")
    assert decode_image(encode(wide, "TIFF"))[0, :, 1].tolist() == [0, 7, 255, 0]


def test_float_images_scale_to_8_bits():
    unit = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    assert decode_image(encode(Image.fromarray(unit, mode="F"), "TIFF"))[0, :, 2].tolist() == [0, 128, 255, 0]
    depth = np.array([[-2.0, 0.0, 2.0]], dtype=np.float32)  # any other range: stretched
    assert decode_image(encode(Image.fromarray(depth, mode="F"), "TIFF"))[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_composites_on_the_background():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 20, 40)
    rgba[..., 3] = [[255, 0, 128], [255, 255, 0]]
    out = decode_image(encode(rgba, "PNG")).astype(int)
    assert out[0, 0].tolist() == [200, 20, 40] and out[0, 1].tolist() == list(BACKGROUND)
    blend = [round((c * 128 + b * 127) / 255) for c, b in zip((200, 20, 40), BACKGROUND)]
    assert np.abs(out[0, 2] - blend).max() <= 1

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    palette.putdata([0, 1])
    data = encode(palette, "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert decode_image(data).tolist() == [[[10, 20, 30], list(BACKGROUND)]]
    # The same palette without transparency keeps its colour.
    assert decode_image(encode(palette, "PNG")).tolist() == [[[10, 20, 30], [250, 0, 0]]]

    la = Image.fromarray(np.array([[[90, 255], [90, 0]]], np.uint8), mode="LA")
    assert decode_image(encode(la, "PNG")).tolist() == [[[90] * 3, list(BACKGROUND)]]


def test_cmyk_jpeg(photo):
    data = encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.shape == photo.shape and np.abs(out.astype(int) - photo).mean() < 6


def test_broken_inputs_have_reason_codes(photo):
    jpeg = encode(photo, "JPEG")
    assert reason(jpeg[: len(jpeg) // 2]) == "decode"  # truncated
    assert reason(np.random.default_rng(0).bytes(4096)) == "decode"
    assert reason(b"") == "empty"
    assert reason(None) == "empty"


def test_pixel_limit_is_checked_from_the_header(photo):
    # No pixel data at all: had it been decoded, this would be a decode error, not too_large.
    assert reason(png_claiming(5000, 5000), max_pixels=1_000_000) == "too_large"
    limit = Image.MAX_IMAGE_PIXELS
    assert reason(png_claiming(100_000, 100_000)) == "too_large"  # past PIL's own guard too
    assert limit == Image.MAX_IMAGE_PIXELS  # the process-wide setting is left alone
    png = encode(photo, "PNG")
    assert reason(png, max_pixels=64 * 96 - 1) == "too_large"
    assert decode_image(png, max_pixels=64 * 96).shape == photo.shape
    assert reason(png_claiming(300, 200)) == "decode"  # within the limit: decoding finds no data


def raw_batch(datas, errors=None) -> dict[str, np.ndarray]:
    n = len(datas)
    column = np.empty(n, dtype=object)
    column[:] = datas
    return {
        "image_id": np.array([f"id{i}" for i in range(n)], dtype=object),
        "source_uri": np.array([f"mem://x/{i}" for i in range(n)], dtype=object),
        "member": np.array([None] * n, dtype=object),
        "shard_id": np.array(["s"] * n, dtype=object),
        "shard_size": np.full(n, n, np.int64),
        "data": column,
        "error": np.array(errors or [None] * n, dtype=object),
    }


def test_decode_images_batch(photos):
    datas = [encode(p, "PNG") for p in photos] + [b"junk", png_claiming(9000, 9000), b"", None]
    errors = [None] * (len(datas) - 1) + ["read: NoSuchKey: gone"]
    step = DecodeImages(96, 128, 64_000_000)
    out = step(raw_batch(datas, errors))
    assert "data" not in out and out["image_id"].tolist() == [f"id{i}" for i in range(len(datas))]
    assert out["status"].tolist() == ["ok"] * 3 + ["error"] * 4
    codes = [e.split(":")[0] if e else None for e in out["error"]]
    assert codes == [None, None, None, "decode", "too_large", "empty", "read"]
    assert out["error"][-1] == "read: NoSuchKey: gone"  # read errors pass through unchanged
    for i, photo in enumerate(photos):
        h, w = photo.shape[:2]
        assert (out["height"][i], out["width"][i]) == (h, w)
        expected = resize_image(photo, resized_shape(h, w, 96, 128))
        assert np.array_equal(out["image"][i], expected)
        assert min(expected.shape[:2]) == 96 or max(expected.shape[:2]) == 128
    for i in range(3, len(datas)):
        assert out["image"][i].shape == (0, 0, 3) and out["width"][i] == out["height"][i] == 0
    assert out["width"].dtype == np.int32 and out["decode_ms"].dtype == np.float32


def test_decode_images_without_resize_keeps_the_original(photos):
    out = DecodeImages(None)(raw_batch([encode(photos[1], "PNG")]))
    assert np.array_equal(out["image"][0], photos[1])


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpegs_decode_at_a_reduced_scale_for_the_model(photos, orientation):
    """A JPEG over twice the model's input size is decoded at 1/2..1/8 scale (draft mode) and then resized:
    the model image has the same shape and nearly the same pixels; the original size is the header's."""
    big = np.asarray(Image.fromarray(photos[1]).resize((1200, 800), Image.BILINEAR))  # coffee, 800 x 1200
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(big, "JPEG", quality=95, exif=exif.tobytes())
    full = decode_image(data)
    height, width = full.shape[:2]
    assert (height, width) == ((800, 1200) if orientation == 1 else (1200, 800))
    step = DecodeImages(96, 2560)
    image, got_height, got_width = step.decode_one(data)
    exact = resize_image(full, resized_shape(height, width, 96, 2560))
    assert (got_height, got_width) == (height, width) and image.shape == exact.shape
    assert not np.array_equal(image, exact)  # decoded at a reduced scale, so not bit-equal ...
    assert np.abs(image.astype(int) - exact).mean() < 2.5  # ... but the same picture
    # Smaller than twice the model's size: decoded in full, bit-equal to decode + resize.
    assert np.array_equal(
        DecodeImages(500, 2560).decode_one(data)[0], resize_image(full, image_shape(500, full))
    )


def image_shape(short_side: int, image: np.ndarray) -> tuple[int, int]:
    return resized_shape(*image.shape[:2], short_side, 2560)


def test_ray_reads_and_decodes_every_image_once(ray_local, s3_server, photos, tmp_path):
    from pipeline.label.listing import list_shards
    from pipeline.label.reading import ReadShards

    bucket = s3_server.bucket("decode")
    fs = s3_server.filesystem()
    small = [np.asarray(Image.fromarray(p).resize((48, 40))) for p in photos]
    expected = {}  # (file, member) -> error code, None when the image decodes
    for i, image in enumerate(small):
        fs.pipe_file(f"{bucket}/in/files/{i}.png", encode(image, "PNG"))
        expected[(f"{i}.png", None)] = None
    fs.pipe_file(f"{bucket}/in/files/bad.jpg", b"\xff\xd8junk")
    fs.pipe_file(f"{bucket}/in/files/empty.jpg", b"")
    expected.update({("bad.jpg", None): "decode", ("empty.jpg", None): "empty"})

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in [("000001.jpg", encode(small[0], "JPEG")), ("000001.json", b"{}"),
                           ("000002.png", b"not a png")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    fs.pipe_file(f"{bucket}/in/shards/a.tar", buf.getvalue())
    expected.update({("a.tar", "000001.jpg"): None, ("a.tar", "000002.png"): "decode"})

    table = pa.table({"image": pa.array([encode(small[1], "JPEG"), None, b"\x89PNG broken"], pa.binary())})
    local = tmp_path / "t.parquet"
    pq.write_table(table, local)
    fs.put_file(str(local), f"{bucket}/in/tables/t.parquet")
    expected.update({("t.parquet", "0"): None, ("t.parquet", "1"): "empty", ("t.parquet", "2"): "decode"})

    shards = [s.to_row() for s in list_shards(f"s3://{bucket}/in", files_per_shard=2)]
    ds = ray_local.data.from_items(shards, override_num_blocks=2)
    ds = ds.map_batches(ReadShards(2), batch_size=None)
    ds = ds.map_batches(DecodeImages(32, 64), batch_format="numpy", batch_size=3)
    rows = ds.take_all()

    got = {
        (r["source_uri"].rsplit("/", 1)[-1], r["member"]): r["error"] and r["error"].split(":")[0]
        for r in rows
    }
    assert got == expected and len(rows) == len(expected)
    assert len({r["image_id"] for r in rows}) == len(rows)
    for r in rows:
        if r["status"] == "ok":
            assert r["error"] is None and min(np.asarray(r["image"]).shape[:2]) == 32
            assert (r["width"], r["height"]) == (48, 40)
        else:
            assert r["status"] == "error" and np.asarray(r["image"]).size == 0
    sizes = {}
    for r in rows:
        sizes[r["shard_id"]] = sizes.get(r["shard_id"], 0) + 1
    assert all(r["shard_size"] == sizes[r["shard_id"]] for r in rows)
