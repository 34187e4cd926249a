"""Quantizer quality and speed on real pretrained weights (all-MiniLM-L6-v2), against the fp32 model.

Prints one row per (setting, method): relative error of the final hidden states and mean cosine of
the sentence embeddings on held-out sentences, and quantization wall time. Run from the repo root:

    python benchmarks/quantizers.py --threads 2 --out benchmarks/results/quantizers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the MiniLM harness lives with the tests

import qapframe  # noqa: E402
from tests.quantizers.minilm import calibration_inputs, embed, held_out_batch, load_minilm, quality  # noqa: E402

SETTINGS = {
    "W4A16 g128": {"scheme": "W4A16", "group_size": 128},
    "W4A16 per-channel": {"scheme": "W4A16", "group_size": -1},
    "W8A8 (per-token acts)": {"scheme": "W8A8", "group_size": -1},
    "W4A4 g128 (per-token acts)": {"scheme": "W4A4", "group_size": 128},
}
METHODS = {
    "rtn": {"name": "rtn"},
    "gptq": {"name": "gptq"},
    "awq": {"name": "awq"},
    "smoothquant": {"name": "smoothquant"},
    "awq+gptq": {"name": "awq", "weight_quantizer": "gptq"},
    "smoothquant+gptq": {"name": "smoothquant", "weight_quantizer": "gptq"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help="subset of: " + ", ".join(SETTINGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = held_out_batch()
    reference = embed(load_minilm(), batch)
    calibration = calibration_inputs()
    rows = []
    print(f"{'setting':28s} {'method':18s} {'rel_error':>10s} {'cosine':>9s} {'wall_s':>8s}")
    for setting in args.settings:
        for method, spec in METHODS.items():
            model = load_minilm()
            start = time.perf_counter()
            qapframe.quantize(model, {**spec, **SETTINGS[setting]}, calibration)
            wall = time.perf_counter() - start
            row = {"setting": setting, "method": method, **quality(model, reference, batch), "wall_s": wall}
            rows.append(row)
            print(f"{setting:28s} {method:18s} {row['rel_error']:10.4f} {row['cosine']:9.5f} {wall:8.2f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": "all-MiniLM-L6-v2", "calibration_sentences": len(calibration),
                "held_out_sentences": int(batch["input_ids"].shape[0]), "threads": args.threads,
                "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
