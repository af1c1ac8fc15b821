"""Shared fixtures: the reference folder beside the checkout and small real images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def require_reference() -> Path:
    """The reference folder, or a skip where it is absent (a user's clone). CI always has it."""
    if not REFERENCE.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must see the reference folder at {REFERENCE}")
        pytest.skip(f"reference data not found at {REFERENCE} (it sits beside the checkout in CI)")
    return REFERENCE


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return require_reference()


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Real photos of different sizes and aspect ratios (uint8 RGB)."""
    from skimage import data

    gray = data.camera()  # 512x512 grayscale
    return [data.astronaut(), data.coffee(), np.stack([gray] * 3, axis=-1)[:300, :200].copy()]


# --- Shared services: one S3-compatible server and one local Ray per test session

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A moto S3 server over HTTP on a loopback port; the environment points boto3/s3fs at it."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        self.env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint_url}
        self._count = 0

    def bucket(self, prefix: str = "bkt") -> str:
        """Create a fresh, empty bucket and return its name (3+ characters, unique in the session)."""
        import boto3

        self._count += 1
        name = f"{prefix}-{self._count}".lower()
        boto3.client("s3", endpoint_url=self.endpoint_url).create_bucket(Bucket=name)
        return name

    def filesystem(self):
        import s3fs

        # A fresh instance: s3fs caches listings per instance, and tests write behind each other's backs.
        return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API over HTTP (moto server mode), with the AWS variables set for this process."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(f"http://127.0.0.1:{port}")
    patch = pytest.MonkeyPatch()
    for key, value in s3.env.items():
        patch.setenv(key, value)
    yield s3
    patch.undo()
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session. Workers get the S3 environment, so they reach the test server."""
    import ray

    ray.init(
        address="local",  # never attach to a head another test (or `ray start`) left behind
        num_cpus=8,  # logical slots: decode tasks, actors and train workers share the 2 real cores
        include_dashboard=False,
        object_store_memory=1 << 30,
        runtime_env={"env_vars": {**s3_server.env, "OMP_NUM_THREADS": "1"}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def searchable(ray_local, tmp_path_factory):
    """A shapes set labelled with and without proposals, read by the search tests of two packages
    (``tests/pipeline/results/searchable_support.py``): labelled once, never written to."""
    from tests.pipeline.results.searchable_support import label_searchable

    return label_searchable(tmp_path_factory.mktemp("searchable"))
