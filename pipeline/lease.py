"""One run at a time per output: a lease object with a heartbeat and an expiry.

Two runs into one output would still commit every shard once (manifests are created exclusively), but they
would label the same images twice and each would report the other's shards as lost races. A second run is
refused instead, naming the one that holds the output, and a crashed run never locks an output forever:
its lease expires ``LEASE_TTL_S`` after its last heartbeat (at once when its process is known dead).

Layout: ``OUT/_lease/<generation>.json``, generations numbered ``00000001``, ``00000002``, ... Each holds
``{run_id, host, pid, kind, token, started, expires}``. To take the output a run reads the newest generation;
when there is none, or it has expired, or its process is dead on this same machine, the run creates the
next generation exclusively (``storage.create_exclusive``: of two runs taking over at once, one wins, the
other is refused). A heartbeat thread rewrites the holder's own object with a later expiry every ttl/4.
The holder has lost the output when a newer generation exists, or when it could not renew before its own
expiry; :meth:`Lease.check` says so (the commit calls it before each manifest). Release deletes the
holder's object. Expiries are wall-clock times: hosts sharing an output are assumed to keep their clocks
within a few seconds of each other (NTP), well inside the TTL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from pipeline import storage

LEASE_DIR = "_lease"
LEASE_TTL_S = 60.0  # a crashed holder blocks the output at most this long after its last heartbeat
_GENERATION_DIGITS = 8

log = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """Another live run holds the output."""


class LeaseLostError(RuntimeError):
    """This run no longer holds the output's lease (taken over after an expiry, or not renewed in time)."""


@dataclass(frozen=True)
class Holder:
    """One lease generation's content. ``started`` / ``expires``: seconds since the epoch."""

    run_id: str
    host: str
    pid: int
    kind: str
    token: str  # tells two holders of one generation number apart (a number is reused after a release)
    started: float
    expires: float

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds")
        return f"{self.kind} run {self.run_id} (host {self.host}, pid {self.pid}, since {since})"

    def dead_here(self) -> bool:
        """True when the holder ran on this machine and its process is gone: its lease can go at once."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _generation(name: str) -> int | None:
    stem = name.rsplit("/", 1)[-1]
    if stem.endswith(".json") and stem[:-5].isdigit():
        return int(stem[:-5])
    return None


def _generations(fs, root: str) -> list[int]:
    directory = storage.join(root, LEASE_DIR)
    fs.invalidate_cache(directory)
    try:
        names = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    return sorted(g for g in map(_generation, names) if g is not None)


def _newest(fs, root: str) -> tuple[int, Holder | None]:
    """The newest generation number (0 when none) and its holder (None when none, or unreadable)."""
    generations = _generations(fs, root)
    if not generations:
        return 0, None
    newest = generations[-1]
    try:
        # One GET (cat_file): s3fs's open() pins the ETag and fails when a heartbeat rewrites the object
        # between its HEAD and its GET.
        record = json.loads(fs.cat_file(_path(root, newest)))
    except FileNotFoundError:  # released between the listing and the read
        return newest, None
    return newest, Holder(**record)


def _path(root: str, generation: int) -> str:
    return storage.join(root, LEASE_DIR, f"{generation:0{_GENERATION_DIGITS}d}.json")


def _encode(holder: Holder) -> bytes:
    return (json.dumps(asdict(holder), indent=2, sort_keys=True) + "\n").encode()


class Lease:
    """A held lease; renewed by a heartbeat thread until :meth:`release`. A context manager."""

    def __init__(self, fs, root: str, generation: int, holder: Holder, ttl_s: float):
        self.fs, self.root = fs, root
        self.generation, self.holder, self.ttl_s = generation, holder, ttl_s
        self._valid_until = time.monotonic() + ttl_s  # renewal failing past this is a lost lease
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="ebseg-lease", daemon=True)
        self._thread.start()

    @property
    def path(self) -> str:
        return _path(self.root, self.generation)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as e:  # a store hiccup: try again next beat; check() fails past expiry
                log.warning("lease %s not renewed: %s", self.path, storage.redact(e))

    def renew(self) -> None:
        """Push our expiry ``ttl_s`` ahead, unless a newer generation has taken the output."""
        started = time.monotonic()
        self._check_newest()
        holder = Holder(**{**asdict(self.holder), "expires": time.time() + self.ttl_s})
        storage.write_bytes_atomic(self.fs, self.path, _encode(holder))
        self.holder, self._valid_until = holder, started + self.ttl_s

    def _check_newest(self) -> None:
        if self._lost is None:
            generation, holder = _newest(self.fs, self.root)
            if generation != self.generation or holder is None or holder.token != self.holder.token:
                self._lost = f"{holder.describe()} took it over" if holder else "its lease object is gone"
        if self._lost is not None:
            raise LeaseLostError(
                f"this run lost its lease on {storage.full_uri(self.fs, self.root)}: {self._lost}; "
                "it stops committing (rerun once the other run has finished)"
            )

    def check(self) -> None:
        """Raise LeaseLostError unless this run still holds the output (a newer generation, or no renewal
        for a whole TTL, means another run may be writing)."""
        self._check_newest()
        if time.monotonic() > self._valid_until:
            self._lost = f"not renewed for {self.ttl_s:g} s"
            self._check_newest()

    def release(self) -> None:
        """Stop the heartbeat and delete our lease object (unless another run has taken over)."""
        self._stop.set()
        self._thread.join()
        try:
            generation, holder = _newest(self.fs, self.root)
            if generation == self.generation and holder is not None and holder.token == self.holder.token:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.path)
        except Exception as e:  # never hide the error a run ends with; the lease expires on its own
            log.warning(
                "lease %s not released (it expires in %g s): %s", self.path, self.ttl_s, storage.redact(e)
            )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(fs, root: str, *, run_id: str, kind: str, ttl_s: float | None = None) -> Lease:
    """Take the lease on the output at ``root``, or raise LeaseHeldError naming the live holder."""
    ttl = LEASE_TTL_S if ttl_s is None else ttl_s
    generation, holder = _newest(fs, root)
    now = time.time()
    if holder is not None and holder.expires > now and not holder.dead_here():
        raise _held(fs, root, holder, now)
    mine = Holder(
        run_id=run_id,
        host=socket.gethostname(),
        pid=os.getpid(),
        kind=kind,
        token=uuid.uuid4().hex,
        started=now,
        expires=now + ttl,
    )
    if not storage.create_exclusive(fs, _path(root, generation + 1), _encode(mine)):
        _, winner = _newest(fs, root)  # another run took over at the same moment
        raise _held(fs, root, winner, time.time())
    for older in _generations(fs, root):  # those before ours are dead: a released output holds none
        if older <= generation:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(_path(root, older))
    return Lease(fs, root, generation + 1, mine, ttl)


def _held(fs, root: str, holder: Holder | None, now: float) -> LeaseHeldError:
    if holder is None:  # the winner of a race has released already
        return LeaseHeldError(f"{storage.full_uri(fs, root)} was taken by another run just now; try again")
    return LeaseHeldError(
        f"{storage.full_uri(fs, root)} is in use by {holder.describe()}; its lease expires in "
        f"{max(0, round(holder.expires - now))} s unless renewed. Wait for that run to finish, or write to "
        "another output."
    )
