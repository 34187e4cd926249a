"""Model adapters; importing this package registers the built-ins."""

from qapframe.models.base import ADAPTERS, ModelAdapter, adapter_for

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]
