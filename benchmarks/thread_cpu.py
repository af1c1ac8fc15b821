"""CPU time of this process split by thread, for telling what a driver spends its CPU on.

``ThreadCpu`` samples ``/proc/self/task/*/stat`` every ``interval`` seconds while active and keeps each
thread's last reading (a thread that ends, such as Ray Data's executor thread at the end of a run, keeps
what it had at the last sample before it ended). Python threads are named by their ``threading`` name
with run-specific suffixes cut (``StreamingExecutor-dataset_3f..`` -> ``StreamingExecutor``,
``ebseg-commit_4`` -> ``ebseg-commit``); the others (Ray's C++ core-worker threads, gRPC pollers) by
their kernel name, prefixed ``native:``. Linux only (``/proc``); elsewhere it reports nothing.
"""

from __future__ import annotations

import os
import re
import threading

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def thread_group(python_name: str | None, kernel_name: str) -> str:
    """The group a thread's CPU is reported under (see the module docstring)."""
    if python_name is None:
        return f"native:{re.sub(r'[0-9]+$', '', kernel_name)}"
    name = re.sub(r"-dataset_\w+$", "", python_name)  # Ray Data names threads after the dataset
    name = re.sub(r"^Thread-[0-9]+ ", "Thread ", name)
    return re.sub(r"_[0-9]+$", "", name)


def _read_threads() -> dict[int, tuple[str, float]]:
    """{tid: (kernel name, user + system CPU seconds)} of this process's threads now."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # ended since the listing
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) * _TICK_S)
    return out


class ThreadCpu:
    """A context manager: ``.cpu_s`` ({group: CPU seconds spent inside the block}) once it exits."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.cpu_s: dict[str, float] = {}
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thread-cpu", daemon=True)

    def _sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid, (kernel, cpu) in _read_threads().items():
            self._last[tid] = (thread_group(names.get(tid), kernel), cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ThreadCpu:
        self._start = {tid: cpu for tid, (_, cpu) in _read_threads().items()}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        for tid, (group, cpu) in self._last.items():
            spent = cpu - self._start.get(tid, 0.0)
            if spent > 0:
                self.cpu_s[group] = self.cpu_s.get(group, 0.0) + spent

    def per_second(self, wall_s: float, top: int = 8) -> dict[str, float]:
        """The ``top`` groups' CPU in ms per wall second over ``wall_s``, largest first, the rest summed."""
        ranked = sorted(self.cpu_s.items(), key=lambda kv: -kv[1])
        rate = {k: round(v / wall_s * 1e3, 1) for k, v in ranked[:top]}
        rest = sum(v for _, v in ranked[top:])
        if rest > 0:
            rate["other"] = round(rest / wall_s * 1e3, 1)
        return rate
