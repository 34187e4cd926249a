"""`qapframe export SPEC_OR_RUN --out DIR`: rebuild one configuration's compressed model and export it.

``SPEC_OR_RUN`` is a spec with one configuration (its first seed), or a run directory of `qapframe run`
(its ``results.jsonl``) with ``--key`` naming one run when it holds several. The model is quantized with
the same calibration records as that run and its token pruning installed, then written by `export`.
"""

from __future__ import annotations

import json
from pathlib import Path

from qapframe.errors import QapframeError
from qapframe.deploy.checkpoint import DEFAULT_SHARD_BYTES, export
from qapframe.deploy.writer import check_destination


def _from_run(directory: Path, key: str | None):
    from qapframe.spec import load_spec

    rows = [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines() if line.strip()]
    ok = [r for r in rows if r.get("status") == "ok"]
    chosen = [r for r in ok if key is None or r["key"].startswith(key)]
    if len(chosen) != 1:
        listing = "; ".join(f"{r['key']} (seed {r['seed']}, {r.get('quantizer')}, {r.get('scorer')})" for r in ok[:20])
        why = "no finished run matches" if not chosen else f"{len(chosen)} finished runs match"
        raise QapframeError(f"{directory / 'results.jsonl'}: {why} --key {key!r}; runs: {listing or '(none)'}")
    row = chosen[0]
    return load_spec(row["spec"]), int(row["seed"])


def resolve(spec_or_run: str, key: str | None = None):
    """``(spec, seed)`` of one concrete configuration."""
    from qapframe.cli import _checked_spec

    path = Path(spec_or_run)
    if path.is_dir():
        if not (path / "results.jsonl").is_file():
            raise QapframeError(f"{path}: a directory without results.jsonl; pass a spec file or a `qapframe run` output")
        spec, seed = _from_run(path, key)
    else:
        spec = _checked_spec(spec_or_run)
        seed = spec.evaluation.seeds[0]
    configurations = spec.expand()
    if len(configurations) != 1:
        raise QapframeError(
            f"{spec_or_run}: the spec's sweep makes {len(configurations)} configurations; export one: run it with "
            "`qapframe run` and export a run (`qapframe export RUN_DIR --key KEY`), or remove the sweep"
        )
    spec = configurations[0]
    if spec.quantizer is None:
        raise QapframeError(f"{spec_or_run}: quantizer: the configuration quantizes nothing; there is nothing to export")
    return spec, seed


def export_spec(spec_or_run: str, out: str | Path, *, key: str | None = None, overwrite: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str | None = None) -> Path:
    """Quantize (and install pruning in) the model of ``spec_or_run`` and export it to ``out``."""
    import torch

    from qapframe.eval.evaluation import seed_everything
    from qapframe.eval.inputs import DataCache, calibration_inputs
    from qapframe.eval.loading import ModelSource, resolve_model_path
    from qapframe.pipeline import Pipeline

    check_destination(out, overwrite)  # before minutes of loading and calibrating
    spec, seed = resolve(spec_or_run, key)
    seed_everything(seed)
    source = ModelSource(spec.model)
    model = source.fresh()
    pipeline = Pipeline(spec.quantizer, spec.scorer, spec.pruner, adapter=spec.model.adapter, seed=seed)
    calibration = calibration_inputs(spec.evaluation, seed, source, DataCache(), model)
    with torch.no_grad():
        model = pipeline.apply(model, calibration)
    return export(model, out, processor=source.processor, source=resolve_model_path(spec.model), overwrite=overwrite,
                  max_shard_bytes=max_shard_bytes, dtype=dtype)


__all__ = ["export_spec", "resolve"]
