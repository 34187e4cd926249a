"""A tiny ScienceQA saved with `datasets` (skipped where the optional `hf` extra is not installed)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def scienceqa_dir(tmp_path_factory):
    pytest.importorskip("datasets", reason="the hf dataset loader's tests need `pip install qapframe[hf]`")
    from tests.data.fixtures.scienceqa import write_scienceqa

    return write_scienceqa(tmp_path_factory.mktemp("scienceqa"))
