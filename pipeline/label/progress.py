"""A progress line for a labelling run: shards done of those listed, images, images/s, and once the listing
is complete (the total is known) the estimated time left.

On a terminal the line is rewritten in place (carriage return) a few times a second; elsewhere (Ray job
logs, CI, files) a plain line is printed every ``interval`` seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Call :meth:`update` as work completes and :meth:`close` at the end (prints the final line)."""

    def __init__(
        self,
        *,
        total_shards: int,
        skipped_shards: int = 0,
        stream: TextIO | None = None,
        interval: float = 5.0,
        enabled: bool = True,
        listing_complete: bool = True,
        verb: str = "labelling",
    ):
        self._stream = stream
        self.verb = verb  # the line's first word: "relabelling" for a relabel run
        self.total_shards = total_shards
        self.skipped_shards = skipped_shards
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.interval = 0.2 if self.tty else interval
        self.start = time.monotonic()
        self._last = -float("inf")
        self._width = 0
        self.shards = 0
        self.images = 0
        self.listing_complete = listing_complete  # False while a streaming listing may add shards

    @property
    def stream(self) -> TextIO:
        # sys.stderr when each line is written, not when the run began: the CLI points sys.stderr at the
        # console again once Ray has started and taken file descriptor 2 for its log file.
        return self._stream if self._stream is not None else sys.stderr

    def listed(self, total_shards: int, skipped_shards: int, *, complete: bool) -> None:
        """The listing so far: ``total_shards`` found, ``skipped_shards`` of them already committed;
        ``complete`` once no more will come."""
        self.total_shards, self.skipped_shards = total_shards, skipped_shards
        self.listing_complete = complete

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        done = self.skipped_shards + self.shards
        skipped = f" ({self.skipped_shards} skipped)" if self.skipped_shards else ""
        listed = "" if self.listing_complete else " listed so far"
        return (
            f"{self.verb}: {done}/{self.total_shards} shards{listed}{skipped}, {self.images} images, "
            f"{rate:.2f} images/s, {elapsed:.0f} s{self._eta(elapsed)}"
        )

    def _eta(self, elapsed: float) -> str:
        """`` , ETA 3m20s`` from the shard rate of this run, once the total is known and a shard is done."""
        left = self.total_shards - self.skipped_shards - self.shards
        if not self.listing_complete or self.shards == 0 or left <= 0:
            return ""
        seconds = round(elapsed / self.shards * left)
        return f", ETA {seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f", ETA {seconds}s"

    def update(self, *, shards: int = 0, images: int = 0) -> None:
        """Add ``shards`` committed and ``images`` labelled since the last call; print when it is time."""
        self.shards += shards
        self.images += images
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._print()

    def _print(self, final: bool = False) -> None:
        if self.tty:
            line = self.line()
            # Pad over a longer previous line instead of relying on terminal escape codes.
            self.stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = len(line)
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._print(final=True)
