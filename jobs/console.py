"""What every ``ebseg`` command prints through: one ``ebseg:`` line per message, exit statuses, errors a
user can act on, and our own warnings said in words."""

from __future__ import annotations

import os
import sys
import warnings

from pipeline.storage import redact

EXIT_FAILED, EXIT_USAGE = 1, 2
# Errors a user can act on: printed as one line, no traceback.
# OSError covers missing files, permissions, connections and a disk that fills mid-run ("No space left on
# device"): what was committed stays, and a rerun finishes the job.
JOB_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError)


class CommandError(RuntimeError):
    """A command that failed for a reason the message explains (exit status 1)."""


def say(message: str) -> None:
    # Messages quote URIs (errors above all): a URL's user:password@ never reaches the terminal or a log.
    print(f"ebseg: {redact(message)}", file=sys.stderr, flush=True)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (random weights, ...) as one ``ebseg: warning:`` line; others as Python shows them,
    Ray's on the process's own stderr (``sys.__stderr__``), which is Ray's log file while a run keeps Ray's
    lines off the console (``pipeline.cluster.ray_console_to_file``)."""
    if category.__module__.split(".")[0] in ("ebseg", "pipeline", "jobs"):
        say(f"warning: {message}")
    elif file is None and (category.__module__.startswith("ray") or f"{os.sep}ray{os.sep}" in str(filename)):
        sys.__stderr__.write(warnings.formatwarning(message, category, filename, lineno, line))
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning
