"""Run llm-compressor (the peer) on the benchmark's model and data, in llm-compressor's own virtualenv.

Called by `benchmarks/llm_quantization.py` as
``<peer venv>/bin/python llmcompressor_run.py REQUEST.json``; the request names the model directory,
the calibration windows and evaluation stream (a ``torch.save`` file), the recipe and the output JSON.
Perplexity is computed by qapframe's own `qapframe/eval/perplexity.py`, loaded by file path (it needs
only torch), so both tools are scored by the same code on the same tokens.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

import torch


def load_perplexity_module(path: str):
    spec = importlib.util.spec_from_file_location("qapframe_perplexity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


RECIPES = ("gptq_w4a16", "spinquant_gptq_w4a4")


def recipe_of(request: dict):
    """The llm-compressor modifiers for ``request['recipe']``:

    - ``gptq_w4a16``: GPTQ, group-wise 4-bit weights;
    - ``spinquant_gptq_w4a4``: SpinQuant's rotations without learning (R1 residual, R2 per head, R4 online on
      down_proj's input; random Hadamards), then GPTQ with 4-bit weights and 4-bit dynamic per-token
      activations (symmetric, as qapframe's W4A4 per-token rows).
    """
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": request["symmetric"], "strategy": "group",
               "group_size": request["group_size"]}
    gptq = dict(ignore=["lm_head"], dampening_frac=request["dampening"], block_size=request["block_size"])
    if request["recipe"] == "gptq_w4a16":
        return [GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, **gptq)]
    if request["recipe"] == "spinquant_gptq_w4a4":
        from llmcompressor.modifiers.transform import SpinQuantModifier

        activations = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
        return [
            SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard"),
            GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights,
                                                    "input_activations": activations}}, **gptq),
        ]
    raise SystemExit(f"unknown recipe {request['recipe']!r}; known: {', '.join(RECIPES)}")


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(request["threads"])
    torch.manual_seed(0)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    ppl = load_perplexity_module(request["perplexity_module"])
    data = torch.load(request["data"])
    calibration = data["calibration"]  # [n, L] int64
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                 "attention_mask": torch.ones_like(calibration).tolist()})
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe_of(request), num_calibration_samples=calibration.shape[0],
            max_seq_length=calibration.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = ppl.perplexity(model.eval(), data["evaluation"], request["seq_len"])
    Path(request["out"]).write_text(json.dumps({
        "perplexity": result.perplexity, "tokens": result.tokens, "quantize_s": seconds, "peak_rss_mib": peak_mib,
        "llmcompressor_version": __import__("llmcompressor").__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
