"""jobs.console: our warnings as ``ebseg:`` lines on the console; Ray's on the process's own stderr, which a
quiet run points at Ray's log file."""

from __future__ import annotations

import io
import sys

from ray.util.annotations import RayDeprecationWarning

from ebseg.zoo import RandomWeightsWarning
from jobs.console import show_warning


def test_warnings_go_where_their_owner_logs(monkeypatch):
    console, process = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", console)
    monkeypatch.setattr(sys, "__stderr__", process)
    show_warning(RandomWeightsWarning("random weights"), RandomWeightsWarning, "ebseg/zoo.py", 1)
    show_warning(RayDeprecationWarning("old ray"), RayDeprecationWarning, "/x/ray/data/context.py", 2)
    show_warning(UserWarning("someone else's"), UserWarning, "/x/other.py", 3)
    assert console.getvalue().splitlines()[0] == "ebseg: warning: random weights"
    assert "old ray" in process.getvalue() and "old ray" not in console.getvalue()
    assert "someone else's" not in process.getvalue()  # others' warnings are shown as Python shows them
