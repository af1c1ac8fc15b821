"""Forward of one SAM ViT block, on the parameters of ``segment_anything``'s ``Block``.

The library's attention materialises the logits, adds the decomposed relative-position terms and runs an
explicit softmax. Here the relative-position terms become an additive float mask for
``F.scaled_dot_product_attention`` (the same sum before the same softmax, so outputs agree to float
rounding), which uses a fused kernel on CPU and the memory-efficient one on GPU. Large grids (the global
blocks) run in chunks of query rows, each with its slice of the mask (``MASK_CHUNK_ELEMENTS``).

Folding the terms into the queries and keys instead (q' = [q / sqrt(d), q . R_h, q . R_w], k' = [k, one-hot
row, one-hot column], no mask) was measured and rejected: at 640x640 the 144-wide q-k product made a global
block's attention ~20 % slower on CPU than mask + SDPA, and SDPA falls back to its unfused path when q and
v differ in width.

Decomposed relative position (MViTv2): for a query at (i, j) and a key at (k, l),
``bias = q . R_h[i - k] + q . R_w[j - l]``, with ``R_h`` / ``R_w`` learnt tables over the offsets of one
axis (linearly resized when the attended grid differs from the one they were trained at).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relative_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """The embedding of every (query, key) offset along one axis of ``size`` tokens.

    rel_pos: [L, hd] one row per offset -(L-1)/2 .. (L-1)/2 -> [size, size, hd], entry (i, k) = offset i - k.
    Query and key grids are always the same size here (self-attention), so no coordinate rescaling.
    """
    span = 2 * size - 1
    if rel_pos.shape[0] != span:
        resized = F.interpolate(rel_pos.T[None], size=span, mode="linear")  # [1, hd, span]
        rel_pos = resized[0].T
    offsets = torch.arange(size, device=rel_pos.device)
    return rel_pos[offsets[:, None] - offsets[None, :] + (size - 1)]


def relative_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decomposed relative-position terms of every query, per key row and per key column.

    q: [N, heads, h*w, hd] unscaled queries -> (rel_h [N, heads, h, w, h (k)], rel_w [N, heads, h, w, w (l)]),
    contiguous float32: the bias of query (i, j) and key (k, l) is rel_h[..., i, j, k] + rel_w[..., i, j, l].
    The terms are computed in float32 whatever autocast says (they add to logits of order 10, where bf16
    would round by ~0.05); the caller casts the mask to the kernel's dtype.
    """
    h, w = grid
    n, heads, _, hd = q.shape
    with torch.autocast(device_type=q.device.type, enabled=False):
        r_q = q.float().reshape(n, heads, h, w, hd)
        table_h = relative_table(rel_pos_h.float(), h)  # [h, h, hd]
        table_w = relative_table(rel_pos_w.float(), w)  # [w, w, hd]
        # einsum returns permuted views (its bmm runs over the table's axis), and an elementwise op follows
        # its inputs' layout: summed as they are, the mask would come out non-contiguous and its reshape
        # would copy it. Made contiguous here (1/h of the mask's size), the sum is written directly in the
        # [N, heads, queries, h*w] layout the kernel reads.
        rel_h = torch.einsum("nmhwc,hkc->nmhwk", r_q, table_h).contiguous()
        rel_w = torch.einsum("nmhwc,wlc->nmhwl", r_q, table_w).contiguous()
    return rel_h, rel_w


def relative_bias(rel_h: torch.Tensor, rel_w: torch.Tensor, rows: slice) -> torch.Tensor:
    """The additive attention mask of the queries in grid ``rows``, from ``relative_terms``' outputs:
    [N, heads, (rows) * w, h * w] float32."""
    n, heads, _, w, h = rel_h.shape
    bias = rel_h[:, :, rows, :, :, None] + rel_w[:, :, rows, :, None, :]  # [N, heads, rows, w, h (k), w (l)]
    return bias.view(n, heads, -1, h * w)


# Most mask elements one SDPA call gets (16 MB in float32). A global block at 640x640 would need a
# [1, 12, 1600, 1600] mask (123 MB): built whole, it is a fresh allocation each time, beyond glibc's largest
# mmap threshold (32 MB), so every page of it faults (60 of its 70 ms to build on CPU). Query-row chunks of
# at most this size are reused by the allocator, and at most one chunk is alive at a time. Rows of queries
# are independent in attention, so the outputs are the same.
MASK_CHUNK_ELEMENTS = 2**22


def attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM's multi-head attention with relative position. x: [N, h, w, C] -> [N, h, w, C]."""
    n, h, w, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(n, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [N, heads, h*w, hd]
    rel_h, rel_w = relative_terms(q, attn.rel_pos_h, attn.rel_pos_w, (h, w))
    rows = max(1, MASK_CHUNK_ELEMENTS // (n * heads * w * h * w))
    out = []
    for first in range(0, h, rows):
        chunk = slice(first, min(first + rows, h))
        bias = relative_bias(rel_h, rel_w, chunk).to(q.dtype)
        queries = q[:, :, chunk.start * w : chunk.stop * w]
        out.append(F.scaled_dot_product_attention(queries, k, v, attn_mask=bias))
    out = out[0] if len(out) == 1 else torch.cat(out, dim=2)
    return attn.proj(out.transpose(1, 2).reshape(n, h, w, c))


def to_windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nh * nw, size, size, C], zero-padded bottom/right to whole windows (SAM pads the
    normalised tokens, and the padded keys take part in attention: kept, as it changes outputs)."""
    b, h, w, c = x.shape
    ph, pw = -h % size, -w % size
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    nh, nw = (h + ph) // size, (w + pw) // size
    x = x.view(b, nh, size, nw, size, c).transpose(2, 3)
    return x.reshape(b * nh * nw, size, size, c)


def from_windows(windows: torch.Tensor, size: int, hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``to_windows``: [B * nh * nw, size, size, C] -> [B, H, W, C] (padding dropped)."""
    h, w = hw
    nh, nw = -(-h // size), -(-w // size)
    c = windows.shape[-1]
    x = windows.view(-1, nh, nw, size, size, c).transpose(2, 3).reshape(-1, nh * size, nw * size, c)
    return x[:, :h, :w]


def sam_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One pre-norm SAM block (windowed when ``block.window_size`` > 0). x: [B, H, W, C] -> [B, H, W, C]."""
    y = block.norm1(x)
    size = block.window_size
    if size > 0:
        y = from_windows(attention(block.attn, to_windows(y, size)), size, x.shape[1:3])
    else:
        y = attention(block.attn, y)
    x = x + y
    return x + block.mlp(block.norm2(x))
