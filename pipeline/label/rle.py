"""COCO RLE masks, areas and boxes of every class of a label map, from one column-major pass.

A binary mask per class through ``pycocotools.mask.encode`` costs a full pass over the map per class present
(16 ms for a 1024x768 map with a few dozen classes). The runs of the label map in column-major order hold
every class's runs at once: a class's COCO counts are the gaps between its runs and their lengths. The
strings are pycocotools' compressed form, byte for byte (``rleToString``: each count but the first two is
stored as the difference from the count two before it, in 5-bit groups, low group first, offset by 48, bit
0x20 marking that another group follows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Counts of a map up to 2**31 pixels differ by less than 2**32: seven 5-bit groups hold any of them.
_MAX_GROUPS = 7


@dataclass(frozen=True)
class ClassMasks:
    """Per class present in a label map (ascending ids, the no-class value left out).

    class_ids, areas: [C] int64; boxes: [C, 4] int64 ``[x, y, width, height]`` of the class's pixels;
    rles: C COCO compressed RLE strings (the ``counts`` of ``{"size": [H, W], "counts": ...}``).
    """

    class_ids: np.ndarray
    areas: np.ndarray
    boxes: np.ndarray
    rles: list[str]


def _column_runs(labels: np.ndarray):
    """Runs of equal values in column-major order: (values, starts, ends), each [R]."""
    flat = labels.T.ravel()
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    ends = np.append(starts[1:], flat.size)
    return flat[starts], starts, ends


def _compress(counts: np.ndarray, segment_starts: np.ndarray) -> np.ndarray:
    """Concatenated counts of several masks ([N] int64; mask i's from segment_starts[i]) -> their
    compressed strings' bytes, concatenated, and the byte offset where each mask's string starts."""
    position = np.arange(counts.size) - np.repeat(
        segment_starts, np.diff(np.append(segment_starts, counts.size))
    )
    values = counts.copy()
    delta = position > 2
    values[delta] -= counts[np.flatnonzero(delta) - 2]
    groups = np.empty((_MAX_GROUPS, counts.size), np.uint8)
    emitted = np.zeros((_MAX_GROUPS, counts.size), bool)
    active = np.ones(counts.size, bool)
    for g in range(_MAX_GROUPS):
        low = values & 0x1F
        values = values >> 5  # arithmetic shift: negative differences end at -1, as in pycocotools
        more = np.where(low & 0x10, values != -1, values != 0)
        groups[g] = (low | (more << 5)) + 48
        emitted[g] = active
        active &= more
    chars = groups.T[emitted.T]  # each count's groups in order, counts in order
    per_count = emitted.sum(0)
    offsets = np.concatenate([[0], np.cumsum(per_count)])[segment_starts]
    return chars, offsets


def class_masks(labels: np.ndarray) -> ClassMasks:
    """labels: [H, W] uint8 / uint16 class ids, the dtype's maximum meaning no class -> ClassMasks."""
    height = labels.shape[0]
    no_class = np.iinfo(labels.dtype).max
    values, starts, ends = _column_runs(labels)
    keep = values != no_class
    values, starts, ends = values[keep], starts[keep], ends[keep]
    if values.size == 0:
        empty = np.zeros(0, np.int64)
        return ClassMasks(empty, empty, np.zeros((0, 4), np.int64), [])
    order = np.argsort(values, kind="stable")  # runs by class, in column-major order within a class
    values, starts, ends = values[order], starts[order], ends[order]
    class_ids, first, runs_per_class = np.unique(values, return_index=True, return_counts=True)
    last = first + runs_per_class - 1

    # COCO counts per class: [gap, run, gap, run, ..., trailing gap if the mask does not end on a run].
    previous_end = np.append([0], ends[:-1])
    previous_end[first] = 0
    trailing = labels.size - ends[last]
    pairs = np.stack([starts - previous_end, ends - starts], axis=1).ravel()
    counts = np.insert(pairs, 2 * (last + 1)[trailing > 0], trailing[trailing > 0]).astype(np.int64)
    counts_per_class = 2 * runs_per_class + (trailing > 0)
    segment_starts = np.concatenate([[0], np.cumsum(counts_per_class)[:-1]]).astype(np.int64)
    chars, offsets = _compress(counts, segment_starts)
    text = chars.tobytes()
    bounds = np.append(offsets, len(text))
    rles = [text[bounds[i] : bounds[i + 1]].decode("ascii") for i in range(len(class_ids))]

    # Boxes: a run within one column covers its own rows; a run that wraps covers rows 0..H-1.
    col0, col1 = starts // height, (ends - 1) // height
    wraps = col1 > col0
    row0 = np.where(wraps, 0, starts % height)
    row1 = np.where(wraps, height - 1, (ends - 1) % height)
    x0, x1 = np.minimum.reduceat(col0, first), np.maximum.reduceat(col1, first)
    y0, y1 = np.minimum.reduceat(row0, first), np.maximum.reduceat(row1, first)
    boxes = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1).astype(np.int64)
    areas = np.add.reduceat(ends - starts, first).astype(np.int64)
    return ClassMasks(class_ids.astype(np.int64), areas, boxes, rles)
