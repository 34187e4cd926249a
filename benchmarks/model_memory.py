"""Bytes on disk and resident memory of fp32 / fp16 / W8A8 / W4A16 models (the toy LLaVA and SmolLM2-135M).

Each (model, variant) runs in its own subprocess so that one's memory never counts for another. Per variant:

* ``disk_bytes``: the saved directory's safetensors (``save_pretrained`` for fp, `qapframe.export` for quantized,
  with ``dtype=float16``: what stays unquantized is written in fp16, as deployed);
  ``linear_disk_bytes``: the part of it that belongs to the Linears qapframe quantizes (the same Linears in
  every variant: LLM projections, not lm_head / vision tower / projector).
* then a fresh process reads that directory (fp: ``from_pretrained``; quantized: `qapframe.load`, which holds
  packed codes) once and runs a forward, to import every module and compile every kernel the path needs, frees
  that model, and reads it again, measured against the RSS between the two: ``tensor_bytes``, the model's parameters and buffers (shared tensors once); ``resident_mib``,
  RSS after loading (after ``gc`` and ``malloc_trim``) minus RSS before it (libraries already imported; for fp
  models this undercounts: transformers memory-maps safetensors, and pages count once touched);
  ``resident_after_forward_mib``, the same after one forward, when every weight has been touched: the number
  the targets compare;
  ``load_peak_mib``, the RSS high-water mark while loading (`qapframe.load` lets transformers build the
  layers first, so this includes a transient dense copy); ``forward_peak_mib``, the high-water mark during one
  64-token forward (a quantized Linear dequantizes its weight per forward), same baseline.

W4A16 uses group size 64 (128 does not divide SmolLM2's 576 or the toy's 192). Run:
``python benchmarks/model_memory.py [--models toy smollm2-135m]``; writes benchmarks/results/model_memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "model_memory.json"
VARIANTS = {
    "fp32": None,
    "fp16": None,
    "W8A8": {"name": "rtn", "scheme": "W8A8", "group_size": -1, "symmetric": True},
    "W4A16": {"name": "rtn", "scheme": "W4A16", "group_size": 64, "symmetric": True},
}
MODELS = ("toy", "smollm2-135m")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _settle() -> None:
    gc.collect()
    try:  # hand freed heap back to the OS so RSS shows what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _disk(directory: Path, linears: set[str]) -> tuple[int, int]:
    from safetensors import safe_open

    total = linear = 0
    for path in directory.glob("*.safetensors"):
        total += path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.rsplit(".", 1)[0] in linears:
                    t = f.get_slice(key)
                    shape = t.get_shape()
                    n = 1
                    for s in shape:
                        n *= s
                    linear += n * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "I8": 1, "U8": 1}[t.get_dtype()]
    return total, linear


def _linear_bytes(model, linears: set[str]) -> int:
    """fp Linears' bytes: safetensors stores tensors raw, so this is their size on disk (header aside)."""
    return sum(p.numel() * p.element_size() for n in linears for p in model.get_submodule(n).parameters())


def build(model_name: str, variant: str, directory: Path) -> dict:
    """Load (and quantize) the model, save it to ``directory``; report its bytes on disk."""
    import torch

    import qapframe
    from qapframe.quantizers.config import DEFAULT_IGNORE
    from qapframe.quantizers.targets import select_linears
    from qapframe.sources import resolve_named_model

    model = _model_class(model_name).from_pretrained(resolve_named_model(model_name),
                                                     dtype=torch.float32 if variant == "fp32" else torch.float16).eval()
    linears = set(select_linears(model, ["*"], list(DEFAULT_IGNORE)))
    if VARIANTS[variant] is None:
        linear_bytes = _linear_bytes(model, linears)
        model.save_pretrained(directory)
        disk, _ = _disk(directory, set())
    else:
        model = qapframe.quantize(model, VARIANTS[variant])
        qapframe.export(model, directory, dtype="float16")
        disk, linear_bytes = _disk(directory, linears)  # export names tensors by module name
    return {"disk_bytes": disk, "linear_disk_bytes": linear_bytes}


def _model_class(model_name: str):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration if model_name == "toy" else AutoModelForCausalLM


def serve(model_name: str, variant: str, directory: Path) -> dict:
    """A fresh process reads the saved model (fp: from_pretrained; quantized: qapframe.load) and runs a forward."""
    import torch

    torch.set_num_threads(1)
    import compressed_tensors  # noqa: F401  (imported before the baseline: a library, not the model)
    import qapframe

    def load():
        if VARIANTS[variant] is None:
            return _model_class(model_name).from_pretrained(directory).eval()
        return qapframe.load(directory)

    def forward(model):
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(4, min(vocab, 1000), (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(input_ids=ids)

    warm = load()  # modules imported and kernels compiled on first use belong to the process, not the model
    forward(warm)
    del warm
    _settle()
    base = _status_kib("VmRSS")
    _reset_peak()
    model = load()
    load_peak = (_status_kib("VmHWM") - base) / 1024
    _settle()
    row = {"tensor_bytes": _tensor_bytes(model), "resident_mib": (_status_kib("VmRSS") - base) / 1024,
           "load_peak_mib": load_peak}
    _settle()
    _reset_peak()
    start = time.perf_counter()
    forward(model)
    row["forward_s"] = time.perf_counter() - start
    row["forward_peak_mib"] = (_status_kib("VmHWM") - base) / 1024
    _settle()
    row["resident_after_forward_mib"] = (_status_kib("VmRSS") - base) / 1024
    return row


def _run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=4, metavar=("PHASE", "MODEL", "VARIANT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        phase, model_name, variant, directory = args.child
        print(json.dumps((build if phase == "build" else serve)(model_name, variant, Path(directory))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for model_name in args.models:
            for variant in VARIANTS:
                directory = str(Path(work) / f"{model_name}-{variant}")
                row = {"model": model_name, "variant": variant, **_run_child("build", model_name, variant, directory)}
                rows.append({**row, **_run_child("serve", model_name, variant, directory)})
    checks = {}
    print(f"{'model':<14}{'variant':<8}{'disk MiB':>10}{'Linears MiB':>13}{'tensors MiB':>13}{'resident MiB':>14}"
          f"{'fwd peak MiB':>14}{'load peak MiB':>15}")
    for r in rows:
        print(f"{r['model']:<14}{r['variant']:<8}{r['disk_bytes'] / 2**20:>10.2f}{r['linear_disk_bytes'] / 2**20:>13.2f}"
              f"{r['tensor_bytes'] / 2**20:>13.2f}{r['resident_after_forward_mib']:>14.1f}{r['forward_peak_mib']:>14.1f}"
              f"{r['load_peak_mib']:>15.1f}")
    for model_name in args.models:
        by = {r["variant"]: r for r in rows if r["model"] == model_name}
        ratio = by["W4A16"]["linear_disk_bytes"] / by["fp16"]["linear_disk_bytes"]
        checks[model_name] = {
            "w4a16_linear_disk_vs_fp16": ratio,
            "w4a16_linear_disk_target_met": ratio <= 0.3,
            "w4a16_resident_below_fp16": by["W4A16"]["resident_after_forward_mib"] < by["fp16"]["resident_after_forward_mib"],
            "w8a8_resident_below_fp16": by["W8A8"]["resident_after_forward_mib"] < by["fp16"]["resident_after_forward_mib"],
            "w4a16_forward_peak_below_fp16": by["W4A16"]["forward_peak_mib"] < by["fp16"]["forward_peak_mib"],
        }
        print(f"{model_name}: W4A16 Linears on disk = {ratio:.3f} x fp16 (target <= 0.3): "
              f"{'met' if ratio <= 0.3 else 'NOT met'}; resident after a forward W4A16 "
              f"{by['W4A16']['resident_after_forward_mib']:.1f} MiB vs fp16 {by['fp16']['resident_after_forward_mib']:.1f} MiB")
    payload = {"rows": rows, "checks": checks, "notes": __doc__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, args.out)  # atomic: a reader never sees half a file
    print(f"wrote {args.out}")
    return 0 if all(c["w4a16_linear_disk_target_met"] and c["w4a16_resident_below_fp16"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
