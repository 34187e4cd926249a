"""Reuses the tiny saved LLaVA of the evaluation tests."""

from tests.eval.conftest import tiny_llava_dir  # noqa: F401
