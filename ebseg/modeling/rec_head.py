"""The attention bias of the SAN-style recognition head.

Token order inside the head is ``[SOS x Q, CLS, pixels (h*w)]``. Each SOS token may attend to itself and
to the pixels, with the decoder's per-head bias on the pixel columns; CLS and pixel tokens attend only to
CLS and pixels, so they stay plain CLIP. Blocked entries get -100 rather than -inf, as in the reference:
exp(-100) is not exactly zero, and keeping the same constant keeps outputs identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCKED = -100.0


@dataclass
class AttnBias:
    """The decoder's attention bias for the head, ``pixels + offset``, kept in its two terms.

    pixels: [B, heads, Q, h4, w4] the per-pixel term at stride 4 of the input (heads may be 1: shared by all
    heads); offset: [B, heads, Q] a constant per (head, query). The head max-pools the bias to the CLIP
    grid, and a constant commutes with a max (exactly: float rounding is monotone), so the offset is added
    on the pooled grid instead of to every stride-4 pixel (a [B, heads * Q, h4 * w4] copy less).
    """

    pixels: torch.Tensor
    offset: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The bias itself: [B, heads, Q, h4, w4]."""
        return self.pixels + self.offset[..., None, None]


def build_rec_attn_bias(attn_bias: AttnBias, *, grid: tuple[int, int], num_heads: int) -> torch.Tensor:
    """Turn the decoder's bias into the head's full attention bias.

    attn_bias: max-pooled to the CLIP ``grid`` (h, w). Returns [B, num_heads, T, T] with T = Q + 1 + h*w.
    """
    b, heads, q, h4, w4 = attn_bias.pixels.shape
    h, w = grid
    pooled = F.adaptive_max_pool2d(attn_bias.pixels.reshape(b, heads * q, h4, w4), (h, w))
    pooled = pooled.reshape(b, heads, q, h * w) + attn_bias.offset.unsqueeze(-1)
    if heads == 1:
        pooled = pooled.expand(b, num_heads, q, h * w)
    elif heads != num_heads:
        raise ValueError(f"attention bias has {heads} heads, the CLIP tower {num_heads}")

    t = q + 1 + h * w
    template = pooled.new_zeros(t, t)
    template[:, :q] = BLOCKED  # nobody attends to the SOS tokens ...
    idx = torch.arange(q, device=pooled.device)
    template[idx, idx] = 0.0  # ... except each SOS token to itself
    template[:q, q] = BLOCKED  # SOS tokens ignore CLS
    bias = template.expand(b, num_heads, t, t).clone()
    bias[:, :, :q, q + 1 :] = pooled
    return bias
