"""Forward of one SAM ViT block, on the parameters of ``segment_anything``'s ``Block``.

The library's attention materialises the logits, adds the decomposed relative-position terms and runs an
explicit softmax. Here the relative-position terms become an additive float mask for
``F.scaled_dot_product_attention`` (the same sum before the same softmax, so outputs agree to float
rounding), which uses a fused kernel on CPU and the memory-efficient one on GPU.

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


def relative_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """The decomposed relative-position terms as one additive attention mask.

    q: [N, heads, h*w, hd] unscaled queries -> [N, heads, h*w, h*w] float32: the terms are computed in
    float32 whatever autocast says (they add to logits of order 10, where bf16 would round by ~0.05); the
    caller casts to the kernel's dtype.
    """
    h, w = grid
    n, heads, _, hd = q.shape
    with torch.autocast(device_type=q.device.type, enabled=False):
        r_q = q.float().reshape(n, heads, h, w, hd)
        table_h = relative_table(rel_pos_h.float(), h)  # [h, h, hd]
        table_w = relative_table(rel_pos_w.float(), w)  # [w, w, hd]
        # einsum returns permuted views (its bmm runs over the table's axis), and an elementwise op follows
        # its inputs' layout: summed as they are, the mask comes out non-contiguous and the reshape below
        # copies it (123 MB per global block at 640x640). Made contiguous first (1/40 of that), the sum is
        # written once, directly in the [N, heads, h*w, h*w] layout the kernel reads.
        rel_h = torch.einsum("nmhwc,hkc->nmhwk", r_q, table_h).contiguous()
        rel_w = torch.einsum("nmhwc,wlc->nmhwl", r_q, table_w).contiguous()
        bias = rel_h[..., :, None] + rel_w[..., None, :]  # [N, heads, h, w, h (k), w (l)]
    return bias.view(n, heads, h * w, h * w)


def attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM's multi-head attention with relative position. x: [N, h, w, C] -> [N, h, w, C]."""
    n, h, w, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(n, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [N, heads, h*w, hd]
    bias = relative_bias(q, attn.rel_pos_h, attn.rel_pos_w, (h, w)).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
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
