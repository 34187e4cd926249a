"""Model adapters: the only code that knows where an architecture keeps its vision tokens."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from qapframe.registry import Registry
from qapframe.strategies.base import Pruner, Scorer
from qapframe.strategies.context import QuantSettings

ADAPTERS: Registry[type["ModelAdapter"]] = Registry("model adapter", "qapframe.models", ("qapframe.models",))


class ModelAdapter(abc.ABC):
    """Installs token scoring and pruning into one family of multimodal models."""

    name: ClassVar[str] = ""

    @classmethod
    @abc.abstractmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        """Whether this adapter handles ``model`` (checked in registration order)."""

    @abc.abstractmethod
    def install(
        self,
        model: torch.nn.Module,
        scorer: Scorer,
        pruner: Pruner,
        quant: QuantSettings | None = None,
        seed: int = 0,
    ) -> torch.nn.Module:
        """Make ``model.forward``/``generate`` prune vision tokens; return the model."""

    @abc.abstractmethod
    def remove(self, model: torch.nn.Module) -> torch.nn.Module:
        """Undo `install`, restoring the unmodified behaviour."""


def adapter_for(model: torch.nn.Module, name: str | None = None) -> ModelAdapter:
    """The adapter registered as ``name``, or the first one whose ``matches(model)`` is true."""
    if name is not None:
        return ADAPTERS.get(name)()
    for entry in ADAPTERS.entries():
        if entry.obj.matches(model):
            return entry.obj()
    raise ValueError(
        f"no model adapter handles {type(model).__name__}; registered adapters: "
        f"{', '.join(ADAPTERS.names()) or '(none)'} (plugins add more through the 'qapframe.models' entry points)"
    )
