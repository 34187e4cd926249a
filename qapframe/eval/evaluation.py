"""The evaluation loop of one (configuration, seed): fresh model, quantize, prune, answer with greedy ``generate``.

`generate_answers` and `answer_records` are the one way qapframe answers VQA records; the runner, the
benchmarks and the toy's research scripts all go through them.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from typing import Any, Sequence

import numpy as np
import torch

from qapframe import distributed as dist
from qapframe.data.base import VQARecord
from qapframe.eval.inputs import DataCache, batches, calibration_inputs, model_inputs
from qapframe.eval.loading import ModelSource
from qapframe.eval.metrics import PeakMemory, PrefillTimer, RecordOutcome
from qapframe.eval.reuse import QuantizedModel, QuantizedModelSlot, RandomState, quantization_key
from qapframe.pipeline import Pipeline
from qapframe.spec import PipelineSpec

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def image_token_id(model: torch.nn.Module) -> int:
    config = model.config
    value = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if value is None else value


def vision_placeholders(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the prompt's image and video placeholder tokens (models without video: images only)."""
    mask = input_ids == image_token_id(model)
    config = model.config
    video = getattr(config, "video_token_id", None)
    video = getattr(config, "video_token_index", None) if video is None else video
    return mask | (input_ids == video) if video is not None else mask


def retained_tokens(model: torch.nn.Module, input_ids: torch.Tensor) -> list[float]:
    """Vision tokens the LLM received per sample ``[B]``: from the adapter's record of its selection
    (``model.qapframe_last_selection``) when pruning is installed, else the image and video tokens in the prompt."""
    dense = vision_placeholders(model, input_ids).sum(dim=1)  # [B]
    info = getattr(model, "qapframe_last_selection", None)
    if not info:
        return [float(v) for v in dense.tolist()]
    counts = [0.0] * input_ids.shape[0]
    for selection, (row, _) in zip(info["selections"], info["spans"]):
        counts[row] += float(selection.num_tokens)
    return counts


def weights_fingerprint(model: torch.nn.Module) -> tuple[float, int]:
    """(sum of finite values, count of non-finite ones) over parameters and buffers: equal on every
    rank iff the ranks quantized alike (up to a vanishing chance of collision)."""
    total, nonfinite = 0.0, 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        t = tensor.detach()
        if not t.is_floating_point():
            t = t.double() if t.numel() else t
            total += float(t.sum()) if t.numel() else 0.0
            continue
        finite = torch.isfinite(t)
        nonfinite += int((~finite).sum())
        total += float(torch.where(finite, t, torch.zeros((), dtype=t.dtype, device=t.device)).double().sum())
    return total, nonfinite


def generate_answers(model: torch.nn.Module, tokenizer, inputs: dict, max_new_tokens: int) -> list[str]:
    """Greedy answers to one batch of `model_inputs`: the new tokens only, decoded and stripped."""
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # [B, T_new]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def answer_records(model: torch.nn.Module, processor, records: Sequence[VQARecord], batch_size: int = 8,
                   max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to ``records`` in batches of ``batch_size``, as `evaluate_run` answers them."""
    out: list[str] = []
    for batch in batches(list(records), batch_size):
        out += generate_answers(model, processor.tokenizer, model_inputs(processor, batch, model), max_new_tokens)
    return out


def evaluate_run(
    spec: PipelineSpec, seed: int, source: ModelSource, data: DataCache, progress: bool = False,
    reuse: QuantizedModelSlot | None = None,
) -> dict[str, Any]:
    """Quantize, prune and evaluate one (configuration, seed) on this rank's share; gathered by the caller.

    With ``reuse``, a model quantized under the same `quantization_key` by the previous run is taken from it
    instead of quantizing again, and this run's quantized model is left in it for the next (qapframe.eval.reuse).
    Returns this rank's outcomes, prefill seconds and sample count, peak memory, and how it was quantized.
    """
    ev = spec.evaluation
    seed_everything(seed)
    key = quantization_key(spec, seed) if reuse is not None else None
    held = reuse.take(key) if reuse is not None else None  # a different model held is released here
    gc.collect()  # the previous run's model, before this run's peak is measured from the current level
    memory = PeakMemory(torch.device(source.device or spec.model.device))
    memory.start()  # before the copy: a run's peak includes its own fresh model
    if held is None:
        started = time.perf_counter()
        model = source.fresh()
        pipeline = _pipeline(spec, seed)
        calibration = None if pipeline.quantizer is None else calibration_inputs(ev, seed, source, data, model)
        with torch.no_grad():
            model = pipeline.quantize(model, calibration)
        _check_ranks_agree(model, spec)
        seconds = time.perf_counter() - started
        if key is not None:
            held = QuantizedModel(key, model, RandomState.capture(), memory.peak_mib(), seconds)
        quantization = {"seconds": seconds, "reused": False}
    else:
        model, pipeline = held.model, _pipeline(spec, seed)
        held.random_state.restore()  # as if this run had just quantized
        quantization = {"seconds": held.quantize_s, "reused": True}
    with torch.no_grad():
        model = pipeline.install_pruning(model)  # refused settings raise here: the held model is dropped, not kept
    try:
        part = _answer(model, spec, source, data, progress)
    finally:
        if held is not None:
            _keep_for_the_next_run(pipeline, held, reuse)
    peak = memory.peak_mib()
    if held is not None:
        peak = max(peak, held.calibration_peak_mib)  # what a run quantizing for itself would have reached
    return {**part, "peak_memory_mib": peak, "memory_kind": memory.kind,
            "quantization": quantization if spec.quantizer is not None else None}


def _pipeline(spec: PipelineSpec, seed: int) -> Pipeline:
    return Pipeline(spec.quantizer, spec.scorer, spec.pruner, adapter=spec.model.adapter, seed=seed)


def _keep_for_the_next_run(pipeline: Pipeline, held: QuantizedModel, reuse: QuantizedModelSlot) -> None:
    """Take this run's pruning off the quantized model and keep it; a model whose pruning will not come off is
    dropped (with a warning, not an error, so that this run's own outcome or error stands): the next run of its
    group quantizes afresh."""
    try:
        pipeline.remove_pruning(held.model)
    except Exception as exc:
        log.warning("qapframe: could not remove the pruning from the quantized model (%s: %s); the next run "
                    "quantizes again", type(exc).__name__, exc)
    else:
        reuse.keep(held)


def _check_ranks_agree(model: torch.nn.Module, spec: PipelineSpec) -> None:
    if dist.is_distributed() and spec.quantizer is not None:
        prints = dist.all_gather_objects(weights_fingerprint(model))
        if len(set(prints)) > 1:
            raise RuntimeError(
                f"ranks quantized differently (weight checksums {prints}); quantizer {spec.quantizer.name!r} "
                "must reduce its calibration statistics with qapframe.distributed.all_reduce_"
            )


def _answer(model: torch.nn.Module, spec: PipelineSpec, source: ModelSource, data: DataCache,
            progress: bool) -> dict[str, Any]:
    """This rank's share of the evaluation records answered by ``model``: outcomes and prefill time."""
    ev = spec.evaluation
    records = data.evaluation_records(ev)
    # Whole batches are sharded (not single records) so every batch, and so every logit, is the same
    # as in one process: padding and BLAS blocking depend on a batch's composition.
    indexed = list(enumerate(batches(list(enumerate(records)), ev.batch_size)))
    mine = dist.shard(indexed)
    timer = PrefillTimer(model)
    outcomes: list[RecordOutcome] = []
    try:
        from qapframe.data.prompts import is_correct

        for _, batch in progress_bar(mine, progress, desc="  batches", leave=False):
            inputs = model_inputs(source.processor, [r for _, r in batch], model)
            if hasattr(model, "qapframe_last_selection"):
                model.qapframe_last_selection = None  # so a stale selection is never counted
            timer.arm()
            texts = generate_answers(model, source.processor.tokenizer, inputs, ev.max_new_tokens)
            retained = retained_tokens(model, inputs["input_ids"])
            for (index, record), text, kept in zip(batch, texts, retained):
                outcomes.append(
                    RecordOutcome(index, record.id, str(record.meta.get("type", "")), text, is_correct(text, record), kept)
                )
    finally:
        timer.remove()
    dense_tokens = float(vision_placeholders(model, inputs["input_ids"][:1]).sum()) if mine else None
    return {"outcomes": outcomes, "prefill_s": sum(timer.seconds), "samples": len(outcomes), "dense_tokens": dense_tokens}


def progress_bar(items, enabled: bool, **kwargs):
    """``items`` wrapped in a tqdm bar when ``enabled``, else unchanged."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, **kwargs)


__all__ = ["answer_records", "evaluate_run", "generate_answers", "progress_bar", "retained_tokens", "seed_everything",
           "weights_fingerprint"]
