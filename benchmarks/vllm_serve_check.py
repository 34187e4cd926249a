"""Serve an exported checkpoint with vLLM and check its greedy answers against transformers' on a few prompts.

Needs a CUDA GPU and vllm installed. Where either is missing it prints ``SKIPPED: <why>`` and exits with
status 77 (the conventional "skipped" status of automake/ctest), never 0: a skip is not a pass.

    python benchmarks/vllm_serve_check.py --model DIR        # a directory written by `qapframe export`
    python benchmarks/vllm_serve_check.py --smollm2 W4A16     # export SmolLM2-135M (RTN, g64) first, then check

Exit status: 0 every prompt's greedy answer agrees, 1 some differ (each printed), 2 bad arguments, 77 skipped.
Answers are compared on their first ``--agree-tokens`` tokens: the two engines' kernels differ in float
rounding, so long greedy continuations may legitimately part after a near-tie.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

SKIPPED = 77
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colours are",
    "def fibonacci(n):",
]
SCHEMES = {
    "W4A16": {"name": "rtn", "scheme": "W4A16", "group_size": 64, "symmetric": True},
    "W8A8": {"name": "rtn", "scheme": "W8A8", "group_size": -1, "symmetric": True, "act_symmetric": True},
}


def why_skip() -> str | None:
    """Why this machine cannot run the check, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm, on a machine with a CUDA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def export_smollm2(scheme: str, directory: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qapframe
    from qapframe.sources import resolve_named_model

    source = resolve_named_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).eval()
    model = qapframe.quantize(model, SCHEMES[scheme])
    return qapframe.export(model, directory, processor=AutoTokenizer.from_pretrained(source))


def transformers_answers(directory: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16).to("cuda").eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to("cuda")
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        answers.append(out[0, ids.shape[1]:].tolist())
    del model
    torch.cuda.empty_cache()
    return answers


def vllm_answers(directory: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(directory), dtype="float16", gpu_memory_utilization=0.5, enforce_eager=True)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [list(o.outputs[0].token_ids) for o in outputs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a directory written by `qapframe export`")
    source.add_argument("--smollm2", choices=sorted(SCHEMES), help="export SmolLM2-135M with this scheme first")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--agree-tokens", type=int, default=8, help="leading tokens that must agree")
    args = parser.parse_args(argv)
    if args.model is not None and not (args.model / "config.json").is_file():
        print(f"error: {args.model} has no config.json; pass a directory written by `qapframe export`", file=sys.stderr)
        return 2
    reason = why_skip()
    if reason is not None:
        print(f"SKIPPED: {reason}; nothing was checked")
        return SKIPPED
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model or export_smollm2(args.smollm2, Path(tmp) / "export")
        expected = transformers_answers(directory, PROMPTS, args.max_tokens)
        served = vllm_answers(directory, PROMPTS, args.max_tokens)
    failures = 0
    for prompt, a, b in zip(PROMPTS, expected, served):
        agree = a[: args.agree_tokens] == b[: args.agree_tokens]
        failures += not agree
        print(json.dumps({"prompt": prompt, "agree": agree, "transformers": a, "vllm": b}))
    print(f"{len(PROMPTS) - failures} of {len(PROMPTS)} prompts agree on their first {args.agree_tokens} tokens")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
