"""A test hook that kills this process at a named step of the commit protocol: no user flag, no cleanup.

``EBSEG_TEST_DIE_AT=<step>[,<nth>]`` makes the process leave with ``os._exit(DIE_EXIT_CODE)`` (no ``finally``,
no flush, no Ray goodbye: what a SIGKILL or a lost machine leaves behind) the ``nth`` time (default 1) it
reaches ``step``. The count is per process: a retried Ray task runs in a new worker, which counts from zero.
``EBSEG_TEST_DIE_ONCE=<path>`` (optional) makes the death happen once on this machine: the dying process
first creates ``path`` exclusively, and a process that finds it there lives on (so Ray's retry succeeds).

Steps (``STEPS``):
    before-part-write   a worker (``PartWriter``) about to write a part file
    after-part-write    a worker that has written a part file, before the driver hears of it
    after-manifest      the driver, right after creating a shard's manifest, before deleting its orphans
    mid-cleanup         the driver, deleting a committed shard's orphans: before each deletion

``ray_env()`` gives the variables to put in the workers' ``runtime_env``, so the hook reaches them.
"""

from __future__ import annotations

import os
from collections import Counter

DIE_AT_ENV = "EBSEG_TEST_DIE_AT"
DIE_ONCE_ENV = "EBSEG_TEST_DIE_ONCE"
STEPS = ("before-part-write", "after-part-write", "after-manifest", "mid-cleanup")
DIE_EXIT_CODE = 87  # a code no other failure here uses, so a test can tell the hook's death apart

_reached: Counter[str] = Counter()


def parse(value: str) -> tuple[str, int]:
    """``"<step>[,<nth>]"`` -> (step, nth); a misspelt step is an error, never a hook that never fires."""
    step, _, nth = value.partition(",")
    step = step.strip()
    if step not in STEPS:
        raise ValueError(f"{DIE_AT_ENV}={value!r}: the step must be one of {', '.join(STEPS)}")
    count = int(nth) if nth.strip() else 1
    if count < 1:
        raise ValueError(f"{DIE_AT_ENV}={value!r}: nth counts from 1")
    return step, count


def reached(step: str) -> None:
    """Mark ``step`` reached; die here when ``$EBSEG_TEST_DIE_AT`` names it and its count is due."""
    value = os.environ.get(DIE_AT_ENV)
    if not value:
        return
    target, nth = parse(value)
    if step != target:
        return
    _reached[step] += 1
    if _reached[step] != nth:
        return
    once = os.environ.get(DIE_ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process died here already
    os._exit(DIE_EXIT_CODE)


def ray_env() -> dict[str, str]:
    """The hook's variables set in this process, for a ``runtime_env``'s ``env_vars`` (empty when unset)."""
    return {k: os.environ[k] for k in (DIE_AT_ENV, DIE_ONCE_ENV) if os.environ.get(k)}
