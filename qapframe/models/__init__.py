"""Model adapters; importing this package registers the built-ins."""

from qapframe.models.base import ADAPTERS, ModelAdapter, adapter_for
from qapframe.models import llava, llava_next, llava_onevision, qwen_vl  # noqa: F401  (register "llava", "llava_next", "llava_onevision", "qwen*_vl")

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]
