"""Benchmark of the hybrid-sensitivity kernels against the torch reference and the memory bound.

    python benchmarks/scoring.py [--repeats 5] [--json benchmarks/results/scoring.json]

For each LLaVA shape [B, N, 4096] (group 128, 4 bits, asymmetric, float32 input) it reports the
torch reference time, the numba CPU time, the speedup, the kernel's achieved GB/s (bytes of x read
once / time) and the bound: those bytes over this machine's bandwidth, measured in the same run
with a large array copy. Compile time is excluded (one warm-up call per backend and shape).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from qapframe.kernels import BACKENDS, hybrid_sensitivity

SHAPES = [(1, 576), (1, 2880), (16, 576), (16, 2880)]  # (B, N): LLaVA-1.5 and LLaVA-NeXT token counts
DIM, GROUP, BITS = 4096, 128, 4


def best_time(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(repeats: int, nbytes: int = 1 << 30) -> float:
    """STREAM-style copy bandwidth in bytes/s: (read + write) bytes over the best copy time."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    return 2 * nbytes / best_time(lambda: dst.copy_(src), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=2, help="the torch reference is slow")
    parser.add_argument("--json", default="benchmarks/results/scoring.json")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    bandwidth = copy_bandwidth(args.repeats)
    rows = []
    for b, n in SHAPES:
        x = torch.randn(b, n, DIM, generator=gen)
        nbytes = x.numel() * x.element_size()
        row = {"B": b, "N": n, "D": DIM, "MB": nbytes / 1e6, "bound_ms": 1e3 * nbytes / bandwidth}
        for name in [k for k in ("torch", "numba-cpu") if k in BACKENDS]:
            run = lambda: hybrid_sensitivity(x, BITS, GROUP, False, backend=name)  # noqa: E731
            run()  # warm-up: JIT compile / load from cache
            repeats = args.reference_repeats if name == "torch" else args.repeats
            row[f"{name}_ms"] = 1e3 * best_time(run, repeats)
        if "numba-cuda" in BACKENDS and torch.cuda.is_available():
            xg = x.cuda()
            run = lambda: hybrid_sensitivity(xg, BITS, GROUP, False, backend="numba-cuda")  # noqa: E731
            run()
            row["numba-cuda_ms"] = 1e3 * best_time(run, args.repeats, torch.cuda.synchronize)
            row["torch-cuda_ms"] = 1e3 * best_time(
                lambda: hybrid_sensitivity(xg, BITS, GROUP, False, backend="torch"), args.repeats, torch.cuda.synchronize
            )
        if "numba-cpu_ms" in row:
            row["speedup"] = row["torch_ms"] / row["numba-cpu_ms"]
            row["numba-cpu_GBps"] = nbytes / (row["numba-cpu_ms"] * 1e-3) / 1e9
            row["vs_bound"] = row["numba-cpu_ms"] / row["bound_ms"]
        rows.append(row)
        del x

    print(f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s (read+write); torch threads {torch.get_num_threads()}")
    header = f"{'B':>3} {'N':>5} {'MB':>7} {'torch ms':>9} {'numba ms':>9} {'speedup':>8} {'GB/s':>6} {'bound ms':>9} {'x bound':>8}"
    print(header)
    for r in rows:
        print(
            f"{r['B']:>3} {r['N']:>5} {r['MB']:>7.1f} {r['torch_ms']:>9.1f} {r.get('numba-cpu_ms', float('nan')):>9.2f} "
            f"{r.get('speedup', float('nan')):>8.1f} {r.get('numba-cpu_GBps', float('nan')):>6.2f} "
            f"{r['bound_ms']:>9.2f} {r.get('vs_bound', float('nan')):>8.2f}"
        )
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "numba_threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1)),
            "load_avg_1min": os.getloadavg()[0],
        },
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "settings": {"group_size": GROUP, "bits": BITS, "symmetric": False, "dtype": "float32"},
        "rows": rows,
    }
    if args.json:
        from qapframe.eval.results import write_json_atomically

        write_json_atomically(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
