"""The declarative pipeline spec: a pydantic model loaded from YAML or JSON.

Each strategy section is ``{name: <registered name>, ...params}``; the params are validated by that
strategy's own config model, so the spec, the constructor and the validation always agree. Every
problem is reported with its field path and the file it came from.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from qapframe.data.base import DATASETS
from qapframe.data.loading import DatasetField, DatasetSpec
from qapframe.errors import SpecError
from qapframe.registry import Registry
from qapframe.sources import model_path_problem  # re-exported: it used to live here
# Reading spec files (YAML/JSON, shipped specs by name) lives beside; re-exported, where it used to be defined.
from qapframe.spec_files import BUILTIN_SPECS, builtin_spec_names, read_spec_file, resolve_spec_path
# The strategy entries live beside their strategies; re-exported here, where they used to be defined.
from qapframe.strategies.base import requirements_of
from qapframe.strategies.specs import PrunerSpec, ScorerSpec
from qapframe.strategy import Strategy, StrategyConfig, StrategySpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN is never a setting (see StrategyConfig)


def _quantizers() -> Registry:
    # Imported lazily: qapframe.quantizers imports `StrategySpec` (re-exported here) for its own sub-specs.
    from qapframe.quantizers.base import QUANTIZERS

    return QUANTIZERS


class _LazyRegistry:
    """Descriptor resolving a spec class's registry on first use (the quantizers package imports this module)."""

    def __get__(self, obj: Any, owner: type) -> Registry:
        return _quantizers()


class QuantizerSpec(StrategySpec):
    registry = _LazyRegistry()  # type: ignore[assignment]


class ModelSpec(_Section):
    """Which model to compress: a named model (``toy``: the LLaVA shipped inside qapframe), a directory or a hub id."""

    path: str = Field("toy", description="a named model (see `qapframe list`), a local directory loadable with "
                                         "from_pretrained, or a Hugging Face hub id (namespace/name)")
    revision: str | None = Field(None, description="with a hub id: the branch, tag or commit to load (None: main)")
    adapter: str | None = Field(None, description="model adapter name; None picks one by architecture")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    device_map: str | None = Field(None, description="e.g. 'auto' for accelerate big-model loading")


_DATASET_FORMS = ("a string ('synthetic', a .jsonl file, or a folder of <split>.jsonl) or a registered dataset "
                  "loader with its options, {name: <loader>, ...options}")


class EvaluationSpec(_Section):
    """What to evaluate on and how much of it."""

    dataset: DatasetField = Field("synthetic", description=f"{_DATASET_FORMS}; the loaders and their options: "
                                                          "docs/architecture.md")
    image_root: str | None = Field(None, description="folder that image paths in the JSONL are relative to, for a "
                                                     "`dataset` string ({name: jsonl} entries carry their own)")
    split: str = "test"
    num_samples: int | None = Field(200, gt=0, description="evaluation records used; None = all")
    calibration_dataset: DatasetField | None = Field(
        None, description="where calibration records come from (its calibration split), in the forms of `dataset`; "
                          "None: the calibration split of `dataset`")
    calibration_samples: int = Field(32, ge=0, description="records used to calibrate quantizers")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(8, gt=0)

    @field_validator("dataset", "calibration_dataset", mode="before")
    @classmethod
    def _dataset_form(cls, value: Any) -> Any:
        # A mapping is validated here, so its errors carry paths under the field (evaluation.dataset.columns...),
        # not under each member of the union as well.
        if isinstance(value, dict):
            if "name" not in value:
                raise ValueError(f"a dataset loader entry needs `name`, one of: {', '.join(DATASETS.names())}")
            return DatasetSpec.model_validate(value)
        if value is None or isinstance(value, (str, DatasetSpec)):
            return value
        raise ValueError(f"must be {_DATASET_FORMS}, got {value!r}")

    @model_validator(mode="after")
    def _image_root_with_a_string(self) -> "EvaluationSpec":
        if self.image_root is not None and isinstance(self.dataset, DatasetSpec):
            message = ("applies to a dataset given as a string; a {name: ...} dataset takes its own options "
                       "(for jsonl: dataset.image_root)")
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=("image_root",),
                                  input=self.image_root)],
            )
        return self

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        # Left out while unset, so that a spec written before the field existed keeps its run keys (results.jsonl).
        if data.get("calibration_dataset") is None:
            data.pop("calibration_dataset", None)
        return data


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

    @field_validator("sweep")
    @classmethod
    def _finite_sweep_values(cls, grids: list[SweepGrid]) -> list[SweepGrid]:
        # Checked here: expanding goes through JSON, where NaN would arrive as null ("got None").
        for g, grid in enumerate(grids):
            for field, values in grid.items():
                for value in values if isinstance(values, list) else []:
                    if isinstance(value, float) and not math.isfinite(value):
                        raise ValueError(f"{field} in grid {g}: {value!r} is not a finite number")
        return grids

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

    @model_validator(mode="after")
    def _scorer_and_pruner_compose(self) -> "PipelineSpec":
        # The check every install makes, here too, so that `qapframe validate` reports it before a model loads.
        if self.scorer is not None and self.pruner is not None:
            try:
                requirements_of(self.scorer.build(), self.pruner.build())
            except ValueError as exc:
                raise ValidationError.from_exception_data(
                    type(self).__name__,
                    [InitErrorDetails(type=PydanticCustomError("composition", str(exc)), loc=("pruner",),
                                      input=self.pruner.name)],
                ) from None
        return self

    @model_validator(mode="after")
    def _one_calibration_count(self) -> "PipelineSpec":
        # evaluation.calibration_samples decides how many records the runner builds; a quantizer that
        # took a different number would silently re-subsample them (and differently under torchrun,
        # where each rank gets a share), so the quantizer's own count may only repeat it.
        wanted = getattr(self.quantizer.config, "calibration_samples", None) if self.quantizer else None
        built = self.evaluation.calibration_samples
        if wanted is not None and wanted != built:
            message = (
                f"{wanted} disagrees with evaluation.calibration_samples ({built}), which decides how many "
                "calibration records are built; drop quantizer.calibration_samples (it then uses them all) "
                "or set both to the same number"
            )
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=PydanticCustomError("disagreement", message),
                                  loc=("quantizer", "calibration_samples"), input=wanted)],
            )
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


SECTIONS = tuple(PipelineSpec.model_fields)  # model, quantizer, scorer, pruner, evaluation, output, sweep


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None`` or ``Optional[X]``."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _fields_at(data: Any, loc: tuple) -> tuple[str, list[str]] | None:
    """``(where, valid names)`` for an unknown key at ``loc`` in ``data``: ``where`` is ``""`` at the top
    level (sections), else the section or strategy holding the key; None when the path cannot be followed
    (a strategy with an unknown name, a list, ...)."""
    cls: type[BaseModel] | None = PipelineSpec
    where, strategy = "", False
    node = data
    for key in loc[:-1]:
        if cls is None or not isinstance(key, str) or key not in cls.model_fields or not isinstance(node, dict):
            return None
        node = node.get(key)
        cls, where, strategy = _model_class(cls.model_fields[key].annotation), key, False
        if cls is not None and issubclass(cls, StrategySpec):
            name = node.get("name") if isinstance(node, dict) else None
            if not isinstance(name, str) or name not in cls.registry:
                return None
            cls, where, strategy = cls.registry.get(name).Config, f"{cls.registry.kind} {name!r}", True
    if cls is None:
        return None
    return where, (["name"] if strategy else []) + list(cls.model_fields)


def _unknown_field(data: Any, loc: tuple) -> str:
    key = str(loc[-1]) if loc else ""
    found = _fields_at(data, loc)
    if found is None:
        return f"unknown field {key!r}; check the spelling against `qapframe list`"
    where, names = found
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if not where:
        return f"unknown section {key!r}{hint}; valid sections: {', '.join(names)}"
    return f"unknown field {key!r} of {where}{hint}; valid fields: {', '.join(names) or '(none)'}"


def _problems(error: ValidationError, prefix: str = "", data: Any = None) -> list[tuple[str, str]]:
    problems = []
    for err in error.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "extra_forbidden", "unknown_name", "value_error", "assertion_error",
                               "disagreement", "finite_number"):
            message += f" (got {err.get('input')!r})"
        if err["type"] == "finite_number":
            message = f"must be a finite number, got {err.get('input')!r}"
        if err["type"] == "extra_forbidden":
            message = _unknown_field(data, loc)
        path = _format_loc(loc)
        problems.append((f"{prefix}{path}" if prefix else path, message))
    return problems


def parse_spec(data: Any, source: str | None = None) -> PipelineSpec:
    """Validate a spec dict; raise `SpecError` listing every problem with its path."""
    if isinstance(data, PipelineSpec):
        return data
    if data is None:
        raise SpecError([("(file)", f"the spec is empty; write a mapping of sections: {', '.join(SECTIONS)}")], source)
    if not isinstance(data, dict):
        raise SpecError(
            [("(top level)", f"a spec must be a mapping of sections ({', '.join(SECTIONS)}), got a {type(data).__name__}")],
            source,
        )
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems(exc, data=data), source) from None
    try:
        spec.expand()
    except SpecError as exc:
        raise SpecError(exc.problems, source) from None
    return spec


def load_spec(spec_or_path: Union[str, Path, dict, PipelineSpec]) -> PipelineSpec:
    """A validated `PipelineSpec` from a path (YAML/JSON), a dict, or a spec (returned as is)."""
    if isinstance(spec_or_path, (str, Path)):
        return parse_spec(read_spec_file(spec_or_path), str(spec_or_path))
    return parse_spec(spec_or_path)


# -- model paths -------------------------------------------------------------------------------


def model_path_problems(spec: PipelineSpec) -> list[tuple[str, str]]:
    """`model_path_problem` for every distinct ``model.path`` of the spec's configurations."""
    paths = dict.fromkeys(cfg.model.path for cfg in spec.expand())
    swept = len(paths) > 1
    problems = []
    for path in paths:
        problem = model_path_problem(path)
        if problem:
            problems.append(("sweep: model.path" if swept else "model.path", problem))
    return problems


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
                problems += _problems(exc, prefix=f"sweep[{g}] {dict(zip(grid, combo))}: ", data=point)
                continue
            key = json.dumps(spec.to_dict(), sort_keys=True)
            if key not in seen:  # grids may overlap; run each configuration once
                seen.add(key)
                specs.append(spec)
    if problems:
        raise SpecError(problems)
    return specs


__all__ = [
    "BUILTIN_SPECS", "EvaluationSpec", "ModelSpec", "OutputSpec", "PipelineSpec", "PrunerSpec", "QuantizerSpec",
    "SECTIONS", "ScorerSpec", "Strategy", "StrategyConfig", "StrategySpec", "SweepGrid", "builtin_spec_names",
    "expand_sweep", "load_spec", "model_path_problem", "model_path_problems", "parse_spec", "read_spec_file",
    "resolve_spec_path",
]
