"""Fixtures of the model-library tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; open_clip downloads through it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
