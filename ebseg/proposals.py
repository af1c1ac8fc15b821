"""Proposals: one image's model outputs before any vocabulary enters, and their stored encodings.

In EBSeg's forward pass the class names enter only through the final dot products of three per-query
embeddings with the text classifier (branch A: the decoder's, B: the CLIP recognition head's, D: mask-pooled
dense CLIP features); the mask logits and the embeddings themselves do not depend on the vocabulary. So an
image's ``Proposals`` plus the model's text tower are enough to label it with any vocabulary later, and
``Segmenter.predict`` is exactly ``Segmenter.label(Segmenter.propose(...))``.

Encodings trade bytes for agreement with a fresh run (figures: ``benchmarks/README.md``): ``float32`` is
lossless; ``float8`` masks (e4m3, as raw bytes) keep the logits' sign and a relative precision of 1/16;
``uint8`` masks keep the sigmoid in 256 levels (a level's midpoint comes back), which saturated masks
compress to about a bit per value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ebseg.postprocess import GridLogits

MASK_ENCODINGS = ("float32", "float16", "float8", "uint8")
EMBEDDING_ENCODINGS = ("float32", "float16")
# The smallest encodings whose labels agree with a fresh run on >= 99.9% of each image's pixels
# (benchmarks/proposals.py), and the lossless ones.
DEFAULT_ENCODING = ("float8", "float16")
LOSSLESS_ENCODING = ("float32", "float32")

# Levels of the uint8 mask encoding: level q stands for sigmoid values in [q / 256, (q + 1) / 256).
_LEVELS = 256
_FLOAT8_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclass
class Proposals:
    """One image's vocabulary-free outputs.

    masks: [Q, gh, gw] float32 mask logits on the stride-4 grid of the padded model input.
    embeddings: [3, Q, D] float32 embeddings A, B and D (``EBSegOutput``), in that order.
    input_size: (h, w) of the model input before padding; the padded input is (4 * gh, 4 * gw).
    """

    masks: torch.Tensor
    embeddings: torch.Tensor
    input_size: tuple[int, int]

    def input_masks(
        self, queries: slice | list[int] | None = None, *, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """[Q', h, w] mask logits at the model input size (unpadded) of the chosen queries (default all),
        on ``device`` (default: the masks'): upsampled from the grid to the padded input and cropped, as
        labelling does before resizing to the original size (``Segmenter.label``)."""
        masks = (self.masks if queries is None else self.masks[queries]).to(device)
        return GridLogits(masks, self.input_size).rows(0, self.input_size[0])

    def regions(self) -> torch.Tensor:
        """bool [Q, ceil(h / 4), ceil(w / 4)]: each query's region (logit > 0) on the grid cells the
        unpadded input covers; what search and the stored areas and boxes count."""
        h, w = self.input_size
        return self.masks[:, : -(-h // 4), : -(-w // 4)] > 0

    def region_stats(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query: area (float32 [Q], the region's fraction of the grid) and box (int32 [Q, 4],
        ``[x, y, w, h]`` at the original ``height`` x ``width``, from the grid cells scaled; zeros for an
        empty region). Grid resolution: a box is exact to a cell (4 input pixels) and its scaling."""
        regions = self.regions()
        areas = regions.flatten(1).float().mean(1).numpy().astype(np.float32)
        boxes = np.zeros((regions.shape[0], 4), np.int32)
        h, w = self.input_size
        sy, sx = height / h, width / w
        rows, cols = regions.any(2).numpy(), regions.any(1).numpy()
        for q in np.flatnonzero(areas > 0):
            r, c = np.flatnonzero(rows[q]), np.flatnonzero(cols[q])
            x0, y0 = int(c[0] * 4 * sx), int(r[0] * 4 * sy)
            x1, y1 = (
                min(width, round(min(w, 4 * (c[-1] + 1)) * sx)),
                min(height, round(min(h, 4 * (r[-1] + 1)) * sy)),
            )
            boxes[q] = (x0, y0, max(1, x1 - x0), max(1, y1 - y0))
        return areas, boxes


def branch_logits(embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """embeddings: [3, Q, D] (A, B, D); classifier: [K + 1, D] (``TextClassifier.classifier``) ->
    [3, Q, K + 1] class logits per branch, background last. Always float32: the balancing takes powers of
    these probabilities, where bf16 rounding would move labels."""
    return torch.matmul(embeddings.float(), classifier.float().t())


def _check(encoding: str, allowed: tuple[str, ...], what: str) -> None:
    if encoding not in allowed:
        raise ValueError(f"unknown {what} encoding {encoding!r}; expected one of {', '.join(allowed)}")


def encode_masks(masks: torch.Tensor, encoding: str) -> np.ndarray:
    """[Q, gh, gw] float mask logits -> an array of the encoding's dtype, same shape."""
    _check(encoding, MASK_ENCODINGS, "mask")
    masks = masks.detach().float().cpu()
    if encoding == "uint8":
        levels = torch.floor(masks.sigmoid() * _LEVELS).clamp(max=_LEVELS - 1)
        return levels.to(torch.uint8).numpy()
    if encoding == "float8":
        # e4m3 keeps 3 mantissa bits over a wide range: logits near 0 (where labels are decided) stay
        # fine, saturated ones coarse. Stored as its raw bytes: numpy has no 8-bit float.
        return masks.clamp(-_FLOAT8_MAX, _FLOAT8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return masks.numpy().astype(encoding)


def decode_masks(values: np.ndarray, encoding: str) -> torch.Tensor:
    """The inverse of ``encode_masks``: float32 mask logits (a level's midpoint for ``uint8``)."""
    _check(encoding, MASK_ENCODINGS, "mask")
    if encoding == "uint8":
        p = (torch.from_numpy(np.asarray(values, dtype=np.float32)) + 0.5) / _LEVELS
        return torch.log(p) - torch.log1p(-p)
    if encoding == "float8":
        raw = torch.from_numpy(np.ascontiguousarray(values, dtype=np.uint8))
        return raw.view(torch.float8_e4m3fn).float()
    return torch.from_numpy(np.asarray(values, dtype=np.float32).copy())


def encode_embeddings(embeddings: torch.Tensor, encoding: str) -> np.ndarray:
    """[3, Q, D] float embeddings -> an array of the encoding's dtype."""
    _check(encoding, EMBEDDING_ENCODINGS, "embedding")
    return embeddings.detach().float().cpu().numpy().astype(encoding)


def decode_embeddings(values: np.ndarray, encoding: str) -> torch.Tensor:
    _check(encoding, EMBEDDING_ENCODINGS, "embedding")
    return torch.from_numpy(np.asarray(values, dtype=np.float32).copy())
