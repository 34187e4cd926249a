"""The numba kernel leaves torch's thread count as the user set it (a fresh process: numba's OpenMP layer
changes the shared OpenMP thread count on its first parallel launch). Meaningful on a machine with more than
one core, where numba's default thread count differs from one."""

import os
import subprocess
import sys

SCRIPT = """
import torch
from qapframe.kernels.cpu import sensitivity_score_cpu
x = torch.randn(2, 64, 256)
sensitivity_score_cpu(x)
sensitivity_score_cpu(x.half())
print(torch.get_num_threads())
"""


def test_kernel_keeps_torchs_thread_count():
    # One OpenMP thread chosen the usual way; numba's own count stays its default (every core).
    env = {**{k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "1"
