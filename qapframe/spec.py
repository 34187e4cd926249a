"""The declarative pipeline spec: a pydantic model loaded from YAML or JSON.

Each strategy section is ``{name: <registered name>, ...params}``; the params are validated by that
strategy's own config model, so the spec, the constructor and the validation always agree. Every
problem is reported with its field path and the file it came from.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_serializer, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from qapframe.errors import QapframeError, SpecError
from qapframe.registry import Registry
from qapframe.strategy import Strategy, StrategyConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrategySpec(BaseModel):
    """``{name, **params}`` for one registered strategy; params validated by its own ``Config``."""

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


def _registry(kind: str) -> Registry:
    # Imported lazily: the strategy packages import this module's siblings, not the reverse.
    if kind == "quantizer":
        from qapframe.quantizers.base import QUANTIZERS

        return QUANTIZERS
    from qapframe.strategies.base import PRUNERS, SCORERS

    return {"scorer": SCORERS, "pruner": PRUNERS}[kind]


class _LazyRegistry:
    """Descriptor resolving a spec class's registry on first use (avoids import cycles)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __get__(self, obj: Any, owner: type) -> Registry:
        return _registry(self.kind)


class QuantizerSpec(StrategySpec):
    registry = _LazyRegistry("quantizer")  # type: ignore[assignment]


class ScorerSpec(StrategySpec):
    registry = _LazyRegistry("scorer")  # type: ignore[assignment]


class PrunerSpec(StrategySpec):
    registry = _LazyRegistry("pruner")  # type: ignore[assignment]


class ModelSpec(_Section):
    """Which model to compress; ``toy`` is the LLaVA model shipped inside qapframe."""

    path: str = Field("toy", description="'toy' or a local directory loadable with from_pretrained")
    adapter: str | None = Field(None, description="model adapter name; None picks one by architecture")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    device_map: str | None = Field(None, description="e.g. 'auto' for accelerate big-model loading")


class EvaluationSpec(_Section):
    """What to evaluate on and how much of it."""

    dataset: str = Field("synthetic", description="'synthetic' or a JSONL file of records")
    image_root: str | None = Field(None, description="folder that image paths in the JSONL are relative to")
    split: str = "test"
    num_samples: int | None = Field(200, gt=0, description="evaluation records used; None = all")
    calibration_samples: int = Field(32, ge=0, description="records used to calibrate quantizers")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(8, gt=0)


class OutputSpec(_Section):
    dir: str = Field("runs/qapframe", description="where results.jsonl, summary.md and plots go")


SweepGrid = dict[str, Any]  # dotted path -> list of values (checked when expanding)


class PipelineSpec(_Section):
    """A whole compression-and-evaluation pipeline."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    quantizer: QuantizerSpec | None = None
    scorer: ScorerSpec | None = None
    pruner: PrunerSpec | None = None
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    sweep: list[SweepGrid] = Field(
        default_factory=list,
        description="grids of dotted-path -> list of values; the runs are the union of each grid's product",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("sweep"), dict):  # one grid may be written without the list
            data = {**data, "sweep": [data["sweep"]]}
        if data.get("scorer") is not None and data.get("pruner") is None:
            data = {**data, "pruner": {"name": "topk"}}  # what FastV and QAPruner use
        return data

    @model_validator(mode="after")
    def _pruner_needs_scorer(self) -> "PipelineSpec":
        if self.pruner is not None and self.scorer is None:
            raise ValueError("`pruner` is set but `scorer` is not; a pruner ranks tokens by a scorer's scores")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def expand(self) -> list["PipelineSpec"]:
        """Every configuration the sweep describes (the spec itself when there is no sweep)."""
        return expand_sweep(self.to_dict())


# -- loading and error reporting ---------------------------------------------------------------


def _format_loc(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _problems(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for err in error.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "extra_forbidden", "unknown_name", "value_error", "assertion_error"):
            message += f" (got {err.get('input')!r})"
        if err["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against `qapframe list`"
        path = _format_loc(loc)
        problems.append((f"{prefix}{path}" if prefix else path, message))
    return problems


def parse_spec(data: Any, source: str | None = None) -> PipelineSpec:
    """Validate a spec dict; raise `SpecError` listing every problem with its path."""
    if isinstance(data, PipelineSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError([("(top level)", f"a spec must be a mapping of sections, got {type(data).__name__}")], source)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems(exc), source) from None
    try:
        spec.expand()
    except SpecError as exc:
        raise SpecError(exc.problems, source) from None
    return spec


BUILTIN_SPECS = Path(__file__).resolve().parent / "specs"  # shipped specs, usable by name: `qapframe run qapruner`


def builtin_spec_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_SPECS.glob("*.yaml"))


def resolve_spec_path(path: str | Path) -> Path:
    """An existing file as given, else a shipped spec named by its stem (``qapruner``, ``smoke``)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent == Path(".") and not path.suffix and (BUILTIN_SPECS / f"{path.name}.yaml").is_file():
        return BUILTIN_SPECS / f"{path.name}.yaml"
    raise SpecError(
        [("(file)", f"no such file, and not a built-in spec name (built-in: {', '.join(builtin_spec_names())})")],
        str(path),
    )


def read_spec_file(path: str | Path) -> Any:
    """Parse YAML (or JSON, a YAML subset) into plain data, with the file named in any error."""
    path = resolve_spec_path(path)
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError([("(syntax)", str(exc).replace("\n", " "))], str(path)) from None


def load_spec(spec_or_path: Union[str, Path, dict, PipelineSpec]) -> PipelineSpec:
    """A validated `PipelineSpec` from a path (YAML/JSON), a dict, or a spec (returned as is)."""
    if isinstance(spec_or_path, (str, Path)):
        return parse_spec(read_spec_file(spec_or_path), str(spec_or_path))
    return parse_spec(spec_or_path)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise KeyError(dotted)
        node = child
    node[keys[-1]] = copy.deepcopy(value)


def expand_sweep(data: dict[str, Any]) -> list[PipelineSpec]:
    """Expand ``sweep`` grids into concrete specs (without a sweep section), in a stable order."""
    grids = data.get("sweep") or []
    if isinstance(grids, dict):
        grids = [grids]
    base = {k: v for k, v in data.items() if k != "sweep"}
    if not grids:
        return [PipelineSpec.model_validate(base)] if "sweep" in data else [PipelineSpec.model_validate(data)]
    specs, problems, seen = [], [], set()
    for g, grid in enumerate(grids):
        for field, values in grid.items():
            if not isinstance(values, list) or not values:
                problems.append((f"sweep[{g}].{field}", "must be a non-empty list of values"))
        if problems:
            continue
        for combo in itertools.product(*grid.values()):
            point = copy.deepcopy(base)
            try:
                for field, value in zip(grid, combo):
                    _set_dotted(point, field, value)
            except KeyError as exc:
                problems.append((f"sweep[{g}].{exc.args[0]}", "path crosses a field that is not a section"))
                break
            try:
                spec = PipelineSpec.model_validate(point)
            except ValidationError as exc:
                problems += _problems(exc, prefix=f"sweep[{g}] {dict(zip(grid, combo))}: ")
                continue
            key = json.dumps(spec.to_dict(), sort_keys=True)
            if key not in seen:  # grids may overlap; run each configuration once
                seen.add(key)
                specs.append(spec)
    if problems:
        raise SpecError(problems)
    return specs
