"""Quantizers on a real pretrained LLaMA-family LLM (SmolLM2-135M-Instruct): perplexity, time, peak memory.

Every row quantizes the same model on the same calibration windows and is scored on the same held-out
tokens (the evaluation part of the text never overlaps the calibration part, `qapframe.eval.perplexity`).
Each row runs in its own process, so its peak resident memory (the process's high-water RSS after loading
and quantizing, before scoring) is its own. llm-compressor, the peer, runs in its own virtualenv in the same
benchmark run (``--peer-python``; made by ``benchmarks/peers/setup_llmcompressor.sh``) and is scored by
the same perplexity code. Rows are written to ``--out`` as they finish, so a stopped run keeps them.

SmolLM2's weights come from a GGUF stored on a 4-bit grid (Q4_1, blocks of 32, asymmetric): weight-only
rows start from weights that were already 4-bit; activations are the real model's.

    python benchmarks/llm_quantization.py --out benchmarks/results/llm_quantization.json \
        --peer-python .venv-llmcompressor/bin/python
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PERPLEXITY_MODULE = ROOT / "qapframe" / "eval" / "perplexity.py"

W4_G64 = {"weight_bits": 4, "group_size": 64, "symmetric": True}
W4A4_TOKEN = {"scheme": "W4A4", "group_size": 64, "symmetric": True, "act_symmetric": True, "act_dynamic": True}
W4A4_STATIC = {**W4A4_TOKEN, "act_dynamic": False}
ROTATION = {"rotation": {"name": "hadamard", "seed": 0}}

# (setting, method, quantizer spec or None for fp, or "peer:<recipe>" for llm-compressor)
ROWS: list[tuple[str, str, object]] = [
    ("fp32", "fp", None),
    ("W4A16 g64", "rtn", {"name": "rtn", "scheme": "W4A16", **W4_G64}),
    ("W4A16 g64", "gptq", {"name": "gptq", "scheme": "W4A16", **W4_G64}),
    ("W4A16 g64", "gptq, act_order group", {"name": "gptq", "scheme": "W4A16", **W4_G64, "act_order": "group"}),
    ("W4A16 g64", "gptq, act_order off", {"name": "gptq", "scheme": "W4A16", **W4_G64, "act_order": "off"}),
    ("W4A16 g64", "awq", {"name": "awq", "scheme": "W4A16", **W4_G64}),
    ("W4A16 g64", "llm-compressor gptq", "peer:gptq_w4a16"),
    ("W8A8 per-token", "rtn", {"name": "rtn", "scheme": "W8A8", "group_size": -1, "symmetric": True, "act_symmetric": True}),
    ("W8A8 per-token", "smoothquant", {"name": "smoothquant", "scheme": "W8A8", "group_size": -1, "symmetric": True,
                                        "act_symmetric": True}),
]
for _setting, _acts in (("W4A4 per-token", W4A4_TOKEN), ("W4A4 static", W4A4_STATIC)):
    for _method in ("rtn", "gptq", "smoothquant"):
        _spec = {"name": _method, **_acts}
        ROWS.append((_setting, _method, _spec))
        ROWS.append((_setting, f"{_method} + hadamard", {**_spec, **ROTATION}))
ROWS.append(("W4A4 per-token", "llm-compressor spinquant + gptq", "peer:spinquant_gptq_w4a4"))
# Learned rotations (SpinQuant's R1 and R2, 20 Cayley steps of one calibration window, a fifth of the paper's
# 100 on 2 CPU cores): RTN learns with its weights quantized in the loss; GPTQ, as in the paper, with fp weights.
SPINQUANT = {"name": "spinquant", "seed": 0, "steps": 20}
ROWS.append(("W4A4 per-token", "rtn + spinquant", {"name": "rtn", **W4A4_TOKEN, "rotation": SPINQUANT}))
ROWS.append(("W4A4 per-token", "gptq + spinquant (fp weights)",
             {"name": "gptq", **W4A4_TOKEN, "rotation": {**SPINQUANT, "weights_in_loss": "fp"}}))
# Asymmetric per-token activations (a zero point per token): after SiLU and the rotation, token ranges are
# lopsided, and a symmetric grid wastes half its codes on the empty side.
for _method in ("rtn", "gptq"):
    ROWS.append(("W4A4 per-token asym", f"{_method} + hadamard",
                 {"name": _method, **W4A4_TOKEN, "act_symmetric": False, **ROTATION}))
# The full symmetric grids (scale max|x| / 7.5 at 4 bits, compressed-tensors' convention) against the narrow
# default: of the weights ("full weight grid"), of the activations ("full act grid"), of both ("full grids").
FULL_W, FULL_A = {"symmetric_grid": "full"}, {"act_symmetric_grid": "full"}
for _method in ("rtn", "gptq"):
    ROWS.append(("W4A16 g64", f"{_method}, full weight grid",
                 {"name": _method, "scheme": "W4A16", **W4_G64, **FULL_W}))
    for _label, _grids in (("full act grid", FULL_A), ("full grids", {**FULL_W, **FULL_A})):
        ROWS.append(("W4A4 per-token", f"{_method} + hadamard, {_label}",
                     {"name": _method, **W4A4_TOKEN, **ROTATION, **_grids}))
ROWS.append(("W4A4 per-token asym", "gptq + hadamard, full weight grid",
             {"name": "gptq", **W4A4_TOKEN, "act_symmetric": False, **ROTATION, **FULL_W}))
ROWS.append(("W4A4 per-token", "rtn + spinquant, full act grid", {"name": "rtn", **W4A4_TOKEN, "rotation": SPINQUANT, **FULL_A}))
for _method in ("rtn", "smoothquant"):
    ROWS.append(("W8A8 per-token asym", _method, {"name": _method, "scheme": "W8A8", "group_size": -1,
                                                  "symmetric": True, "act_symmetric": False}))


def row_key(setting: str, method: str) -> str:
    return f"{setting} | {method}"


def prepare_data(model_dir: Path, args: argparse.Namespace, path: Path) -> dict:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from qapframe.eval.perplexity import calibration_windows, read_text, split_stream, token_stream

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = split_stream(token_stream(tokenizer, read_text(args.text)), args.eval_tokens)
    windows = calibration_windows(split.calibration, args.calibration, args.seq_len, args.seed)
    calibration = torch.cat([w["input_ids"] for w in windows])  # [n, L]
    torch.save({"calibration": calibration, "evaluation": split.evaluation}, path)
    return {"calibration_windows": calibration.shape[0], "calibration_tokens": calibration.numel(),
            "eval_tokens": split.evaluation.numel(), "seq_len": args.seq_len}


def run_qapframe_row(request: dict) -> dict:
    """One qapframe row, in this (child) process."""
    torch.set_num_threads(request["threads"])
    sys.path.insert(0, str(ROOT))
    import qapframe
    from qapframe.eval.perplexity import perplexity
    from transformers import AutoModelForCausalLM

    data = torch.load(request["data"])
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    quantize_s = 0.0
    if request["spec"] is not None:
        calibration = [{"input_ids": w[None], "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)}
                       for w in data["calibration"]]
        spec = {**request["spec"], "calibration_samples": len(calibration)}
        start = time.perf_counter()
        qapframe.quantize(model, spec, calibration)
        quantize_s = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # load + calibration, before scoring
    result = perplexity(model, data["evaluation"], request["seq_len"])
    return {"perplexity": result.perplexity, "tokens": result.tokens, "quantize_s": quantize_s,
            "peak_rss_mib": peak_mib}


def run_row(spec: object, common: dict, workdir: Path, args: argparse.Namespace) -> dict:
    """Run one row in a fresh process and return its result (or ``{"error": ...}``)."""
    out = workdir / "row.json"
    out.unlink(missing_ok=True)
    if isinstance(spec, str) and spec.startswith("peer:"):
        if args.peer_python is None:
            return {"error": "skipped: no --peer-python (make one with benchmarks/peers/setup_llmcompressor.sh)"}
        request = {**common, "recipe": spec[5:], "out": str(out), "perplexity_module": str(PERPLEXITY_MODULE),
                   "group_size": 64, "symmetric": True, "dampening": 0.01, "block_size": 128}
        command = [str(args.peer_python), str(ROOT / "benchmarks" / "peers" / "llmcompressor_run.py")]
    else:
        request = {**common, "spec": spec, "out": str(out)}
        command = [sys.executable, str(Path(__file__).resolve()), "--row"]
    request_path = workdir / "request.json"
    request_path.write_text(json.dumps(request))
    proc = subprocess.run([*command, str(request_path)], capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--row"]:  # child process: one qapframe row
        request = json.loads(Path(argv[1]).read_text())
        Path(request["out"]).write_text(json.dumps(run_qapframe_row(request)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a named model or a local causal-LM directory")
    parser.add_argument("--text", nargs="+", default=["python-docs"], help="text files (or python-docs)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=16, help="calibration windows of --seq-len tokens")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="*", help="only rows whose 'setting | method' contains one of these")
    parser.add_argument("--exact", action="store_true", help="--rows names whole 'setting | method' keys")
    parser.add_argument("--peer-python", type=Path, help="python of a virtualenv with llmcompressor installed")
    parser.add_argument("--out", type=Path, help="JSON written as rows finish")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --out (same data settings required), replacing those re-run")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from qapframe.sources import resolve_named_model

    model_dir = resolve_named_model(args.model) or Path(args.model)
    def wanted(key: str) -> bool:
        return not args.rows or any(s == key if args.exact else s in key for s in args.rows)

    rows = [r for r in ROWS if wanted(row_key(r[0], r[1]))]
    unknown = [s for s in args.rows or [] if args.exact and s not in {row_key(r[0], r[1]) for r in ROWS}]
    if unknown:
        raise SystemExit(f"--exact: no row is called {unknown}; rows: {[row_key(r[0], r[1]) for r in ROWS]}")
    with tempfile.TemporaryDirectory(prefix="qapframe-llm-bench-") as tmp:
        workdir = Path(tmp)
        data_info = prepare_data(model_dir, args, workdir / "data.pt")
        common = {"model": str(model_dir), "data": str(workdir / "data.pt"), "seq_len": args.seq_len,
                  "threads": args.threads}
        payload = {"model": args.model, "text": args.text, **data_info, "threads": args.threads, "rows": []}
        if args.append and args.out is not None and args.out.is_file():
            earlier = json.loads(args.out.read_text())
            settings = ("model", "text", "calibration_windows", "eval_tokens", "seq_len", "threads")
            if any(earlier.get(k) != payload[k] for k in settings):
                raise SystemExit(f"--append: {args.out} was measured with other settings "
                                 f"({ {k: earlier.get(k) for k in settings} })")
            wanted = {row_key(r[0], r[1]) for r in rows}
            payload["rows"] = [r for r in earlier["rows"] if row_key(r["setting"], r["method"]) not in wanted]
        print(f"{args.model}: {data_info['calibration_windows']} calibration windows of {args.seq_len} tokens, "
              f"{data_info['eval_tokens']} held-out tokens")
        print(f"{'setting':16s} {'method':24s} {'ppl':>9s} {'quant s':>8s} {'peak MiB':>9s}")
        failures = 0
        for setting, method, spec in rows:
            result = run_row(spec, common, workdir, args)
            payload["rows"].append({"setting": setting, "method": method, "spec": spec, **result})
            if args.out:
                from qapframe.eval.results import write_json_atomically

                write_json_atomically(args.out, payload)
            if "error" in result:
                failures += not result["error"].startswith("skipped")
                print(f"{setting:16s} {method:24s} {result['error']}", flush=True)
            else:
                print(f"{setting:16s} {method:24s} {result['perplexity']:9.2f} {result['quantize_s']:8.1f} "
                      f"{result['peak_rss_mib']:9.0f}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
