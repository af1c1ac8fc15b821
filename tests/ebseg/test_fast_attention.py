"""Our fused forwards against the straightforward computations they replace, on the same parameters.

SAM blocks run our ``sam_block`` on ``segment_anything``'s modules (its own ``Block.forward`` is the
reference); the deformable attention's gather is checked against ``grid_sample`` in value and gradients.
On a machine with CUDA the same checks run on the GPU too (its SDPA and embedding_bag kernels differ).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block

from ebseg.modeling import sam_block as sam_block_module
from ebseg.modeling.ms_deform_attn import ms_deform_attn
from ebseg.modeling.sam_block import sam_block

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def sam_library_block(window: int, trained_grid: int) -> Block:
    torch.manual_seed(0)
    block = Block(
        dim=48,
        num_heads=3,
        use_rel_pos=True,
        rel_pos_zero_init=False,
        window_size=window,
        input_size=(trained_grid, trained_grid),
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    )
    with torch.no_grad():  # zero-initialised by the library: give the relative terms real values
        block.attn.rel_pos_h.normal_()
        block.attn.rel_pos_w.normal_()
    return block.eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "window, trained_grid, grid",
    [
        (4, 4, (10, 7)),  # windowed, padded to whole windows on both axes
        (0, 16, (10, 7)),  # global, relative tables resized from 31 offsets
        (0, 7, (7, 7)),  # global at the trained size (no resize)
    ],
)
@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one-call", "row-chunks"])
def test_sam_block_matches_segment_anything(window, trained_grid, grid, device, chunk_rows, monkeypatch):
    """row-chunks: the attention runs in several SDPA calls of 3 query rows each (the last one shorter),
    each with its own slice of the relative-position mask, as large grids do."""
    block = sam_library_block(window, trained_grid).to(device)
    x = torch.randn(2, *grid, 48, generator=torch.Generator().manual_seed(1)).to(device)
    if chunk_rows is not None:
        # 2 images (or windows of them) x 3 heads, mask rows as long as the attended grid.
        n = 2 * (math.ceil(grid[0] / window) * math.ceil(grid[1] / window) if window else 1)
        side = (window, window) if window else grid
        monkeypatch.setattr(
            sam_block_module, "MASK_CHUNK_ELEMENTS", chunk_rows * n * 3 * side[1] * side[0] * side[1]
        )
    with torch.no_grad():
        expected = block(x)
        got = sam_block(block, x)
    torch.testing.assert_close(got, expected, atol=2e-6 * expected.abs().max().item(), rtol=1e-5)


def grid_sample_ms_deform_attn(value, shapes, locations, weights):
    """The textbook formulation: grid_sample per level, then the weighted sum over levels and points."""
    b, _, heads, hd = value.shape
    _, lq, _, levels, points, _ = locations.shape
    samples = []
    for level, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[level]
        value_l = value_l.permute(0, 2, 3, 1).reshape(b * heads, hd, h, w)
        grid = (2 * locations[:, :, :, level] - 1).transpose(1, 2).flatten(0, 1)  # [B * heads, Lq, P, 2]
        samples.append(
            F.grid_sample(value_l, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    sampled = torch.stack(samples, dim=-2)  # [B * heads, hd, Lq, L, P]
    w = weights.transpose(1, 2).reshape(b * heads, 1, lq, levels, points)
    return (sampled * w).sum((-1, -2)).view(b, heads * hd, lq).transpose(1, 2)


def pixel_aligned_locations(shapes, size, gen):
    """[*size, L, P, 2] locations on pixel centres and pixel edges, from 4 pixels before each map to 4 after:
    the corners at and just beyond the zero border, where a tap is either read or must read zero."""
    per_level = []
    for h, w in shapes:
        extent = torch.tensor([w, h], dtype=torch.float64)
        pixel = torch.randint(-4, int(extent.max()) + 4, (*size, 2), generator=gen).double()
        half = torch.randint(0, 2, (*size, 2), generator=gen).double() / 2
        per_level.append((pixel + half) / extent)
    return torch.stack(per_level, dim=-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("placement", ["near", "far", "aligned"])
def test_ms_deform_attn_gradients_match_grid_sample(device, placement):
    """near: within 0.2 map widths of the map (border-straddling points); far: up to 2 map widths off it
    (whole samples beyond the table's zero border, where the corners are clamped); aligned: on pixel centres
    and edges around the border (integer corner coordinates, fraction 0 or 0.5)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (3, 3), (5, 2)]
    b, lq, heads, hd, points = 2, 5, 2, 4, 3
    value = torch.randn(b, sum(h * w for h, w in shapes), heads, hd, generator=gen, dtype=torch.float64)
    # float64 so only the formulas are compared.
    size = (b, lq, heads, len(shapes), points, 2)
    if placement == "aligned":
        locations = pixel_aligned_locations(shapes, (b, lq, heads, points), gen)
    else:
        spread = {"near": 0.2, "far": 2.0}[placement]
        locations = torch.rand(size, generator=gen, dtype=torch.float64) * (1 + 2 * spread) - spread
    weights = torch.rand(b, lq, heads, len(shapes), points, generator=gen, dtype=torch.float64)
    upstream = torch.randn(b, lq, heads * hd, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (ms_deform_attn, grid_sample_ms_deform_attn):
        inputs = [t.to(device).clone().requires_grad_() for t in (value, locations, weights)]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        (out.double() * upstream.to(device)).sum().backward()
        grads.append([out.detach().double(), *(t.grad for t in inputs)])
    for name, got, expected in zip(("output", "value", "locations", "weights"), *grads):
        if name == "locations" and placement == "aligned":
            continue  # bilinear sampling has a kink at integer coordinates: only one-sided derivatives there
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)
