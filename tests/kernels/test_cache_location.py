"""numba's compiled-kernel cache lives in the user's cache folder, never inside the installed package.

Inside the package, ``pip install .`` then ``pip install -e .`` leaves ``site-packages/qapframe/kernels/
__pycache__`` behind (numba's files are not in the wheel's RECORD), and Python then imports that folder
as an empty ``qapframe`` package that hides the editable one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import qapframe

PACKAGE = Path(qapframe.__file__).resolve().parent

COMPILE = """
import torch
from qapframe.kernels import BACKENDS
x = torch.randn(2, 3, 8)
BACKENDS["numba-cpu"](x, 4, 4, False)
"""


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def _numba_files(root: Path) -> set[Path]:
    return {p for pattern in ("*.nbi", "*.nbc") for p in root.rglob(pattern)}


def test_kernel_cache_goes_to_the_user_cache_dir_not_the_package(tmp_path):
    pytest.importorskip("numba")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    in_package_before = {(p, p.stat().st_mtime) for p in _numba_files(PACKAGE)}
    result = _run(COMPILE, env)
    assert result.returncode == 0, result.stderr
    cached = _numba_files(tmp_path / "cache" / "qapframe" / "numba")
    assert any(p.suffix == ".nbi" for p in cached) and any(p.suffix == ".nbc" for p in cached)
    assert {(p, p.stat().st_mtime) for p in _numba_files(PACKAGE)} == in_package_before  # nothing written there


def test_a_users_numba_cache_dir_wins(tmp_path):
    pytest.importorskip("numba")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "mine")}
    code = "import qapframe.kernels.cpu, numba; print(numba.config.CACHE_DIR)"
    result = _run(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "mine")
