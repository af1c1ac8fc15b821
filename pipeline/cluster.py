"""Which Ray a job runs on: the one already connected, the cluster ``RAY_ADDRESS`` names, or a local one.

``ray.init()`` with no address also attaches to whatever cluster ``ray start`` last recorded on this machine
(``/tmp/ray/ray_current_cluster``), even a stopped one: a labelling run on a laptop would then hang on, or
silently run on, a stranger's head. Jobs here start a fresh local Ray unless an address is given explicitly
(``--address``) or by the environment (``RAY_ADDRESS``, which Ray Jobs and KubeRay set for their drivers).
"""

from __future__ import annotations

import os
from typing import Any

ADDRESS_ENV = "RAY_ADDRESS"


def resolve_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``$RAY_ADDRESS``, else None (start a local Ray)."""
    return address or os.environ.get(ADDRESS_ENV) or None


def ensure_ray(address: str | None = None, **local_options: Any) -> str:
    """Connect this process to Ray unless it already is; return ``"connected"``, ``"cluster"`` or ``"local"``.

    local_options: ``ray.init`` keywords used only when a local Ray is started (``num_cpus``, ...).
    """
    import ray

    if ray.is_initialized():
        return "connected"
    target = resolve_address(address)
    if target is not None:
        ray.init(address=target)
        return "cluster"
    # "local" always starts a new single-node Ray owned by this process (stopped when it exits).
    ray.init(address="local", **local_options)
    return "local"
