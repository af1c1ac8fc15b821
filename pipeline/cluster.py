"""Which Ray a job runs on: the one already connected, the cluster ``RAY_ADDRESS`` names, or a local one.

``ray.init()`` with no address also attaches to whatever cluster ``ray start`` last recorded on this machine
(``/tmp/ray/ray_current_cluster``), even a stopped one: a labelling run on a laptop would then hang on, or
silently run on, a stranger's head. Jobs here start a fresh local Ray unless an address is given explicitly
(``--address``) or by the environment (``RAY_ADDRESS``, which Ray Jobs and KubeRay set for their drivers).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

ADDRESS_ENV = "RAY_ADDRESS"


def resolve_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``$RAY_ADDRESS``, else None (start a local Ray)."""
    return address or os.environ.get(ADDRESS_ENV) or None


def ensure_ray(address: str | None = None, *, log_to_driver: bool = True, **local_options: Any) -> str:
    """Connect this process to Ray unless it already is; return ``"connected"``, ``"cluster"`` or ``"local"``.

    log_to_driver: stream the workers' stdout and stderr to this process (Ray's default); either way they
    are in the workers' log files. local_options: ``ray.init`` keywords used only when a local Ray is started
    (``num_cpus``, ...).
    """
    import ray

    if ray.is_initialized():
        return "connected"
    target = resolve_address(address)
    if target is not None:
        ray.init(address=target, log_to_driver=log_to_driver)
        return "cluster"
    # "local" always starts a new single-node Ray owned by this process (stopped when it exits).
    ray.init(address="local", log_to_driver=log_to_driver, **local_options)
    return "local"


@contextlib.contextmanager
def ray_on_demand(
    connect: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Iterator[Callable[[], None]]:
    """A function that connects Ray the first time it is called, so a run starts Ray only once it has
    work: ``connect()`` when given (the CLI's Ray session, left when the block ends), else ``ensure_ray``."""
    with contextlib.ExitStack() as session:
        started = False

        def start() -> None:
            nonlocal started
            if not started:
                session.enter_context(connect()) if connect is not None else ensure_ray()
                started = True

        yield start


# Loggers through which Ray's Python code prints to the console (Ray Data adds its own console handler).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def driver_log_path() -> str:
    """``ebseg-driver-<pid>.err`` in the logs directory of the connected Ray session (beside Ray's own
    logs), or in the temporary directory when this process has no local session directory (Ray Client)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    directory = node.get_logs_dir_path() if node is not None else None
    if not directory or not os.path.isdir(directory):
        directory = tempfile.gettempdir()
    return os.path.join(directory, f"ebseg-driver-{os.getpid()}.err")


@contextlib.contextmanager
def ray_console_to_file(path: str) -> Iterator[str]:
    """While open, Ray's own output in this process goes to ``path``, not the console; yields ``path``.

    Ray writes to the console two ways: its Python loggers (``RAY_LOGGERS``), and its C++ core worker, which
    writes straight to file descriptor 2. Descriptor 2 is pointed at ``path`` and ``sys.stderr`` at a copy of
    the original, so Python code (our messages, the progress line) still reaches the console. Restored on
    exit.
    """
    sys.stderr.flush()
    console_fd = os.dup(2)
    log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in finally)
    os.dup2(log.fileno(), 2)
    before_stderr = sys.stderr
    sys.stderr = io.TextIOWrapper(
        io.FileIO(console_fd, "w", closefd=False), encoding=before_stderr.encoding, line_buffering=True
    )
    moved: list[tuple[logging.Logger, logging.Handler]] = []
    to_file = logging.StreamHandler(log)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        console = [
            h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]  # fmt: skip
        for handler in console:
            logger.removeHandler(handler)
            moved.append((logger, handler))
        if console:  # a logger without console handlers reaches one of these through propagation
            logger.addHandler(to_file)
    try:
        yield path
    finally:
        for name in RAY_LOGGERS:
            logging.getLogger(name).removeHandler(to_file)
        for logger, handler in moved:
            logger.addHandler(handler)
        sys.stderr.flush()
        sys.stderr = before_stderr
        os.dup2(console_fd, 2)
        os.close(console_fd)
        log.close()
