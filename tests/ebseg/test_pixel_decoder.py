"""Multi-scale deformable attention and the pixel decoder: sampling rule, shapes, checkpoint names, dtypes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ebseg.config import PixelDecoderConfig, tiny
from ebseg.modeling import ms_deform_attn as ms_deform_attn_module
from ebseg.modeling import pixel_decoder as pixel_decoder_module
from ebseg.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn
from ebseg.modeling.pixel_decoder import (
    RES2_UPSAMPLING,
    ConvNorm,
    MSDeformAttnPixelDecoder,
    build_pixel_decoder,
)

REFERENCE_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference"
PREFIX = "sem_seg_head.pixel_decoder."
BASE_IN_CHANNELS = 768  # SAM ViT-B width


def build(config: PixelDecoderConfig, in_channels: int) -> MSDeformAttnPixelDecoder:
    return build_pixel_decoder(config, in_channels=in_channels)


def features(batch: int, channels: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random res2..res5 maps for a height x width image (res2 at stride 16, as the decoder takes it)."""
    gen = torch.Generator().manual_seed(seed)
    strides = {"res2": 16, "res3": 8, "res4": 16, "res5": 32}
    return {
        name: torch.randn(batch, channels, height // s, width // s, generator=gen)
        for name, s in strides.items()
    }


# --- ms_deform_attn against a per-point loop --------------------------------------------------------------


def bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """image: [D, H, W]; (x, y) in [0, 1] over the map's outer edges -> [D]. Corners off the map read 0."""
    _, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5  # pixel i has its centre at i + 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    total = torch.zeros(image.shape[0], dtype=image.dtype)
    for yi, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xi, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= xi < width and 0 <= yi < height:
                total += wy * wx * image[:, yi, xi]
    return total


def slow_ms_deform_attn(value, shapes, locations, weights) -> torch.Tensor:
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads * head_dim, dtype=torch.float64)
    for b in range(batch):
        for m in range(heads):
            maps = [
                value[b, s : s + h * w, m].double().T.reshape(head_dim, h, w)
                for s, (h, w) in zip(starts, shapes)
            ]
            for q in range(queries):
                acc = torch.zeros(head_dim, dtype=torch.float64)
                for lvl in range(levels):
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        acc += float(weights[b, q, m, lvl, p]) * bilinear_zero_padded(maps[lvl], x, y)
                out[b, q, m * head_dim : (m + 1) * head_dim] = acc
    return out


def test_ms_deform_attn_matches_per_point_bilinear():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (6, 4), (2, 7)]  # non-square, neither side dominant
    batch, queries, heads, head_dim, points = 2, 4, 2, 3, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=gen)
    # Beyond [0, 1] on purpose: points off the map and straddling its border must read (partial) zeros.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=gen)
    got = ms_deform_attn(value, shapes, locations, weights)
    assert got.shape == (batch, queries, heads * head_dim) and got.dtype == torch.float32
    # float32 arithmetic against a float64 loop.
    expected = slow_ms_deform_attn(value, shapes, locations, weights).float()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ms_deform_attn_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(
            torch.zeros(1, 10, 1, 2),
            [(3, 3)],
            torch.zeros(1, 1, 1, 1, 1, 2),
            torch.zeros(1, 1, 1, 1, 1),
        )


# --- MSDeformAttn: init and the offset convention -----------------------------------------------------------


def test_sampling_offsets_init_points_along_head_directions():
    attn = MSDeformAttn(dim=32, num_levels=3, num_heads=8, num_points=4)
    grid = attn.sampling_offsets.bias.detach().view(8, 3, 4, 2)
    scale = torch.arange(1, 5, dtype=torch.float32)[:, None]
    for head, direction in [(0, (1.0, 0.0)), (1, (1.0, 1.0)), (2, (0.0, 1.0)), (5, (-1.0, -1.0))]:
        expected = (scale * torch.tensor(direction)).expand(3, 4, 2)
        torch.testing.assert_close(grid[head], expected, atol=1e-5, rtol=0)
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    assert not attn.attention_weights.bias.any()


@pytest.mark.parametrize(("offset", "shift"), [((1.0, 0.0), (0, 1)), ((0.0, 1.0), (1, 0))])
def test_offsets_are_in_pixels_of_x_then_y(offset, shift):
    """An offset of one pixel along x (or y) reads the neighbouring pixel's value, zeros past the edge."""
    torch.manual_seed(0)
    h, w, dim = 3, 5, 8
    attn = MSDeformAttn(dim=dim, num_levels=1, num_heads=2, num_points=2)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor(offset).repeat(2 * 2))
    x = torch.randn(1, h * w, dim)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack(((xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h), dim=-1)[None, :, None]
    got = attn(x, centres, x, [(h, w)])

    value = attn.value_proj(x).view(1, h, w, dim)
    shifted = torch.zeros_like(value)
    dy, dx = shift
    shifted[:, : h - dy, : w - dx] = value[:, dy:, dx:]
    expected = attn.output_proj(shifted.view(1, h * w, dim))
    torch.testing.assert_close(got, expected)


def test_sampling_locations_are_reference_plus_offsets_over_level_size(monkeypatch):
    """The locations MSDeformAttn hands to the sampler are exactly the reference's formula,
    ``reference[:, :, None, :, None, :] + offsets / (W_l, H_l)``, on non-square levels of different sizes."""
    torch.manual_seed(0)
    shapes = [(3, 5), (6, 4)]
    b, lq, dim, heads, points = 2, 7, 16, 2, 3
    attn = MSDeformAttn(dim=dim, num_levels=len(shapes), num_heads=heads, num_points=points)
    torch.nn.init.normal_(attn.sampling_offsets.weight)  # offsets that differ per query, head and point
    seen = []

    def recording(value, spatial_shapes, locations, weights):
        seen.append(locations)
        return ms_deform_attn(value, spatial_shapes, locations, weights)

    monkeypatch.setattr(ms_deform_attn_module, "ms_deform_attn", recording)
    query = torch.randn(b, lq, dim)
    reference = torch.rand(b, lq, len(shapes), 2)
    with torch.no_grad():
        attn(query, reference, torch.randn(b, sum(h * w for h, w in shapes), dim), shapes)
        offsets = attn.sampling_offsets(query).view(b, lq, heads, len(shapes), points, 2)
    normaliser = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float32)
    expected = reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
    assert torch.equal(seen[0], expected)


# --- the pixel decoder --------------------------------------------------------------------------------


def test_base_pixel_decoder_shapes():
    decoder = build(PixelDecoderConfig(), BASE_IN_CHANNELS)
    with torch.no_grad():
        mask_features, multi_scale = decoder(features(1, BASE_IN_CHANNELS, 128, 128))
    assert mask_features.shape == (1, 256, 32, 32)
    assert [tuple(f.shape) for f in multi_scale] == [(1, 256, 4, 4), (1, 256, 8, 8), (1, 256, 16, 16)]


def test_tiny_pixel_decoder_shapes_non_square():
    config = tiny().pixel_decoder
    decoder = build(config, 64)
    with torch.no_grad():
        mask_features, multi_scale = decoder(features(2, 64, 128, 96))
    assert mask_features.shape == (2, config.mask_dim, 32, 24)
    expected = [(2, config.conv_dim, 4, 3), (2, config.conv_dim, 8, 6), (2, config.conv_dim, 16, 12)]
    assert [tuple(f.shape) for f in multi_scale] == expected
    assert all(torch.isfinite(f).all() for f in [mask_features, *multi_scale])


def test_coarse_res2_equals_upsampling_it_first():
    """The adapter on stride-16 res2, then upsampling, is the reference's adapter on res2 upsampled to
    stride 4, to float32 rounding: the 1x1 conv commutes with bilinear upsampling, the GroupNorm runs after
    both (its statistics would change if it ran on the coarse map: checked to fail below)."""
    torch.manual_seed(0)
    decoder = build(tiny().pixel_decoder, 64).eval()
    with torch.no_grad():
        for p in decoder.adapter_1.norm.parameters():  # non-trivial affine, so the order of ops shows
            p.add_(torch.randn_like(p))
    res2 = features(2, 64, 160, 96)["res2"] * 3 + 1  # non-centred input: GroupNorm statistics matter
    with torch.no_grad():
        got = decoder.adapter_1.upsampled(res2, RES2_UPSAMPLING)
        fine = F.interpolate(res2, scale_factor=RES2_UPSAMPLING, mode="bilinear")
        expected = decoder.adapter_1(fine)
        norm_first = F.interpolate(decoder.adapter_1(res2), scale_factor=RES2_UPSAMPLING, mode="bilinear")
    assert got.shape == expected.shape == (2, tiny().pixel_decoder.conv_dim, 40, 24)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)
    assert (norm_first - expected).abs().max() > 1e-2 * scale


def test_channels_last_stride4_path_equals_nchw(monkeypatch):
    """The decoder's outputs with its stride-4 path channels-last (the default) equal those with every map in
    NCHW, to float32 rounding, and come back channels-last (what the decoder's consumers read without a
    copy); the multi-scale levels are views of the encoder memory, not copies."""
    torch.manual_seed(0)
    decoder = build(tiny().pixel_decoder, 64).eval()
    inputs = features(2, 64, 128, 96)
    memory = []
    decoder.transformer.register_forward_hook(lambda module, args, out: memory.append(out))
    with torch.no_grad():
        mask_features, multi_scale = decoder(inputs)
        monkeypatch.setattr(pixel_decoder_module, "STRIDE4_LAYOUT", torch.contiguous_format)
        nchw_inputs = {name: x.contiguous() for name, x in inputs.items()}
        expected_mask_features, expected_multi_scale = decoder(nchw_inputs)
    assert mask_features.is_contiguous(memory_format=torch.channels_last)
    assert all(f.stride(1) == 1 for f in multi_scale)  # channels innermost
    # The levels as the NCHW code built them from the encoder memory: the same values.
    flat, shapes = memory[0]
    for got, part, (h, w) in zip(multi_scale, flat.split([h * w for h, w in shapes], dim=1), shapes):
        assert torch.equal(got, part.transpose(1, 2).reshape(2, -1, h, w))
    assert multi_scale[0].untyped_storage().data_ptr() == multi_scale[-1].untyped_storage().data_ptr()
    for got, expected in zip([mask_features, *multi_scale], [expected_mask_features, *expected_multi_scale]):
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)


def test_upsampled_refuses_a_spatial_kernel():
    conv = ConvNorm(4, 4, 3, norm=torch.nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="1x1"):
        conv.upsampled(torch.zeros(1, 4, 2, 2), 2)


def test_state_dict_matches_reference_layout():
    keys_file = REFERENCE_DIR / "keys_ebseg_b.json"
    if not keys_file.is_file():
        pytest.skip(f"reference key list not found at {keys_file} (the shared/ folder is absent)")
    entries = json.loads(keys_file.read_text())
    expected = {e["name"][len(PREFIX) :]: tuple(e["shape"]) for e in entries if e["name"].startswith(PREFIX)}
    assert expected, f"no {PREFIX}* entries in {keys_file}"
    state = build(PixelDecoderConfig(), BASE_IN_CHANNELS).state_dict()
    assert {name: tuple(t.shape) for name, t in state.items()} == expected


def test_autocast_keeps_float32():
    torch.manual_seed(0)
    decoder = build(tiny().pixel_decoder, 64).eval()
    inputs = {k: v.bfloat16() for k, v in features(1, 64, 64, 96).items()}
    with torch.no_grad():
        plain_masks, plain_levels = decoder({k: v.float() for k, v in inputs.items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            masks, levels = decoder(inputs)
    for got, plain in zip([masks, *levels], [plain_masks, *plain_levels]):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        # Autocast off inside means the same float32 arithmetic as without it.
        torch.testing.assert_close(got, plain)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    decoder = build(tiny().pixel_decoder, 64)
    # At init the offset and attention-weight matrices are zero, which blocks the gradient to the query
    # (and so to level_embed); a small perturbation gives a generic point.
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mask_features, multi_scale = decoder(features(1, 64, 64, 64))
    loss = mask_features.square().mean() + sum(f.square().mean() for f in multi_scale)
    loss.backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
