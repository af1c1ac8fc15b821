"""Training pairs that cannot train: skipped, counted per epoch, refused when they outnumber the good ones.

The augmentation stage marks such a pair instead of failing (``AugmentBatch`` rows with a ``problem``:
unreadable, size_mismatch, class_out_of_range, all_ignore; see ``pipeline.pairs.PairError``). Each worker
re-batches the good rows into whole batches (:func:`rebatch`) and keeps an :class:`EpochTally`; at the end of
an epoch the workers add their tallies, rank 0 logs them, and more bad pairs than good ones stops the run
(:class:`BadPairsError`): a set that is mostly broken is a wrong path or layout, not noise to train through.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from pipeline.pairs import PAIR_PROBLEMS

GOOD = "good"
TALLY_KEYS = (GOOD, *PAIR_PROBLEMS)  # the order of a tally as a vector (for all-reduce)
_EXAMPLES = 5  # image ids kept per epoch for the log line


class BadPairsError(ValueError):
    """More than half of an epoch's pairs could not train (a problem of the data, as a ValueError)."""


@dataclass
class EpochTally:
    """The pairs of one epoch a worker has seen: good ones and bad ones by reason, a few bad image ids."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, problem: str, image_id: str) -> None:
        self.counts[problem or GOOD] += 1
        if problem and len(self.examples) < _EXAMPLES:
            self.examples.append(f"{image_id} ({problem})")

    def vector(self) -> list[int]:
        return [int(self.counts[k]) for k in TALLY_KEYS]

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> EpochTally:
        return cls(Counter({k: int(v) for k, v in counts.items() if v}))

    @property
    def bad(self) -> int:
        return sum(v for k, v in self.counts.items() if k != GOOD)

    def as_record(self, epoch: int) -> dict[str, int]:
        """The metrics fields of a finished epoch: ``bad_pairs`` and ``bad_pairs/<reason>``."""
        record = {"bad_pairs_epoch": epoch, "bad_pairs": self.bad}
        record.update({f"bad_pairs/{k}": int(self.counts[k]) for k in PAIR_PROBLEMS if self.counts[k]})
        return record

    def check(self, epoch: int, data: str) -> None:
        """Raise :class:`BadPairsError` when more than half of the pairs seen were bad."""
        good = int(self.counts[GOOD])
        if self.bad > good:
            reasons = ", ".join(f"{k}: {self.counts[k]}" for k in PAIR_PROBLEMS if self.counts[k])
            seen = f"; e.g. {', '.join(self.examples)}" if self.examples else ""
            total = self.bad + good
            raise BadPairsError(
                f"{data}: epoch {epoch}: {self.bad} of {total} pairs cannot train ({reasons}){seen}; "
                "more than half is not noise: check the data path, the layout and the vocabulary"
            )


def rebatch(
    chunks: Iterable[Mapping[str, np.ndarray]],
    batch_size: int,
    tally: EpochTally,
    *,
    start: int = 0,
    skip: int = 0,
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Chunks of ``AugmentBatch`` rows (any sizes, in order) -> (whole batch of good rows, rows read).

    Yields batches {"image_id", "epoch", "image", "label"} of ``batch_size`` good rows after dropping the
    first ``skip`` such batches, each with the count of rows read up to its last row, counted from ``start``
    (the rows an earlier run of this epoch had read: a resume point). Rows of dropped batches were counted
    before the resume, so only rows after them enter ``tally``. A last partial batch is dropped, as
    ``drop_last`` would.
    """
    pending: list[tuple[Mapping[str, np.ndarray], int]] = []
    read, emitted = start, 0
    for chunk in chunks:
        problems = chunk["problem"]
        for i in range(len(problems)):
            read += 1
            if emitted >= skip:
                tally.add(str(problems[i]), str(chunk["image_id"][i]))
            if problems[i]:
                continue
            pending.append((chunk, i))
            if len(pending) == batch_size:
                if emitted >= skip:
                    yield _stack(pending), read
                emitted += 1
                pending = []


def _stack(rows: list[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    out = {}
    for key in ("image_id", "epoch", "image", "label"):
        out[key] = np.stack([chunk[key][i] for chunk, i in rows])
    return out
