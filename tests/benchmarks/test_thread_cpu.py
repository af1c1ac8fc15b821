"""ThreadCpu attributes CPU to the thread that spent it, including a thread that ended before the end."""

from __future__ import annotations

import threading
import time

from benchmarks.thread_cpu import ThreadCpu, thread_group


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_thread_groups_cut_run_specific_suffixes():
    assert thread_group("StreamingExecutor-dataset_0358DpqDpCimfHRNKm6LpR_0", "python") == "StreamingExecutor"
    assert thread_group("ebseg-commit_4", "python") == "ebseg-commit"
    assert thread_group("Thread-12 (_run)", "python") == "Thread (_run)"
    assert thread_group(None, "client.poll0") == "native:client.poll"


def test_thread_cpu_counts_a_busy_thread_that_ends_inside_the_block():
    with ThreadCpu(interval=0.05) as cpu:

        def spin_then_wait_for_a_sample() -> None:
            _spin(0.3)
            # Ending is what is under test, not the sampler's timing: a thread loses what it spent after
            # the last sample before it ended, and on a loaded box the sampler can be starved for longer
            # than the spin. So wait (idle) until a sample has seen the spin, then end.
            me, deadline = threading.get_native_id(), time.monotonic() + 30
            while cpu._last.get(me, ("", 0.0))[1] < 0.28 and time.monotonic() < deadline:
                time.sleep(0.01)

        worker = threading.Thread(target=spin_then_wait_for_a_sample, name="spinner-dataset_abc")
        worker.start()
        worker.join()
        time.sleep(0.2)  # the sampler saw it before it ended; it is gone from /proc now
        _spin(0.1)
    # 0.3 s spun, read in /proc's 10 ms ticks.
    assert cpu.cpu_s["spinner"] >= 0.28, cpu.cpu_s
    assert 0.05 <= cpu.cpu_s["MainThread"] < cpu.cpu_s["spinner"]
    rate = cpu.per_second(wall_s=1.0, top=1)
    assert next(iter(rate)) == "spinner" and rate["spinner"] >= 280 and "other" in rate
