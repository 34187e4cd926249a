"""qapframe as an lmms-eval model: ``lmms-eval --model qapframe --model_args spec=my.yaml --tasks ...``.

lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval) finds this model through the entry-point group
``lmms_eval.models`` (`manifest`). The model is built the way `qapframe run` builds one configuration: the
spec's model, quantized with the spec's quantizer on the spec's calibration records for ``seed``, with the
spec's token pruning installed; lmms-eval's tasks then ask it questions with their own prompts and score the
answers with their own metrics.

Model arguments (``--model_args key=value,...``):

- ``spec``: a spec file or a built-in spec name (`qapframe list`); required.
- ``run``: which configuration of a spec with a sweep, by its 0-based index in `qapframe validate`'s order
  (a spec with one configuration needs none).
- ``seed``: the run seed (calibration records, random scorers); default the spec's first seed.
- ``batch_size`` (lmms-eval's ``--batch_size``) and ``device`` (``--device``; default the spec's device).

Requests: ``generate_until`` answers a batch at once (left-padded, greedy unless the task asks to sample) and
cuts each answer at the task's first ``until`` string; ``loglikelihood`` returns, as lmms-eval's own models
do and as its multiple-choice tasks expect (they take the argmin), the continuation's negative
log-likelihood: ``-sum_t log p(token_t | prompt, tokens_<t)``, and whether greedy decoding would produce it.
Each request holds exactly one image (lmms-eval's ``doc_to_visual`` returns a list of one). The vision tokens
the LLM kept are logged per batch, and their mean over all requests when a request type finishes; each
answer also reports its token counts to lmms-eval (``input_tokens``: what the LLM received, pruned vision
tokens left out; ``output_tokens``), which ``--log_samples`` writes beside it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger

from qapframe.data.prompts import chat_prompt
from qapframe.errors import QapframeError
from qapframe.eval.evaluation import retained_tokens, vision_placeholders

MODEL_ID = "qapframe"


def manifest():
    """The ``lmms_eval.models`` entry point: registers `QapframeLMMS` under the name ``qapframe``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.QapframeLMMS")


def select_configuration(spec, run: int | None):
    """The one configuration of ``spec`` to evaluate: the only one, or ``run`` (an index into ``spec.expand()``)."""
    from qapframe.eval.labels import describe, varied_fields

    configs = spec.expand()
    if run is None and len(configs) == 1:
        return configs[0]
    varied = varied_fields(spec)
    listing = "; ".join(f"{i}: {describe(c, varied)['label']}" for i, c in enumerate(configs))
    if run is None:
        raise QapframeError(f"model_args run: the spec has {len(configs)} configurations; choose one with "
                            f"run=N ({listing})")
    if not 0 <= run < len(configs):
        raise QapframeError(f"model_args run: {run} is not one of 0..{len(configs) - 1} ({listing})")
    return configs[run]


def _one_image(visuals: Sequence, task: str, doc_id: int):
    images = [v for v in visuals if v is not None]
    if len(images) != 1:
        raise QapframeError(f"lmms-eval task {task!r}, doc {doc_id}: qapframe's model takes exactly one image per "
                            f"request, got {len(images)}")
    image = images[0]
    if not hasattr(image, "convert"):
        raise QapframeError(f"lmms-eval task {task!r}, doc {doc_id}: expected a PIL image, got {type(image).__name__}"
                            " (video and audio requests are not supported)")
    return image.convert("RGB")


def _cut_at(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _as_response(score: tuple[float, bool]):
    """A loglikelihood result in the form that reaches lmms-eval's metrics as the pair itself.

    lmms-eval 0.7.3 passes every response through ``unwrap_generation_output``, which turns a plain
    ``(float, bool)`` into its string (and then every multiple-choice task fails unpacking it); the text field
    of a ``GenerationResult`` is passed through untouched. Versions that keep the pair get the pair.
    """
    from lmms_eval.api.instance import unwrap_generation_output

    if unwrap_generation_output(score)[0] == score:
        return score
    return GenerationResult(text=score)  # type: ignore[arg-type]


def _generated_length(tokens: torch.Tensor, tokenizer) -> int:
    """New tokens up to and including the first end-of-sequence token (the rest is padding)."""
    ends = (tokens == tokenizer.eos_token_id).nonzero()
    return int(ends[0, 0]) + 1 if len(ends) else int(tokens.numel())


class QapframeLMMS(lmms):
    """A spec's compressed model behind lmms-eval's model interface (one process, one device)."""

    is_simple = True

    def __init__(self, spec: str, run: int | str | None = None, seed: int | str | None = None,
                 batch_size: int | str = 1, device: str | None = None, max_batch_size: Any = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise QapframeError(f"model_args: unknown argument(s) {', '.join(sorted(unknown))}; qapframe takes spec, "
                                "run, seed (and lmms-eval's batch_size, device)")
        from qapframe.eval.evaluation import seed_everything
        from qapframe.eval.inputs import DataCache, calibration_inputs
        from qapframe.eval.loading import ModelSource
        from qapframe.pipeline import Pipeline
        from qapframe.spec import load_spec
        from qapframe.spec_files import resolve_spec_path

        parsed = load_spec(resolve_spec_path(spec))
        self.configuration = select_configuration(parsed, None if run in (None, "") else int(run))
        self.seed = self.configuration.evaluation.seeds[0] if seed in (None, "") else int(seed)
        try:
            self.batch_size_per_request = int(batch_size)
        except ValueError:
            raise QapframeError(f"--batch_size: qapframe's model takes a number of requests per batch, got "
                                f"{batch_size!r} (lmms-eval's 'auto' sizing is not supported)") from None
        if self.batch_size_per_request < 1:
            raise QapframeError(f"--batch_size: must be >= 1, got {batch_size}")
        cfg = self.configuration
        seed_everything(self.seed)
        source = ModelSource(cfg.model, device=device or None)
        model = source.fresh()
        pipeline = Pipeline(cfg.quantizer, cfg.scorer, cfg.pruner, adapter=cfg.model.adapter, seed=self.seed)
        calibration = None
        if pipeline.quantizer is not None:
            calibration = calibration_inputs(cfg.evaluation, self.seed, source, DataCache(), model)
        with torch.no_grad():
            self.model = pipeline.apply(model, calibration).eval()
        self.processor = source.processor
        self.tokenizer = self.processor.tokenizer
        self.kept_tokens: dict[str, list[float]] = {"generate_until": [], "loglikelihood": []}
        logger.info(f"qapframe: spec {spec}, seed {self.seed}: {self.describe()}")

    def describe(self) -> str:
        from qapframe.eval.labels import describe

        return describe(self.configuration)["label"]

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_request

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- inputs ------------------------------------------------------------------------------------

    def _inputs(self, bodies: Sequence[str], images: Sequence, suffixes: Sequence[str] | None = None) -> dict:
        from qapframe.eval.inputs import processor_inputs

        texts = [chat_prompt(body, self.processor) for body in bodies]
        if suffixes is not None:
            texts = [t + s for t, s in zip(texts, suffixes)]
        return processor_inputs(self.processor, texts, images, self.model)

    def _kept(self, kind: str, inputs: dict) -> tuple[list[float], list[int]]:
        """Vision tokens the LLM kept and the prompt's dense count, per row (logged and tallied under ``kind``)."""
        kept = retained_tokens(self.model, inputs["input_ids"])
        dense = [int(n) for n in vision_placeholders(self.model, inputs["input_ids"]).sum(dim=1).tolist()]
        self.kept_tokens[kind] += kept
        logger.info(f"qapframe: vision tokens kept {kept} of {dense}")
        return kept, dense

    def _report(self, kind: str) -> None:
        counts = self.kept_tokens[kind]
        if counts:
            logger.info(f"qapframe: {kind}: {len(counts)} requests, mean vision tokens kept "
                        f"{sum(counts) / len(counts):.2f} ({self.describe()})")

    def _visual(self, doc_to_visual, doc_id: int, task: str, split: str):
        return _one_image(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)

    def _reset_selection(self) -> None:
        if hasattr(self.model, "qapframe_last_selection"):
            self.model.qapframe_last_selection = None  # so a stale selection is never counted

    # -- lmms-eval's requests ----------------------------------------------------------------------

    def generate_until(self, requests) -> list[GenerationResult]:
        from lmms_eval import utils

        # Longest prompts first (less padding per batch, memory errors early); grouped by generation kwargs.
        order = utils.Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
        answers: list[str] = []
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            kwargs = dict(all_kwargs[0])
            until = kwargs.pop("until", None) or [self.tokenizer.eos_token]
            until = [until] if isinstance(until, str) else list(until)
            images = [self._visual(doc_to_visual[i], doc_ids[i], tasks[i], splits[i]) for i in range(len(chunk))]
            inputs = self._inputs(contexts, images)
            temperature = float(kwargs.get("temperature") or 0.0)
            sample = bool(kwargs.get("do_sample")) or temperature > 0
            options = {"max_new_tokens": int(kwargs.get("max_new_tokens") or self.configuration.evaluation.max_new_tokens),
                       "do_sample": sample, "num_beams": int(kwargs.get("num_beams") or 1),
                       "pad_token_id": self.tokenizer.pad_token_id}
            if sample:
                options.update(temperature=temperature or 1.0, top_p=kwargs.get("top_p") or 1.0)
            self._reset_selection()
            with torch.no_grad():
                generated = self.model.generate(**inputs, **options)
            kept, dense = self._kept("generate_until", inputs)
            new_tokens = generated[:, inputs["input_ids"].shape[1]:]  # [B, T_new]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, (context, text) in enumerate(zip(contexts, texts)):
                text = _cut_at(text, until).strip()
                # The LLM's input: the prompt's tokens with the pruned vision tokens left out.
                llm_input = int(inputs["attention_mask"][row].sum()) - dense[row] + int(kept[row])
                counts = TokenCounts(input_tokens=llm_input, output_tokens=_generated_length(new_tokens[row],
                                                                                           self.tokenizer))
                answers.append(GenerationResult(text=text, token_counts=counts))
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        self._report("generate_until")
        return order.get_original(answers)

    def loglikelihood(self, requests) -> list:
        out: list = []
        args = [r.args for r in requests]
        for start in range(0, len(args), self.batch_size):
            chunk = args[start:start + self.batch_size]
            bodies, continuations, images = [], [], []
            for context, target, doc_to_visual, doc_id, task, split in chunk:
                doc = self.task_dict[task][split][doc_id]
                continuations.append(target if isinstance(target, str) else target(doc))
                bodies.append(context)
                images.append(self._visual(doc_to_visual, doc_id, task, split))
            prompts = self._inputs(bodies, images)
            full = self._inputs(bodies, images, continuations)
            prompt_lengths = prompts["attention_mask"].sum(dim=1)  # [B]
            full_lengths = full["attention_mask"].sum(dim=1)
            self._reset_selection()
            with torch.no_grad():
                logits = self.model(**full).logits  # [B, L', V]; L' < L when vision tokens were pruned
            self._kept("loglikelihood", full)
            # Left padding puts every continuation at the end, and pruning never removes text tokens, so the
            # last n positions of the logits predict the last n tokens whatever was dropped before them.
            for row in range(len(chunk)):
                n = int(full_lengths[row] - prompt_lengths[row])
                if n < 1:
                    raise QapframeError(f"lmms-eval task {chunk[row][4]!r}, doc {chunk[row][3]}: the continuation "
                                        f"{continuations[row]!r} adds no token to the prompt")
                targets = full["input_ids"][row, -n:]  # [n]
                scores = torch.log_softmax(logits[row, -n - 1:-1].double(), dim=-1)  # [n, V]
                nll = -float(scores.gather(1, targets[:, None]).sum())
                greedy = bool((scores.argmax(dim=-1) == targets).all())
                out.append(_as_response((nll, greedy)))
        self._report("loglikelihood")
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("qapframe's lmms-eval model answers single-round tasks (generate_until, "
                                  "loglikelihood); multi-round tasks are not supported")


__all__ = ["MODEL_ID", "QapframeLMMS", "manifest", "select_configuration"]
