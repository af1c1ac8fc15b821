"""Semantic inference at the original size: per-query mask logits and class weights -> label map and scores.

The reference resizes the Q mask logits to the original size (bilinear, align_corners=False), takes
``sem[k] = sum_q w[q, k] * sigmoid(m[q])`` for every class and keeps the argmax. The [K, H, W] product is
the cost (about 53 GFLOP for a 640x480 image at K=847), yet only a few classes can win anywhere.

``semantic_labels`` gives the same label map and scores while computing, tile by tile, only the classes
that can win a pixel of the tile: over a tile each query's sigmoid lies between its min and max there, so
the difference between a class's ``sem`` and the tile's leading class's is bounded above (``_can_win``),
and a class whose bound is below zero cannot win there. Tiles crossed by object boundaries keep many
classes and are split in four until they keep few.
``semantic_probabilities`` computes every class (the reference's ``sem_seg``), for callers that want it.
Both go band by band, so memory stays bounded for large originals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Output rows handled at once: bounds memory to about Q * BAND_ROWS * width floats whatever the image size.
BAND_ROWS = 64
# Side of the tiles the class bounds are taken on; a tile whose product would still be large (kept
# classes x pixels x queries over SPLIT_WORK) is split in four, down to MIN_TILE, when that halves it.
TILE = 32
MIN_TILE = 8
SPLIT_WORK = 4_000_000
# A class is dropped from a tile only when its bound on (its sum - the leader's) is below zero by this
# margin relative to the leader's sum: bounds and products are float32 sums of Q terms, each off by at most
# ~Q * 2**-24 of that scale.
BOUND_MARGIN = 1e-4
# CPU BLAS (MKL) sums a product with fewer than 4 output rows in another order, which changes the last bit;
# with at least this many classes per tile (the first ones are added) the kept classes' values equal the
# full product's bit for bit.
MIN_CLASSES = 4


def bilinear_taps(n_in: int, n_out: int, device: torch.device):
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False) along one axis.

    Returns (lo, hi, w_lo, w_hi), each [n_out]: out[i] = in[lo[i]] * w_lo[i] + in[hi[i]] * w_hi[i];
    lo and hi are non-decreasing.
    """
    scale = n_in / n_out
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    w_hi = src - lo
    return lo, hi, 1 - w_hi, w_hi


class GridLogits:
    """Mask logits on the stride-4 grid of a padded model input, upsampled to the unpadded input on demand.

    grid: [Q, gh, gw]; input_size: (h, w) <= (4 gh, 4 gw). ``rows(r0, r1)`` gives rows r0..r1 of the
    [Q, h, w] logits the reference has (x4 bilinear upsampling of the whole grid, align_corners=False,
    then the crop): a band and its halo are upsampled alone, which gives those rows bit for bit (x4 maps
    output row i to grid row (i + 0.5) / 4 - 0.5, an exact float whatever the band's offset) while only a
    band of the [Q, h, w] tensor is ever held, in cache.
    """

    def __init__(self, grid: torch.Tensor, input_size: tuple[int, int]):
        self.grid = grid
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.shape = (grid.shape[0], *self.input_size)
        self.device = grid.device

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """[Q, r1 - r0, w] logits of input rows r0..r1."""
        grid_rows = self.grid.shape[1]
        # Output row i reads grid rows floor((i + 0.5) / 4 - 0.5) and the next: one grid row of halo
        # each side keeps the band's own clamping away from rows it returns.
        g0, g1 = max(0, r0 // 4 - 1), min(grid_rows, (r1 - 1) // 4 + 2)
        size = (4 * (g1 - g0), 4 * self.grid.shape[2])
        band = F.interpolate(self.grid[None, :, g0:g1], size=size, mode="bilinear", align_corners=False)[0]
        return band[:, r0 - 4 * g0 : r1 - 4 * g0, : self.input_size[1]]


Masks = torch.Tensor | GridLogits


class _Resize:
    """Band-wise bilinear resize of [Q, h, w] mask logits (a tensor or ``GridLogits``) to (H, W)."""

    def __init__(self, masks: Masks, size: tuple[int, int]):
        self.masks = masks
        self.same_size = tuple(masks.shape[1:]) == tuple(size)
        self.rows = bilinear_taps(masks.shape[1], size[0], masks.device)
        self.cols = bilinear_taps(masks.shape[2], size[1], masks.device)

    def source(self, r0: int, r1: int) -> torch.Tensor:
        if isinstance(self.masks, GridLogits):
            return self.masks.rows(r0, r1)
        return self.masks[:, r0:r1]

    def band(self, r0: int, r1: int) -> torch.Tensor:
        """[Q, r1 - r0, width] resized logits of output rows r0..r1."""
        if self.same_size:
            return self.source(r0, r1)
        lo, hi, w_lo, w_hi = (t[r0:r1] for t in self.rows)
        first = int(lo[0])  # lo and hi are non-decreasing: the band reads source rows first..hi[-1]
        block = self.source(first, int(hi[-1]) + 1)
        band = block[:, lo - first] * w_lo[:, None] + block[:, hi - first] * w_hi[:, None]
        c_lo, c_hi, cw_lo, cw_hi = self.cols
        return band[:, :, c_lo] * cw_lo + band[:, :, c_hi] * cw_hi


def resize_logits(masks: Masks, size: tuple[int, int]) -> torch.Tensor:
    """[Q, h, w] mask logits -> [Q, H, W] at ``size``, with the same arithmetic as semantic inference (for
    callers that want a query's own region at the original size)."""
    return _Resize(masks, size).band(0, size[0])


def semantic_sums(weights: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """weights: [Q, K]; probs: [Q, h, w] mask sigmoids -> [K, h, w] = sum_q w[q, k] * probs[q]."""
    return torch.einsum("qk,qhw->khw", weights, probs)


def _finish(labels: torch.Tensor, score_sum: torch.Tensor, num_classes: int):
    areas = torch.bincount(labels.flatten().long(), minlength=num_classes)
    scores = torch.where(areas > 0, score_sum / areas.clamp(min=1), torch.zeros_like(score_sum))
    return labels, scores.float(), areas


def _can_win(weights: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """low, high: [..., Q] smallest and largest sigmoid of each query over a tile -> [..., K] bool: the
    classes that may reach the tile's leading class somewhere in the tile.

    The bound is on differences: with d = w[:, k] - w[:, c] for a leading class c, at every pixel
    sem[k] - sem[c] = sum_q d[q] * s[q] <= sum_q max(d[q] * low[q], d[q] * high[q]). Where the class
    weights are flat (a random or weakly trained model) every class's own range [w . low, w . high] is
    wide and overlaps the others', yet the differences are small and tightly bounded, so this keeps few
    classes where bounding each class alone keeps all of them. Any leader gives a valid bound; the class
    best at the tile's mid-range values is usually the one that wins there.
    """
    base, top = torch.stack((low, high)) @ weights  # [..., K] each; one product: these are small
    lead = (base + top).argmax(-1, keepdim=True)  # [..., 1]
    # sum_q max(d * low, d * high) = d . low + max(d, 0) . (high - low)
    bound = base - base.gather(-1, lead)
    spread, flat_lead = (high - low).reshape(-1, low.shape[-1]), lead.flatten()
    extra = torch.empty_like(base).view(-1, weights.shape[1])
    for c in flat_lead.unique().tolist():
        tiles = (flat_lead == c).nonzero().flatten()
        extra[tiles] = spread[tiles] @ (weights - weights[:, c : c + 1]).clamp(min=0)
    bound += extra.view(bound.shape)
    # The scale of the values compared: the leader's largest possible sum (positive weights).
    scale = top.gather(-1, lead)
    return bound >= -BOUND_MARGIN * scale


def _quarters(weights: torch.Tensor, tile: torch.Tensor) -> torch.Tensor:
    """tile: [Q, h, w] sigmoids, h and w even -> [2, 2, K] bool: the classes that can win in each quarter."""
    _, h, w = tile.shape
    quarters = tile.unflatten(2, (2, w // 2)).unflatten(1, (2, h // 2))  # [Q, 2, h/2, 2, w/2], a view
    low, high = quarters.amin((2, 4)), quarters.amax((2, 4))  # [Q, 2, 2]
    return _can_win(weights, low.permute(1, 2, 0), high.permute(1, 2, 0))


def _label_region(weights, probs, labels, score_sum, rows: slice, cols: slice, keep: torch.Tensor) -> None:
    """Label probs[:, rows, cols] from the classes in ``keep`` [K] bool (at least MIN_CLASSES of them)."""
    region = probs[:, rows, cols]
    if bool(keep.all()):
        top, arg = semantic_sums(weights, region).max(dim=0)
    else:
        keep = keep.clone()
        keep[:MIN_CLASSES] = True
        classes = keep.nonzero().flatten()
        top, arg = semantic_sums(weights[:, classes], region).max(dim=0)
        arg = classes[arg]
    labels[rows, cols] = arg.to(torch.int32)
    score_sum.index_add_(0, arg.flatten(), top.flatten().double())


def _block_extremes(probs: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs: [Q, h, w] -> (min, max), each [R, C, Q] over blocks of size x size (the last ones shorter)."""
    out = []
    for reduce in (torch.amin, torch.amax):
        x = probs
        for dim in (1, 2):
            n = x.shape[dim]
            whole = n - n % size
            parts = [reduce(x.narrow(dim, 0, whole).unflatten(dim, (whole // size, size)), dim + 1)]
            if whole < n:
                parts.append(reduce(x.narrow(dim, whole, n - whole), dim, keepdim=True))
            x = torch.cat(parts, dim)
        out.append(x.permute(1, 2, 0))
    return out[0], out[1]


def _label_tile(weights, probs, labels, score_sum, rows: slice, cols: slice, keep: torch.Tensor) -> None:
    """Label one tile of a band. probs: [Q, band rows, W] sigmoids; labels: [band rows, W] int32, written;
    keep: [K] bool, the classes that can win in the tile."""
    tile = probs[:, rows, cols]
    num_queries, height, width = tile.shape
    work = int(keep.sum()) * height * width
    # A tile crossed by an object boundary keeps many classes; its quarters may keep far fewer. Split
    # when the product is large and the quarters' classes cost at most half of it.
    if (
        work * num_queries > SPLIT_WORK
        and min(height, width) >= 2 * MIN_TILE
        and height % 2 == width % 2 == 0
    ):
        quarters = _quarters(weights, tile)
        if int(quarters.sum()) * (height // 2) * (width // 2) * 2 <= work:
            r_mid, c_mid = rows.start + height // 2, cols.start + width // 2
            for i, sub_rows in enumerate((slice(rows.start, r_mid), slice(r_mid, rows.stop))):
                for j, sub_cols in enumerate((slice(cols.start, c_mid), slice(c_mid, cols.stop))):
                    _label_tile(weights, probs, labels, score_sum, sub_rows, sub_cols, quarters[i, j])
            return
    _label_region(weights, probs, labels, score_sum, rows, cols, keep)


def semantic_labels(weights: torch.Tensor, masks: Masks, size: tuple[int, int]):
    """weights: [Q, K] (non-negative); masks: [Q, h, w] logits (or ``GridLogits``) -> at ``size`` = (H, W):
    label map [H, W] int32, scores [K] float32 (mean ``sem`` of each class over its pixels, 0 if absent),
    areas [K] int64. The same values as the argmax of ``semantic_probabilities``.
    """
    height, width = size
    num_classes = weights.shape[1]
    if bool((weights < 0).any()):  # the bounds need non-negative weights; softmax weights always are
        labels, scores, areas, _ = semantic_probabilities(weights, masks, size)
        return labels, scores, areas
    resize = _Resize(masks, size)
    labels = torch.empty(height, width, dtype=torch.int32, device=masks.device)
    score_sum = torch.zeros(num_classes, dtype=torch.float64, device=masks.device)
    for r0 in range(0, height, BAND_ROWS):
        r1 = min(r0 + BAND_ROWS, height)
        probs = resize.band(r0, r1).sigmoid()
        keep = _can_win(weights, *_block_extremes(probs, TILE))  # [R, C, K]
        band_labels, band_rows = labels[r0:r1], slice(0, r1 - r0)
        union = keep.any(1).any(0)
        tile_area = TILE * TILE  # the last row and column of tiles are smaller: an overestimate there
        if int(keep.sum()) * tile_area * 2 > int(union.sum()) * (r1 - r0) * width:
            # Tiles would save little over one product for the band (flat class weights: a random model).
            _label_region(weights, probs, band_labels, score_sum, band_rows, slice(0, width), union)
            continue
        for i, t0 in enumerate(range(0, r1 - r0, TILE)):
            for j, c0 in enumerate(range(0, width, TILE)):
                rows, cols = slice(t0, min(t0 + TILE, r1 - r0)), slice(c0, min(c0 + TILE, width))
                _label_tile(weights, probs, band_labels, score_sum, rows, cols, keep[i, j])
    return _finish(labels, score_sum, num_classes)


def semantic_probabilities(weights: torch.Tensor, masks: Masks, size: tuple[int, int]):
    """As ``semantic_labels``, plus the full per-class map [K, H, W] float32 on the CPU (all classes)."""
    height, width = size
    num_classes = weights.shape[1]
    resize = _Resize(masks, size)
    labels = torch.empty(height, width, dtype=torch.int32, device=masks.device)
    score_sum = torch.zeros(num_classes, dtype=torch.float64, device=masks.device)
    probabilities = torch.empty(num_classes, height, width, dtype=torch.float32)
    for r0 in range(0, height, BAND_ROWS):
        r1 = min(r0 + BAND_ROWS, height)
        sem = semantic_sums(weights, resize.band(r0, r1).sigmoid())
        top, arg = sem.max(dim=0)
        labels[r0:r1] = arg.to(torch.int32)
        score_sum.index_add_(0, arg.flatten(), top.flatten().double())
        probabilities[:, r0:r1] = sem.cpu()
    return (*_finish(labels, score_sum, num_classes), probabilities)
