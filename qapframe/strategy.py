"""What every registered strategy shares: a behaviour class paired with its pydantic config.

The config model is the single source of truth for a strategy's parameters: the spec's YAML entry,
the constructor's keyword arguments and `qapframe list` all come from it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


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
