"""Model adapters; importing this package registers the built-ins."""

from qapframe.models.base import ADAPTERS, ModelAdapter, adapter_for
from qapframe.models import llava, llava_next  # noqa: F401  (register "llava", "llava_next")

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]
