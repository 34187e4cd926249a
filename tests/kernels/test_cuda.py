"""Runs `cuda_cases.py` under numba's CUDA simulator in a subprocess (and natively when a GPU exists)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("cuda_cases.py")
ROOT = Path(__file__).resolve().parents[2]


def _run_cases(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning", str(CASES)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cuda_kernel_under_simulator():
    result = _run_cases({"NUMBA_ENABLE_CUDASIM": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_kernel_on_gpu():
    result = _run_cases({"NUMBA_ENABLE_CUDASIM": "0"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
