"""One dispatch over backends: selection by device, explicit override, clear errors."""

import pytest
import torch

import qapframe.kernels as kernels
from qapframe.kernels import BACKENDS, UNAVAILABLE, hybrid_sensitivity, sensitivity_score


def test_torch_backend_always_registered_and_callable():
    x = torch.randn(1, 3, 10)
    error, spread = BACKENDS["torch"](x, 4, 4, False)
    assert error.shape == spread.shape == (1, 3)
    assert BACKENDS["torch"].devices is None


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(ValueError, match=r"'nope' is not available; available: torch"):
        hybrid_sensitivity(torch.randn(1, 2, 8), backend="nope")


def test_missing_backend_says_why(monkeypatch):
    monkeypatch.delitem(BACKENDS, "numba-cuda", raising=False)
    monkeypatch.setitem(UNAVAILABLE, "numba-cuda", "numba finds no usable CUDA GPU")
    with pytest.raises(ValueError, match=r"'numba-cuda' is not available \(numba finds no usable CUDA GPU\).*available: torch"):
        hybrid_sensitivity(torch.randn(1, 2, 8), backend="numba-cuda")


def test_default_falls_back_to_torch(monkeypatch):
    monkeypatch.delitem(BACKENDS, "numba-cpu", raising=False)
    x = torch.randn(1, 4, 16)
    assert kernels._default_backend(x) == "torch"
    assert all(torch.equal(a, b) for a, b in zip(hybrid_sensitivity(x, 4, 8), BACKENDS["torch"](x, 4, 8, False)))


@pytest.mark.skipif("numba-cpu" not in BACKENDS, reason="numba CPU backend unavailable")
def test_device_mismatch_is_a_clear_error():
    x = torch.randn(1, 2, 8, device="meta")
    with pytest.raises(ValueError, match=r"'numba-cpu' takes cpu tensors, got one on meta"):
        hybrid_sensitivity(x, backend="numba-cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"x": torch.randn(2, 8)}, r"shape \[B, N, D\]"),
        ({"x": torch.zeros(1, 2, 8, dtype=torch.float64)}, "float32, float16 or bfloat16"),
        ({"bits": 1}, r"bits must be in \[2, 16\]"),
        ({"group_size": 0}, "group_size must be a positive channel count or -1"),
    ],
)
def test_bad_arguments_rejected(kwargs, message):
    args = {"x": torch.randn(1, 2, 8), "bits": 4, "group_size": 4}
    args.update(kwargs)
    for fn in (hybrid_sensitivity, sensitivity_score):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_score_rejects_non_finite_input():
    x = torch.randn(2, 3, 8)
    x[1, 2, 0] = float("nan")
    for name in BACKENDS:
        if BACKENDS[name].devices is None or "cpu" in BACKENDS[name].devices:
            with pytest.raises(ValueError, match=r"non-finite E or R \(images \[1\]\)"):
                sensitivity_score(x, 4, 4, backend=name)


def test_score_constant_image_is_one_half():
    x = torch.full((1, 5, 12), 3.0)
    for name in ("torch", *(["numba-cpu"] if "numba-cpu" in BACKENDS else [])):
        assert torch.equal(sensitivity_score(x, 4, 4, backend=name), torch.full((1, 5), 0.5))
