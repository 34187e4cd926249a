"""Run labels: what a configuration quantizes, scores and keeps, in a short human-readable form.

Imports no model code, so `qapframe validate` can describe a spec's runs without loading torch models.
"""

from __future__ import annotations

from typing import Any, Sequence

from qapframe.spec import PipelineSpec, StrategySpec


def strategy_label(spec: StrategySpec | None, none: str, skip: Sequence[str] = ()) -> str:
    """``name`` plus the fewest parameters that reproduce its config, e.g. ``rtn(scheme=W4A4)``
    (fields derived from others, like a scheme's bit widths, and defaults are left out)."""
    if spec is None:
        return none
    config_cls = spec.strategy_class.Config
    full = spec.config.model_dump(mode="json")
    given = dict(full)
    for name in list(full):  # drop every field the rest already implies
        trial = {k: v for k, v in given.items() if k != name}
        try:
            implied = config_cls.model_validate(trial).model_dump(mode="json") == full
        except ValueError:
            implied = False
        if implied:
            given = trial
    params = ", ".join(f"{k}={v}" for k, v in given.items() if k not in skip)
    return f"{spec.name}({params})" if params else spec.name


def _retention(spec: PipelineSpec) -> float | None:
    if spec.pruner is None:
        return None
    config = spec.pruner.config
    if getattr(config, "num_tokens", None) is not None:
        return None  # an absolute budget; filled in from the measured token counts
    return getattr(config, "retention", None)


def _dotted(data: dict, path: str) -> Any:
    for key in path.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def describe(spec: PipelineSpec, varied: Sequence[str] = ()) -> dict[str, Any]:
    """Quantizer, scorer and retention of a configuration, and a label naming them (plus ``varied``:
    dotted sweep paths outside the strategy sections, e.g. ``evaluation.max_new_tokens``)."""
    quantizer = strategy_label(spec.quantizer, "fp")
    scorer = strategy_label(spec.scorer, "dense")
    pruner = strategy_label(spec.pruner, "", skip=("retention", "num_tokens"))  # "" when dense
    retention = _retention(spec)
    if spec.pruner is None:
        budget = "dense"
    else:
        budget = f"{100 * retention:g}%" if retention else f"{spec.pruner.config.num_tokens} tokens"
    pruned_by = f" + {pruner} pruner" if pruner not in ("", "topk") else ""  # the default pruner goes unnamed
    label = f"{quantizer} / {scorer}{pruned_by} / {budget}"
    if varied:
        data = spec.to_dict()
        label += " [" + ", ".join(f"{path}={_dotted(data, path)}" for path in varied) + "]"
    return {"quantizer": quantizer, "scorer": scorer, "pruner": pruner, "retention": retention, "label": label}


def varied_fields(spec: PipelineSpec) -> list[str]:
    """The dotted paths a spec's sweep varies outside the strategy sections (they join every label)."""
    strategies = ("quantizer", "scorer", "pruner")
    paths = [p for grid in spec.sweep for p in grid if p.split(".")[0] not in strategies]
    return list(dict.fromkeys(paths))


__all__ = ["describe", "strategy_label", "varied_fields"]
