"""What every registered strategy shares: a behaviour class paired with its pydantic config, and the spec entry
``{name, **params}`` that names one.

The config model is the single source of truth for a strategy's parameters: the spec's YAML entry,
the constructor's keyword arguments and `qapframe list` all come from it. This module sits below the
strategy families and the pipeline spec; each family subclasses `StrategySpec` with its own registry
(`qapframe.strategies.specs`, `qapframe.quantizers.config`), and `qapframe.spec` composes them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_serializer, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from qapframe.errors import QapframeError
from qapframe.registry import Registry


class StrategyConfig(BaseModel):
    """Base of every strategy's parameters; unknown keys are errors, not silently ignored."""

    # NaN passes every bound check as False-but-not-an-error in some paths and poisons scores; inf is no
    # valid setting of any strategy either, so both are rejected as "not a finite number".
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Strategy:
    """A configurable, registrable piece of behaviour.

    Build it with a config object or with keyword arguments validated by ``Config``.
    """

    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    name: ClassVar[str] = ""  # the registered name; filled in by the registry when empty

    def __init__(self, config: StrategyConfig | dict[str, Any] | None = None, **params: Any):
        if config is not None and params:
            raise TypeError(f"{type(self).__name__}: pass a config or keyword parameters, not both")
        if config is None:
            config = self.Config(**params)
        elif isinstance(config, dict):
            config = self.Config.model_validate(config)
        elif not isinstance(config, self.Config):
            raise TypeError(
                f"{type(self).__name__} expects a {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config = config

    @classmethod
    def parameters(cls) -> dict[str, Any]:
        """Parameter name -> default (``"<required>"`` when there is none), for listings."""
        out: dict[str, Any] = {}
        for field_name, field in cls.Config.model_fields.items():
            if field.is_required():
                out[field_name] = "<required>"
            else:
                default = field.get_default(call_default_factory=True)
                out[field_name] = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        return out

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items())
        return f"{type(self).__name__}({params})"


class StrategySpec(BaseModel):
    """``{name, **params}`` for one registered strategy; params validated by its own ``Config``.

    Subclasses set ``registry``, the registry the name is looked up in.
    """

    model_config = ConfigDict(extra="allow")
    registry: ClassVar[Registry]

    name: str
    _config: StrategyConfig = PrivateAttr()

    @model_validator(mode="after")
    def _validate_params(self) -> "StrategySpec":
        try:
            cls = self.registry.get(self.name)
        except QapframeError as exc:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=PydanticCustomError("unknown_name", str(exc)), loc=("name",), input=self.name)],
            ) from None
        # A nested ValidationError keeps its field locations under this section's path.
        self._config = cls.Config.model_validate(self.model_extra or {})
        return self

    @property
    def strategy_class(self) -> type[Strategy]:
        return self.registry.get(self.name)

    @property
    def config(self) -> StrategyConfig:
        return self._config

    def build(self) -> Strategy:
        return self.strategy_class(self._config)

    @model_serializer(mode="plain")
    def _serialize(self) -> dict[str, Any]:
        return {"name": self.name, **self._config.model_dump(mode="json")}


__all__ = ["Strategy", "StrategyConfig", "StrategySpec"]
